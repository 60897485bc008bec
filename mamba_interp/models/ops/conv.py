"""Causal depthwise convolution over the sequence (the mixer's short conv, width k = d_conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [b, l, c], weight [c, 1, k], bias [c] -> [b, l, c]; output t sees inputs t-k+1..t (zeros before 0)."""
    length, channels, k = x.shape[1], x.shape[2], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2).to(weight.dtype), weight, bias, padding=k - 1, groups=channels)
    return y[..., :length].transpose(1, 2)  # (b, l, c)


def causal_conv1d_window(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, window: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same conv continuing a sequence: ``window`` [b, k-1, c] holds the k-1 inputs before x [b, l, c].

    Returns (y [b, l, c], the new window [b, k-1, c] = the last k-1 inputs of window ∥ x). With a zero window
    this is :func:`causal_conv1d`.
    """
    k, channels = weight.shape[-1], x.shape[2]
    full = torch.cat([window.to(x.dtype), x], dim=1)  # (b, k-1+l, c)
    y = F.conv1d(full.transpose(1, 2).to(weight.dtype), weight, bias, groups=channels)  # (b, c, l)
    return y.transpose(1, 2), full[:, full.shape[1] - (k - 1):].clone()  # a copy: never pin all of x
