"""The ReLU output toy model of Elhage et al. 2022 and its data, trained as a batch of independent instances.

Index letters: n features, m hidden dimensions, i instances (models trained together).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def importance_vector(importance: float | Sequence[float] | Tensor, n_features: int) -> Tensor:
    """I [n]: a float r means I_i = r^i (the paper's 0.9^i / 0.7^i); a sequence is used as given."""
    if isinstance(importance, (int, float)):
        return float(importance) ** torch.arange(n_features, dtype=torch.float32)
    out = torch.as_tensor(importance, dtype=torch.float32).reshape(-1)
    if out.shape[0] != n_features:
        raise ValueError(f"importance has {out.shape[0]} entries for n_features={n_features}")
    return out


def sample_toy_batch(
    batch_size: int, feature_probability: Tensor, n_features: int, generator: torch.Generator
) -> Tensor:
    """x [batch, i, n]: U[0, 1) values kept with probability p_i (one probability per instance)."""
    n_inst = feature_probability.shape[0]
    values = torch.rand(batch_size, n_inst, n_features, generator=generator)
    on = torch.rand(batch_size, n_inst, n_features, generator=generator) < feature_probability[None, :, None]
    return values * on


def toy_forward(W: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """x' = ReLU(Wᵀ W x + b) for W [i, m, n], b [i, n], x [batch, i, n]."""
    hidden = torch.einsum("bin,imn->bim", x, W)
    return torch.relu(torch.einsum("bim,imn->bin", hidden, W) + b)


@dataclass
class ToyModels:
    W: Tensor
    """[i, m, n] one toy model per instance."""
    b: Tensor
    """[i, n]"""
    feature_probability: Tensor
    """[i] p = 1 − S of each instance."""
    importance: Tensor
    """[n]"""
    final_loss: Tensor
    """[i] loss of each instance on the last batch."""


def train_toy_models(
    n_features: int,
    n_hidden: int,
    feature_probability: float | Sequence[float],
    importance: float | Sequence[float] | Tensor,
    steps: int = 10_000,
    seed: int = 0,
    batch_size: int = 1024,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
) -> ToyModels:
    """Train one toy model per entry of ``feature_probability`` at once (batched, as the notebook's instances).

    Repeat a probability to train several independent initialisations of it. Deterministic per ``seed``.
    Init: W_i ~ xavier-normal of an [n, m] matrix (std √(2/(n+m))), b = 0.
    """
    probs = torch.tensor(
        [feature_probability] if isinstance(feature_probability, (int, float)) else list(feature_probability),
        dtype=torch.float32,
    )
    if probs.numel() == 0 or not bool(((probs > 0) & (probs <= 1)).all()):
        raise ValueError(f"feature_probability must be in (0, 1]; got {probs.tolist()}")
    if n_features <= 0 or n_hidden <= 0 or steps <= 0 or batch_size <= 0:
        raise ValueError("n_features, n_hidden, steps and batch_size must be positive")
    imp = importance_vector(importance, n_features)
    gen = torch.Generator().manual_seed(seed)
    n_inst = probs.shape[0]
    std = math.sqrt(2.0 / (n_features + n_hidden))
    W = torch.nn.Parameter(torch.randn(n_inst, n_hidden, n_features, generator=gen) * std)
    b = torch.nn.Parameter(torch.zeros(n_inst, n_features))
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=weight_decay)
    per_instance = torch.zeros(n_inst)
    for _ in range(steps):
        x = sample_toy_batch(batch_size, probs, n_features, gen)
        out = toy_forward(W, b, x)
        per_instance = (imp * (x - out).pow(2)).mean(dim=(0, 2))  # [i]
        opt.zero_grad(set_to_none=True)
        per_instance.sum().backward()  # instances are independent: summing trains each on its own loss
        opt.step()
    return ToyModels(
        W=W.detach(), b=b.detach(), feature_probability=probs, importance=imp, final_loss=per_instance.detach()
    )


def train_toy_model(
    n_features: int,
    n_hidden: int,
    feature_probability: float,
    importance: float | Sequence[float] | Tensor,
    steps: int = 10_000,
    seed: int = 0,
    batch_size: int = 1024,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """One toy model: returns (W [n_hidden, n_features], b [n_features])."""
    models = train_toy_models(
        n_features, n_hidden, [feature_probability], importance, steps, seed, batch_size, lr, weight_decay
    )
    return models.W[0], models.b[0]
