"""Optional CUDA kernels from ``mamba_ssm`` and ``causal_conv1d`` (the ``[cuda]`` extra).

Imported once; each is ``None`` when the package is missing. :func:`available` says which are usable; the
model decides explicitly (``scan_impl``) and logs the choice, it never falls back silently.
"""

from __future__ import annotations

try:  # pragma: no cover - needs CUDA builds
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception:  # ImportError, or a broken CUDA build raising at import
    selective_scan_fn = None

try:  # pragma: no cover
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except Exception:
    mamba_chunk_scan_combined = None

try:  # pragma: no cover
    from causal_conv1d import causal_conv1d_fn
except Exception:
    causal_conv1d_fn = None


def available(arch: str) -> bool:
    """Whether the fused scan for ``arch`` ("mamba1" / "mamba2") is importable."""
    return (selective_scan_fn if arch == "mamba1" else mamba_chunk_scan_combined) is not None


def kernel_selective_scan(u, delta, A, B, C, D, h0=None):
    """mamba_ssm's Mamba-1 kernel behind the shared scan signature (no initial state, no per-token states)."""
    if h0 is not None:
        raise ValueError("the mamba_ssm selective-scan kernel takes no initial state; use scan_impl='loop'")
    y, last = selective_scan_fn(
        u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.float(),
        B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float(),
        z=None, delta_bias=None, delta_softplus=False, return_last_state=True,
    )  # y (b, e, l), last (b, e, n)
    return y.transpose(1, 2).float(), last.float()


def kernel_ssd(x, dt, A, B, C, D, h0=None, chunk: int = 256):
    """mamba_ssm's Triton SSD kernel behind the shared scan signature; ``dt`` is already softplus'd/clamped."""
    y, last = mamba_chunk_scan_combined(
        x, dt, A.float(), B, C, chunk, D=D.float(), z=None, dt_bias=None, initial_states=h0,
        dt_softplus=False, return_final_states=True,
    )  # y (b, l, h, p), last (b, h, p, n)
    return y.float(), last.float()


def causal_conv1d(x, weight, bias):
    """causal_conv1d's kernel: x [b, l, c] -> [b, l, c], no activation (hook_conv sits before the SiLU)."""
    return causal_conv1d_fn(x.transpose(1, 2), weight.squeeze(1), bias, activation=None).transpose(1, 2)
