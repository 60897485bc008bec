"""RMSNorm and the gated RMSNorm of Mamba-2 (computed in float32, as transformers and mamba_ssm do)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x²) + eps)``; with ``weight=False`` the weightless form of Falcon-Mamba's B/C/Δ norms."""

    def __init__(self, dim: int, eps: float, weight: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(dtype) if self.weight is None else self.weight * x32.to(dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's ``RMSNormGated`` with ``norm_before_gate=False``: ``rmsnorm(y ⊙ gate)`` per group of e/g channels.

    The gate arrives already activated (``hook_gate`` = silu(z)), so this module multiplies and normalises.
    """

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        x = y.float() * gate.float()  # (b, l, e)
        groups = x.unflatten(-1, (-1, self.group_size))  # (b, l, g, e/g)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * groups.flatten(-2).to(dtype)
