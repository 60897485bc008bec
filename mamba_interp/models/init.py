"""Initialisation shared by both mixers (mamba_ssm's ``Mamba`` / ``Mamba2`` ``__init__``)."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def init_layers(*layers: nn.Module) -> None:
    """PyTorch's default (Kaiming-uniform) weights and zero biases for linear / conv layers."""
    for layer in layers:
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """A Δ-bias whose softplus is log-uniform in [dt_min, dt_max] (clamped below at ``floor``)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt)
