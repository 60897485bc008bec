"""Causal depthwise convolution over the sequence (the mixer's short conv, width k = d_conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [b, l, c], weight [c, 1, k], bias [c] -> [b, l, c]; output t sees inputs t-k+1..t (zeros before 0)."""
    length, channels, k = x.shape[1], x.shape[2], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2).to(weight.dtype), weight, bias, padding=k - 1, groups=channels)
    return y[..., :length].transpose(1, 2)  # (b, l, c)
