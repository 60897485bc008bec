"""Scans and convolutions: pure functions, each fast path beside its reference (same signature)."""

from mamba_interp.models.ops.conv import causal_conv1d
from mamba_interp.models.ops.selective_scan import (
    linear_recurrence,
    selective_scan_loop,
    selective_scan_parallel,
    selective_scan_ref,
)
from mamba_interp.models.ops.ssd import ssd_chunked, ssd_ref

__all__ = [
    "causal_conv1d",
    "linear_recurrence",
    "selective_scan_loop",
    "selective_scan_parallel",
    "selective_scan_ref",
    "ssd_chunked",
    "ssd_ref",
]
