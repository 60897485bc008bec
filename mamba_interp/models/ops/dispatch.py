"""Which scan runs: chosen by device and by what the hooks need, explicitly, and logged once per choice.

``scan_impl`` values: ``"auto"``; ``"reference"`` (step loop); ``"compiled"`` (Mamba-1 fused C kernel built at
first use, the CPU default where a C compiler is found; ``models/ops/cpu_kernel.py``); ``"loop"`` (Mamba-1
blocked low-memory torch loop, the CPU default without a compiler, and for float64); ``"parallel"`` (Mamba-1
Hillis–Steele, the GPU default without kernels); ``"chunked"`` (Mamba-2 chunked SSD, the default on every device
without kernels); ``"kernel"`` (mamba_ssm's fused CUDA kernels).

Measured side by side (docs/performance.md): on CPU the fused kernel beat the low-memory loop 4x, forward and
forward + backward, at mamba-130m's shape; the loop beat the parallel scan for Mamba-1; the chunked SSD is
matmul-shaped for Mamba-2's scalar-per-head decay and wins there. On GPU per-step launches dominate, so a
log-depth or chunked scan (or the fused kernel) is the default.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch

from mamba_interp.models.ops import cpu_kernel, kernels
from mamba_interp.models.ops.selective_scan import SCANS as M1_SCANS
from mamba_interp.models.ops.ssd import GPU_CHUNK, ssd_chunked
from mamba_interp.models.ops.ssd import SCANS as M2_SCANS

logger = logging.getLogger("mamba_interp")

SCAN_IMPLS = ("auto", "reference", "compiled", "loop", "parallel", "chunked", "kernel")
_VALID = {"mamba1": ("reference", "compiled", "loop", "parallel", "kernel"),
          "mamba2": ("reference", "chunked", "kernel")}


def validate_scan_impl(arch: str, impl: str) -> None:
    if impl != "auto" and impl not in _VALID[arch]:
        raise ValueError(f"scan_impl={impl!r} is not available for {arch}; use 'auto' or one of {_VALID[arch]}")


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.info(message)


def choose_scan(arch: str, requested: str, device: torch.device, has_h0: bool,
                dtype: torch.dtype = torch.float32) -> tuple[str, Callable]:
    """Return ``(name, fn)`` for the scan of one layer; raise if an explicit request cannot be honoured.

    ``dtype`` is the scan inputs' dtype: the compiled CPU kernel is float32, so float64 takes the torch loop."""
    validate_scan_impl(arch, requested)
    on_cuda = device.type == "cuda"
    kernel_ok = on_cuda and kernels.available(arch) and not (arch == "mamba1" and has_h0)
    if requested == "kernel" and not kernel_ok:
        why = (
            "the device is not CUDA" if not on_cuda
            else "mamba_ssm is not installed (pip install -r requirements-cuda.txt)" if not kernels.available(arch)
            else "an initial state (hook_h0, or an inference state) is one the Mamba-1 kernel cannot take"
        )
        raise RuntimeError(f"scan_impl='kernel' cannot run: {why}; use scan_impl='auto'")
    if requested == "compiled":
        why = ("the device is not the CPU" if device.type != "cpu"
               else "the kernel computes in float32 and the inputs are float64" if dtype == torch.float64
               else "no C compiler built it (set CC, see the log)" if not cpu_kernel.available() else "")
        if why:
            raise RuntimeError(f"scan_impl='compiled' cannot run: {why}; use scan_impl='auto' or 'loop'")
    if requested == "auto":
        if kernel_ok:
            name = "kernel"
        elif arch == "mamba1" and on_cuda:
            name = "parallel"
        elif arch == "mamba1":
            name = "compiled" if dtype != torch.float64 and cpu_kernel.available() else "loop"
        else:
            name = "chunked"
        if on_cuda and not kernel_ok:
            reason = ("mamba_ssm not installed" if not kernels.available(arch)
                      else "an initial state (hook_h0 / inference state) needs the torch scan")
            _log_once(f"mamba_interp: {arch} scan on {device.type} uses '{name}' (kernels unused: {reason})")
        elif name == "loop":
            reason = "float64 inputs" if dtype == torch.float64 else "no C compiler built the fused kernel"
            _log_once(f"mamba_interp: {arch} scan on {device.type} uses 'loop' (compiled kernel unused: {reason})")
        else:
            _log_once(f"mamba_interp: {arch} scan on {device.type} uses '{name}'")
    else:
        name = requested
    if name == "kernel":
        fn = kernels.kernel_selective_scan if arch == "mamba1" else kernels.kernel_ssd
    elif name == "compiled":
        fn = cpu_kernel.selective_scan_compiled
    elif name == "chunked" and on_cuda:
        fn = functools.partial(ssd_chunked, chunk=GPU_CHUNK)
    else:
        fn = (M1_SCANS if arch == "mamba1" else M2_SCANS)[name]
    return name, fn
