"""Geometry of feature directions: dimensionality, interference, D*, uniform polytopes, decoder geometry.

Toy-model convention: W [..., m, n] has the n features as columns. ``decoder_geometry`` takes rows instead
(an SAE's W_dec [m_sae, d]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

NORM_EPS = 1e-6  # the notebook clamps ‖W_i‖ at 1e-6 before normalising


def _unit_columns(W: Tensor) -> tuple[Tensor, Tensor]:
    W = W.double()
    norms = W.norm(dim=-2)  # [..., n]
    return W / norms.clamp_min(NORM_EPS).unsqueeze(-2), norms


def feature_dimensionality(W: Tensor) -> Tensor:
    """D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)² for W [..., m, n]; returns [..., n] float64 (0 for a zero column)."""
    W_hat, norms = _unit_columns(W)
    overlap = (W_hat.transpose(-1, -2) @ W.double()).pow(2).sum(-1)  # [..., n]: Σ_j (Ŵ_i·W_j)²
    return torch.where(overlap > 0, norms.pow(2) / overlap.clamp_min(1e-300), torch.zeros_like(overlap))


def interference(W: Tensor) -> Tensor:
    """Σ_{j≠i} (Ŵ_i·W_j)² for W [..., m, n] (the colour of the paper's norm bar plots); [..., n] float64."""
    W_hat, _ = _unit_columns(W)
    overlap = (W_hat.transpose(-1, -2) @ W.double()).pow(2)  # [..., n, n]
    return overlap.sum(-1) - torch.diagonal(overlap, dim1=-2, dim2=-1)


def dimensions_per_feature(W: Tensor) -> Tensor:
    """D* = m / ‖W‖_F² for W [..., m, n] (notebook cell 18); [...] float64."""
    return W.shape[-2] / W.double().pow(2).sum(dim=(-2, -1))


def feature_norms(W: Tensor) -> Tensor:
    return W.double().norm(dim=-2)


@dataclass
class ToyGeometry:
    norms: Tensor
    """[n] ‖W_i‖."""
    dimensionality: Tensor
    """[n] D_i."""
    interference: Tensor
    """[n] Σ_{j≠i} (Ŵ_i·W_j)²."""
    dims_per_feature: float
    """D* = m / ‖W‖_F²."""
    n_represented: int
    """Features with ‖W_i‖ > ``represented_threshold``."""
    angles_deg: Tensor | None
    """[n] angle of each W_i in degrees (m = 2 only)."""
    bias: Tensor | None

    def to_dict(self) -> dict[str, object]:
        return {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}


def toy_geometry(W: Tensor, b: Tensor | None = None, represented_threshold: float = 0.5) -> ToyGeometry:
    """Summary geometry of one toy model W [m, n]."""
    if W.ndim != 2:
        raise ValueError(f"W must be [m, n]; got {tuple(W.shape)}")
    norms = feature_norms(W)
    angles = torch.rad2deg(torch.atan2(W[1].double(), W[0].double())) if W.shape[0] == 2 else None
    return ToyGeometry(
        norms=norms,
        dimensionality=feature_dimensionality(W),
        interference=interference(W),
        dims_per_feature=float(dimensions_per_feature(W)),
        n_represented=int((norms > represented_threshold).sum()),
        angles_deg=angles,
        bias=None if b is None else b.detach().double(),
    )


def angle_gaps_deg(W: Tensor, features: Sequence[int] | None = None) -> Tensor:
    """Sorted consecutive angular gaps (degrees, summing to 360) between the 2-D columns ``features`` of W [2, n]."""
    if W.shape[0] != 2:
        raise ValueError("angle gaps need a 2-D embedding (W of shape [2, n])")
    cols = W[:, list(features)] if features is not None else W
    ang = torch.sort(torch.atan2(cols[1].double(), cols[0].double())).values
    gaps = torch.diff(torch.cat([ang, ang[:1] + 2 * math.pi]))
    return torch.rad2deg(gaps)


# ---------------------------------------------------------------------------------------------------------
# uniform polytopes (the D_i lines of the paper) and tegum products
# ---------------------------------------------------------------------------------------------------------

POLYTOPE_DIMENSIONALITY = {
    "dedicated": 1.0,
    "antipodal": 1 / 2,
    "triangle": 2 / 3,
    "tetrahedron": 3 / 4,
    "pentagon": 2 / 5,
    "square_antiprism": 3 / 8,
}


def _ring(n: int, offset: float = 0.0) -> Tensor:
    ang = offset + 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    return torch.stack([torch.cos(ang), torch.sin(ang)])


def polytope(name: str) -> Tensor:
    """Unit-norm vertices [k, N] of a uniform polytope whose features all have D_i = k/N."""
    if name == "dedicated":
        return torch.ones(1, 1, dtype=torch.float64)
    if name == "antipodal":
        return torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    if name == "triangle":
        return _ring(3)
    if name == "pentagon":
        return _ring(5)
    if name == "tetrahedron":  # (±1, ±1, ±1)/√3 with an even number of minus signs
        v = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64).T
        return v / math.sqrt(3)
    if name == "square_antiprism":  # radius √(2/3), heights ±1/√3, the second square turned by 45°
        r, z = math.sqrt(2 / 3), 1 / math.sqrt(3)
        top, bottom = _ring(4) * r, _ring(4, math.pi / 4) * r
        heights = torch.cat([torch.full((1, 4), z), torch.full((1, 4), -z)], 1).double()
        return torch.cat([torch.cat([top, bottom], 1), heights], 0)
    raise ValueError(f"unknown polytope {name!r}; known: {sorted(POLYTOPE_DIMENSIONALITY)}")


def tegum_product(blocks: Sequence[Tensor], total_dim: int | None = None) -> Tensor:
    """Place the blocks [k_b, N_b] in disjoint coordinates: W [max(total_dim, Σk), ΣN] (block-diagonal)."""
    k = sum(bl.shape[0] for bl in blocks)
    W = torch.zeros(max(total_dim or 0, k), sum(bl.shape[1] for bl in blocks), dtype=torch.float64)
    r = c = 0
    for bl in blocks:
        W[r : r + bl.shape[0], c : c + bl.shape[1]] = bl
        r, c = r + bl.shape[0], c + bl.shape[1]
    return W


# ---------------------------------------------------------------------------------------------------------
# the same measures on learned decoder directions (e.g. an SAE's W_dec [m_sae, d])
# ---------------------------------------------------------------------------------------------------------


@dataclass
class DecoderGeometry:
    """Superposition measures of a set of feature directions (rows of a decoder)."""

    n_features: int
    d: int
    dimensionality: Tensor
    """[n] D_i (on unit-normalised rows when ``normalized``: D_i = 1 / Σ_j cos²(w_i, w_j))."""
    interference: Tensor
    """[n] Σ_{j≠i} (ŵ_i·w_j)²."""
    max_abs_cos: Tensor
    """[n] the largest |cos| with any other direction."""
    dims_per_feature: float
    """D / ‖W‖_F² (= D / n for unit rows): the TMS D* with the decoder as W."""
    sum_dimensionality: float
    """Σ_i D_i, the dimensions the features effectively occupy: ≤ D always (Cauchy–Schwarz with the frame operator
    S = Σ_j w_j w_jᵀ gives D_i ≤ ŵ_iᵀ S⁻¹ ŵ_i·‖w_i‖², which sums to tr(S⁻¹S) = D), with equality for a tight frame."""
    mean_dimensionality: float
    normalized: bool
    feature_ids: Tensor
    """[n] row ids of the directions used (the alive ones)."""

    def to_dict(self) -> dict[str, object]:
        return {
            "n_features": self.n_features,
            "d": self.d,
            "dims_per_feature": self.dims_per_feature,
            "sum_dimensionality": self.sum_dimensionality,
            "mean_dimensionality": self.mean_dimensionality,
            "mean_interference": float(self.interference.mean()),
            "median_max_abs_cos": float(self.max_abs_cos.median()),
            "frac_dimensionality_above_0_9": float((self.dimensionality > 0.9).double().mean()),
            "normalized": self.normalized,
        }


@torch.no_grad()
def decoder_geometry(
    directions: Tensor, alive: Tensor | None = None, normalize: bool = True, chunk: int = 2048
) -> DecoderGeometry:
    """Dimensionality, interference and D* of the rows of ``directions`` [n, d] (alive rows only).

    ``normalize`` unit-normalises rows first: an SAE decoder's row norms carry the latent scale, not how strongly a
    feature is represented (the TMS reading of ‖W_i‖), so the default measures the directions alone.
    """
    W = directions.detach().double()
    ids = torch.arange(W.shape[0])
    if alive is not None:
        ids = ids[torch.as_tensor(alive, dtype=torch.bool)]
        W = W[ids]
    if W.shape[0] < 2:
        raise ValueError("decoder_geometry needs at least two directions")
    norms = W.norm(dim=1)
    if normalize:
        W = W / norms.clamp_min(1e-12)[:, None]
        norms = W.norm(dim=1)
    W_hat = W / norms.clamp_min(NORM_EPS)[:, None]
    n = W.shape[0]
    overlap_sum = torch.empty(n, dtype=torch.float64)
    max_cos = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk):  # [c, n] blocks keep memory O(chunk·n)
        block = W_hat[start : start + chunk] @ W.T  # (ŵ_i·w_j)
        overlap_sum[start : start + chunk] = block.pow(2).sum(1)
        cos = (W_hat[start : start + chunk] @ W_hat.T).abs()
        cos[torch.arange(cos.shape[0]), torch.arange(start, start + cos.shape[0])] = 0.0
        max_cos[start : start + chunk] = cos.max(1).values
    self_overlap = norms.pow(2)
    dim = torch.where(overlap_sum > 0, self_overlap / overlap_sum.clamp_min(1e-300), torch.zeros_like(overlap_sum))
    return DecoderGeometry(
        n_features=n,
        d=W.shape[1],
        dimensionality=dim,
        interference=overlap_sum - self_overlap,
        max_abs_cos=max_cos,
        dims_per_feature=W.shape[1] / float(W.pow(2).sum()),
        sum_dimensionality=float(dim.sum()),
        mean_dimensionality=float(dim.mean()),
        normalized=normalize,
        feature_ids=ids,
    )
