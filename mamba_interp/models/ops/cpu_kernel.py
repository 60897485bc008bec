"""The Mamba-1 selective scan as one fused C kernel on the CPU (``scan_impl="compiled"``).

The torch loop (:func:`~mamba_interp.models.ops.selective_scan.selective_scan_loop`) is bound by memory traffic:
each block writes exp(ΔA), ΔBu and the states [block, b, e, n] and reads them back. ``csrc/selective_scan_cpu.c``
keeps a 16-channel tile's state in L1 and makes one pass over the inputs, forward and backward (the backward
recomputes each block's states from a per-block checkpoint, as the torch loop does). At mamba-130m's layer,
16 × 256 tokens, 2 threads, it was 4.3x faster than the loop forward and 4.0x forward + backward
(``bench/bench_scan_cpu.py``, which prints the ratios; docs/performance.md §3).

The source is compiled with the system C compiler (``$CC``, else ``cc``) at first use, for this machine's
instruction set (``-march=native``), into a per-user cache (``$MAMBA_INTERP_CACHE``, else
``~/.cache/mamba_interp``; where that cannot be written, a folder under the system's temporary folder), keyed by
a hash of the source, the flags and the CPU. No compiler, a failed build or
``MAMBA_INTERP_CPU_KERNEL=0`` make :func:`available` false; ``scan_impl="auto"`` then uses the torch loop and
says so once in the log. The kernel computes in float32 (bfloat16 / float16 inputs are upcast, as by every scan);
``auto`` gives float64 inputs to the torch loop, which keeps them float64.

Threads: the kernel's own pthreads, as many as ``torch.get_num_threads()``. The C call releases the GIL.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

from mamba_interp.models.ops.selective_scan import DEFAULT_BLOCK

logger = logging.getLogger("mamba_interp")

SOURCE = Path(__file__).parent / "csrc" / "selective_scan_cpu.c"
MAX_D_STATE = 256  # NMAX in the C source
MAX_THREADS = 256  # MAX_THREADS in the C source
# the checkpoint interval is the torch loop's DEFAULT_BLOCK: the backward holds (block + 1) states per tile


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-fPIC",
             "-shared", "-pthread"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mprefer-vector-width=512")  # a 16-lane tile is one AVX-512 vector where there is one
    return flags


def _cpu_signature() -> str:
    """What -march=native depends on, so a cache shared between different CPUs never loads a foreign build."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next((ln for ln in lines if ln.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("MAMBA_INTERP_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "mamba_interp"


def _build(compiler: str, flags: list[str], target: Path) -> None:
    """Compile into a temporary file beside ``target``, then rename: a concurrent build or load (pytest-xdist
    workers, parallel runs) never sees half a library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unavailable(err: Exception) -> None:
    detail = (getattr(err, "stderr", "") or str(err)).strip()
    logger.info("mamba_interp: the compiled Mamba-1 CPU scan is unavailable (%s: %s); the torch loop runs",
                type(err).__name__, detail.splitlines()[-1] if detail else "no detail")


@functools.cache
def _library() -> ctypes.CDLL | None:
    """Build (once per source, flags and CPU) and load the kernel; None, logged once, when that fails. An
    unwritable cache folder falls back to one under the system's temporary folder."""
    if os.environ.get("MAMBA_INTERP_CPU_KERNEL", "1") == "0":
        logger.info("mamba_interp: the compiled Mamba-1 CPU scan is off (MAMBA_INTERP_CPU_KERNEL=0)")
        return None
    compiler = os.environ.get("CC", "cc")
    flags = _flags()
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *flags, _cpu_signature()]).encode()).hexdigest()
    name = f"selective_scan_cpu-{key[:16]}.so"
    user = os.getuid() if hasattr(os, "getuid") else "user"
    folders = [cache_dir(), Path(tempfile.gettempdir()) / f"mamba_interp-{user}"]
    for i, folder in enumerate(folders):
        target = folder / name
        try:
            if not target.exists():
                _build(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
            break
        except subprocess.SubprocessError as err:  # the compiler failed: another folder would not help
            _unavailable(err)
            return None
        except OSError as err:  # no compiler, an unwritable folder, or a library that does not load
            if i == len(folders) - 1 or (isinstance(err, FileNotFoundError) and err.filename == compiler):
                _unavailable(err)
                return None
    ptr, long = ctypes.c_void_p, ctypes.c_long
    lib.scan_fwd.argtypes = [ptr] * 10 + [long] * 6
    lib.scan_bwd.argtypes = [ptr] * 15 + [long] * 6
    lib.scan_fwd.restype = lib.scan_bwd.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the kernel is built (or could be built now) and loaded."""
    return _library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), MAX_THREADS))


def _check(status: int, what: str) -> None:
    if status:
        raise RuntimeError(f"the compiled Mamba-1 CPU scan's {what} failed (status {status}: "
                           f"{'out of memory' if status == 2 else 'bad shape'}); use scan_impl='loop'")


class _CompiledScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, h0, block):
        lib = _library()
        b, l, e = u.shape
        n = A.shape[1]
        At = A.t().contiguous()  # (n, e)
        y = torch.empty_like(u)
        h_last = torch.empty(b, e, n, dtype=u.dtype)
        keep = any(ctx.needs_input_grad)
        ckpt = torch.empty(-(-l // block), b, e, n, dtype=u.dtype) if keep else None
        _check(lib.scan_fwd(_ptr(u), _ptr(delta), _ptr(At), _ptr(B), _ptr(C), _ptr(D), _ptr(h0), _ptr(y),
                            _ptr(h_last), _ptr(ckpt), b, l, e, n, block, _threads()), "forward")
        if keep:
            ctx.block = block
            ctx.has_h0 = h0 is not None
            ctx.save_for_backward(u, delta, At, B, C, D, ckpt)
        return y, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh_last):
        u, delta, At, B, C, D, ckpt = ctx.saved_tensors
        b, l, e = u.shape
        n = At.shape[0]
        threads = _threads()
        gy = torch.zeros_like(u) if gy is None else gy.float().contiguous()
        gh_last = None if gh_last is None else gh_last.float().contiguous()
        g_u, g_delta = torch.empty_like(u), torch.empty_like(u)
        g_At = torch.zeros(threads, n, e)
        g_B, g_C = torch.zeros(threads, b, l, n), torch.zeros(threads, b, l, n)
        g_h0 = torch.empty(b, e, n) if ctx.has_h0 else None
        _check(_library().scan_bwd(
            _ptr(u), _ptr(delta), _ptr(At), _ptr(B), _ptr(C), _ptr(D), _ptr(ckpt), _ptr(gy), _ptr(gh_last),
            _ptr(g_u), _ptr(g_delta), _ptr(g_At), _ptr(g_B), _ptr(g_C), _ptr(g_h0), b, l, e, n, ctx.block, threads,
        ), "backward")
        g_D = (gy * u).sum(dim=(0, 1))
        return g_u, g_delta, g_At.sum(0).t(), g_B.sum(0), g_C.sum(0), g_D, g_h0, None


def selective_scan_compiled(u, delta, A, B, C, D, h0=None, block: int = DEFAULT_BLOCK):
    """The fused CPU kernel behind the shared scan signature (float32; see the module docstring)."""
    if u.dtype == torch.float64:
        raise ValueError("scan_impl='compiled' computes in float32 and the inputs are float64; use 'loop'")
    if not available():
        raise RuntimeError("scan_impl='compiled' cannot run: no C compiler built the kernel (see the log); "
                           "use scan_impl='loop' or 'auto'")
    if A.shape[1] > MAX_D_STATE:
        raise ValueError(f"scan_impl='compiled' takes d_state <= {MAX_D_STATE}, got {A.shape[1]}; use 'loop'")
    if u.device.type != "cpu":
        raise ValueError(f"scan_impl='compiled' runs on the CPU, the inputs are on {u.device}; use 'auto'")
    args = [t.float().contiguous() for t in (u, delta, A, B, C, D)]
    h0 = None if h0 is None else h0.float().contiguous()
    return _CompiledScan.apply(*args, h0, block)
