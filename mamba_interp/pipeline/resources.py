"""What the machine offers a run, read from the operating system: resident memory of this process (and its peak,
resettable per step), available memory and GPU memory, free disk, and the matrix-multiply rate.

``MAMBA_INTERP_AVAILABLE_MB`` and ``MAMBA_INTERP_DISK_FREE_MB`` override the available memory and the free disk
(tests, and shared machines with a quota smaller than what the kernel reports).
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import time
from pathlib import Path
from typing import Any

MiB = 2**20


def _proc_status(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int | None:
    """Resident memory of this process (Linux), bytes."""
    return _proc_status("VmRSS")


def peak_rss() -> int | None:
    """Peak resident memory since the process started or :func:`reset_peak_rss` (Linux ``VmHWM``), bytes."""
    return _proc_status("VmHWM")


def release_freed_memory() -> None:
    """Hand memory that Python and the C allocator hold but no longer use back to the kernel (glibc's
    ``malloc_trim``), so the RSS a step starts from is what is live, not what the previous step freed."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS keeps the allocator's free lists
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS (Linux >= 4.0), after releasing freed memory (so a
    step's peak is not the previous step's freed but retained heap); False where that is impossible."""
    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_memory(device: Any = None) -> int | None:
    """Memory a run may still use, bytes: free GPU memory on CUDA, else ``MemAvailable`` (capped by a cgroup
    limit, or ``MAMBA_INTERP_AVAILABLE_MB``); None when unknown (then nothing is refused)."""
    override = plan_env_override()
    if override is not None:
        return override
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and avail is not None:
            avail = min(avail, int(limit) - used + (current_rss() or 0))
    except (OSError, ValueError):
        pass
    return avail


def disk_free(path: str | Path) -> int | None:
    """Free disk space where ``path`` (or its nearest existing parent) lives, or ``MAMBA_INTERP_DISK_FREE_MB``."""
    value = os.environ.get("MAMBA_INTERP_DISK_FREE_MB")
    if value:
        return int(float(value) * MiB)
    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return None
    return usage.free if usage.total > 0 else None  # a virtual file system (/proc) reports no capacity


def matmul_rate(device: Any = None, seconds: float = 0.05) -> float:
    """Multiply-add rate (FLOP/s) of a float32 matmul on ``device`` (default CPU), measured for about ``seconds``."""
    import torch

    device = torch.device("cpu" if device is None else device)
    a, b = torch.randn(256, 512, device=device), torch.randn(512, 512, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    sync()
    return 2 * 256 * 512 * 512 * n / (time.perf_counter() - t0)


def plan_env_override() -> int | None:
    """``MAMBA_INTERP_AVAILABLE_MB`` overrides the available memory (tests, and shared machines with a quota;
    ``MAMBA_INTERP_DISK_FREE_MB`` likewise the free disk)."""
    value = os.environ.get("MAMBA_INTERP_AVAILABLE_MB")
    return int(float(value) * MiB) if value else None
