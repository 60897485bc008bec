"""Planted sparse features: the ground-truth SAE benchmark (after Sharkey, Braun & Millidge 2022).

G ∈ R^{n×d}, rows i.i.d. N(0, I_d) normalised to unit length        (the true dictionary)
c_{t,i} = u_{t,i}·1[r_{t,i} < p],  u, r ~ U(0, 1),  p = l0 / n        (E[L0] = l0, E[c | on] = ½)
x_t = c_t G  (+ N(0, σ²) noise)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PlantedData:
    features: Tensor
    """True dictionary G [n, d], unit-norm rows."""
    codes: Tensor
    """Sparse coefficients c [t, n]."""
    activations: Tensor
    """x = c G (+ noise) [t, d]."""


def planted_features(
    n_features: int, d: int, n_samples: int, l0: float = 3.0, seed: int = 0, noise: float = 0.0, chunk: int = 65536
) -> PlantedData:
    """Sample the planted-feature data set; deterministic per ``seed``."""
    if not 0 < l0 <= n_features:
        raise ValueError(f"l0={l0} must be in (0, n_features={n_features}]")
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n_features, d, generator=gen)
    g = g / g.norm(dim=1, keepdim=True)
    p = l0 / n_features
    codes = torch.empty(n_samples, n_features)
    for start in range(0, n_samples, chunk):  # chunked so the [t, n] uniforms never double the memory
        rows = min(chunk, n_samples - start)
        on = torch.rand(rows, n_features, generator=gen) < p
        codes[start : start + rows] = torch.rand(rows, n_features, generator=gen) * on
    x = codes @ g
    if noise > 0:
        x = x + noise * torch.randn(x.shape, generator=gen)
    return PlantedData(features=g, codes=codes, activations=x)
