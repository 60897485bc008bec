"""SSM dynamics: Δ selectivity, decay timescales, state compression, attention sparsity and gate statistics.

* Decay and timescales (Gu & Dao 2023 §3.5.2, Δ as the selection mechanism; Dao & Gu 2024 for Mamba-2's scalar
  per-head decay): one step multiplies the state by exp(Δ_t A); the e-folding time is τ = 1 / (Δ·|A|) tokens and
  the half-life ln 2 · τ. With an input-dependent Δ, τ has a distribution over tokens (quantiles below). The
  *resting* timescale uses Δ⁰ = softplus(bias), Δ at zero pre-activation.
* Selectivity: how much Δ differs on task-relevant tokens (e.g. induction triggers) from the rest, per
  channel/head, as the per-sequence log ratio of mean Δ (a paired effect size: each sequence is its own control).
* State compression: entropy effective rank (Roy & Vetterli 2007) of each head's state H_t ∈ R^{p×n}, and the
  participation ratio (Σλ)²/Σλ² of the state covariance over positions.
* Attention sparsity of a hidden-attention row |M[t, :t+1]| (Mamba-2 SSD form): Gini index (Hurley & Rickard
  2009), entropy normalised by log(t+1), top-k mass, and the number of sources carrying a given mass.
* Gates: silu(z) per head, and the fraction of near-closed gates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_interp.stats import estimate

QUANTILES = (0.1, 0.5, 0.9)


@dataclass
class Timescales:
    """Timescales of one layer, per channel (Mamba-1) or head (Mamba-2); every array is [k] or [3, k].

    tau: 10/50/90 % quantiles over tokens of τ = 1/(Δ·|A|) of the slowest state mode (Mamba-1: min_n |A[e, n]|;
    Mamba-2: |A_h|); tau_fast: median τ of the fastest mode (Mamba-1: max_n |A|; Mamba-2: = tau[1]);
    decay: quantiles of the per-token decay exp(−Δ·|A|) of the slowest mode; resting: τ at Δ⁰ = softplus(bias).
    """

    tau: np.ndarray
    tau_fast: np.ndarray
    decay: np.ndarray
    resting: np.ndarray

    @property
    def half_life(self) -> np.ndarray:
        """Median half-life ln 2 · τ in tokens, [k]."""
        return math.log(2) * self.tau[1]

    def long_memory_fraction(self, length: int) -> float:
        """Fraction of units whose median τ exceeds ``length`` tokens."""
        return float((self.tau[1] > length).mean())


def _rates(mixer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(|A| of the slowest, of the fastest mode) per unit."""
    a = torch.exp(mixer.A_log.detach().double().cpu()).numpy()  # |A|: [e, n] or [h]
    return (a.min(1), a.max(1)) if a.ndim == 2 else (a, a)


def _resting_dt(mixer: Any) -> np.ndarray:
    bias = mixer.dt_proj.bias if hasattr(mixer, "dt_proj") else mixer.dt_bias
    dt0 = F.softplus(bias.detach().double().cpu())
    if hasattr(mixer, "dt_bias"):
        dt0 = dt0.clamp(*mixer.cfg.dt_limit)
    return dt0.numpy()


def decay_timescales(model: Any, dt: Mapping[int, Tensor]) -> dict[int, Timescales]:
    """Per layer, timescale statistics of each channel (Mamba-1) or head (Mamba-2) from the Δ values it saw.

    dt: layer -> Δ with the unit last ([N, k] valid tokens, e.g. ``ActivationSet.tokens("dt", i)``, or
    ``cache["dt", i]`` [b, l, k]; padding should be removed first).
    """
    out: dict[int, Timescales] = {}
    for layer, d in dt.items():
        mixer = model.blocks[layer].mixer
        slow, fast = _rates(mixer)
        x = d.detach().double().cpu().reshape(-1, d.shape[-1]).numpy()  # (N, k)
        if x.shape[1] != slow.shape[0]:
            raise ValueError(f"layer {layer}: Δ has {x.shape[1]} units but the layer has {slow.shape[0]}")
        q = np.quantile(x, QUANTILES, axis=0)  # (3, k) quantiles of Δ
        with np.errstate(divide="ignore"):
            tau = 1.0 / (q[::-1] * slow)  # τ falls as Δ grows: Δ's 90 % quantile is τ's 10 %
            tau_fast = 1.0 / (q[1] * fast)
            resting = 1.0 / (_resting_dt(mixer) * slow)
        decay = np.exp(-q[::-1] * slow)  # decay quantiles, increasing
        out[layer] = Timescales(tau, tau_fast, decay, resting)
    return out


def _pooled_log_ratio(sums: np.ndarray, counts: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """log(mean Δ on relevant / mean Δ on the rest) per unit, pooling the sequences with ``weights``
    ([..., b] resampling counts): sums [b, 2, k], counts [b, 2] -> [..., k]."""
    s = np.einsum("...b,bjk->...jk", weights, sums)
    c = np.einsum("...b,bj->...j", weights, counts)[..., None]
    m = s / c
    return np.log(m[..., 0, :] / m[..., 1, :])


def _resample_weights(idx: np.ndarray, b: int) -> np.ndarray:
    """How often each sequence appears in each bootstrap resample: idx [..., b'] -> [..., b]."""
    idx = np.asarray(idx).astype(np.int64)
    flat = idx.reshape(-1, idx.shape[-1])
    w = np.zeros((flat.shape[0], b))
    np.add.at(w, (np.arange(flat.shape[0])[:, None], flat), 1.0)
    return w.reshape(*idx.shape[:-1], b)


def delta_selectivity(dt: Tensor, relevant: Tensor, valid: Tensor | None = None, seed: int = 0,
                      top: int = 5) -> dict[str, Any]:
    """Δ on relevant tokens vs the other valid tokens, per unit: dt [b, l, k], relevant / valid [b, l] bool.

    Effect size per unit: the log ratio of mean Δ on the relevant tokens to mean Δ on the rest, pooled over
    sequences (``log_ratio`` [k]); its CIs come from a bootstrap over sequences (the unit mean ``mean`` and the
    ``top`` strongest units). The control (``control_log_ratio`` [k], ``control_mean``) moves the relevant
    tokens to random valid positions of the same count in each sequence; ``fraction_above_control`` is the
    share of units whose |effect| exceeds the largest |effect| any unit shows under the control.
    """
    valid = torch.ones_like(relevant) if valid is None else valid
    rel = relevant & valid
    keep = (rel.sum(1) > 0) & ((~rel & valid).sum(1) > 0)
    if int(keep.sum()) < 2:
        raise ValueError("delta_selectivity needs at least 2 sequences with both relevant and other tokens")
    x, v, rel = dt[keep].double(), valid[keep], rel[keep]
    b = x.shape[0]

    def parts(r: Tensor) -> tuple[np.ndarray, np.ndarray]:
        o = ~r & v
        sums = torch.stack([(x * r[..., None]).sum(1), (x * o[..., None]).sum(1)], 1)  # (b, 2, k)
        return sums.numpy(), torch.stack([r.sum(1), o.sum(1)], 1).double().numpy()

    g = torch.Generator().manual_seed(int(seed))
    shuffled = torch.zeros_like(rel)
    for i in range(b):  # the same count at random valid positions
        pos = v[i].nonzero()[:, 0]
        shuffled[i, pos[torch.randperm(pos.numel(), generator=g)[: int(rel[i].sum())]]] = True
    ones = np.ones(b)
    out: dict[str, Any] = {"sequences": b}
    for name, r in (("", rel), ("control_", shuffled)):
        sums, counts = parts(r)
        lr = _pooled_log_ratio(sums, counts, ones)
        out[f"{name}log_ratio"] = lr
        mean_stat = lambda idx, axis=-1, s=sums, c=counts: _pooled_log_ratio(  # noqa: E731
            s, c, _resample_weights(idx, b)).mean(-1)
        out[f"{name}mean"] = estimate(np.arange(b), mean_stat, seed=seed).to_dict()
        if not name:
            strongest = np.argsort(-np.abs(lr))[:top]
            out["top"] = [{"unit": int(k), "log_ratio": float(lr[k]), "ci": list(estimate(
                np.arange(b), lambda idx, axis=-1, k=k: _pooled_log_ratio(sums, counts, _resample_weights(idx, b))[
                    ..., k], seed=seed).ci)} for k in strongest]
    noise = float(np.abs(out["control_log_ratio"]).max())
    out["fraction_above_control"] = float((np.abs(out["log_ratio"]) > noise).mean())
    return out


# ---- state compression ---------------------------------------------------------------------------------
def effective_rank(mats: Tensor) -> Tensor:
    """Entropy effective rank exp(−Σ p_i log p_i), p_i = σ_i / Σσ, of each matrix: [..., p, n] -> [...].
    NaN for an all-zero matrix."""
    s = torch.linalg.svdvals(mats.double())
    total = s.sum(-1, keepdim=True)
    p = s / total
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return torch.where(total[..., 0] > 0, torch.exp(ent), torch.full_like(ent, float("nan")))


def participation_ratio(x: Tensor) -> float:
    """(Σλ)² / Σλ² of the covariance of the rows of ``x`` [N, D] (λ: eigenvalues of the centred data)."""
    x = x.double()
    x = x - x.mean(0)
    lam = torch.linalg.svdvals(x) ** 2
    denom = float((lam**2).sum())
    return float(lam.sum() ** 2 / denom) if denom > 0 else float("nan")


# ---- attention-row sparsity -------------------------------------------------------------------------------
def row_sparsity(rows: Tensor, query_positions: Tensor, top_k: int = 5) -> dict[str, Tensor]:
    """Sparsity of hidden-attention rows: rows [..., l] (|M[t, :]|, any sign is dropped), query_positions [...]
    (t of each row: only s ≤ t counts). Returns [...] tensors: ``gini`` (0 uniform, 1 − 1/N one-hot),
    ``entropy`` (normalised by log N, N = t + 1; NaN for N = 1), ``top_mass`` (the top_k sources' share)."""
    l = rows.shape[-1]
    t = query_positions.to(rows.device).long()
    s = torch.arange(l, device=rows.device)
    valid = s <= t[..., None]
    c = rows.double().abs().masked_fill(~valid, 0)
    total = c.sum(-1, keepdim=True).clamp_min(1e-300)
    p = c / total
    n = (t + 1).double()
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1) / torch.log(n)
    ent = torch.where(n > 1, ent, torch.full_like(ent, float("nan")))
    top = p.topk(min(top_k, l), dim=-1).values.sum(-1)
    # Gini: invalid entries sort first as −1, so a valid entry's rank among the N valid ones is k − (l − N)
    ordered = c.masked_fill(~valid, -1.0).sort(-1).values
    rank = s.double() - (l - n[..., None]) + 1  # 1-based rank among the valid entries
    weight = ((n[..., None] - rank + 0.5) / n[..., None]).masked_fill(rank < 1, 0.0)
    gini = 1 - 2 * (ordered.clamp_min(0) / total * weight).sum(-1)
    return {"gini": gini, "entropy": ent, "top_mass": top}


def tokens_for_mass(weights: Tensor, mass: float = 0.9) -> Tensor:
    """The fewest sources whose (non-negative) weights sum to ≥ ``mass`` of the total: [..., l] -> long [...]."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass={mass} must be in (0, 1]")
    w = weights.double().abs()
    share = w.sort(-1, descending=True).values.cumsum(-1) / w.sum(-1, keepdim=True).clamp_min(1e-300)
    return (share < mass - 1e-12).sum(-1) + 1


# ---- gates and decay clusters ---------------------------------------------------------------------------
def gate_stats(gate: Tensor, heads: int, closed: float = 0.05) -> dict[str, np.ndarray]:
    """silu(z) per head: gate [N, e] (e = heads · p) -> ``mean``, ``q05``/``q50``/``q95`` and ``closed_fraction``
    (share of values below ``closed``), each [heads]."""
    g = gate.detach().double().cpu().reshape(gate.shape[0], heads, -1).transpose(0, 1).reshape(heads, -1).numpy()
    q = np.quantile(g, (0.05, 0.5, 0.95), axis=1)
    return {"mean": g.mean(1), "q05": q[0], "q50": q[1], "q95": q[2], "closed_fraction": (g < closed).mean(1)}


def cluster_decays(decays: np.ndarray, k: int = 3, seed: int = 0) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Group units by their median per-step decay with 1-D k-means (``sklearn.cluster.KMeans``): returns
    (labels [N] with 0 = fastest-forgetting group, groups sorted fast → slow with ``count``, ``center``,
    ``min``, ``max``). Fewer groups when there are fewer distinct values than ``k``."""
    from sklearn.cluster import KMeans

    x = np.asarray(decays, dtype=np.float64).reshape(-1, 1)
    k = int(min(k, len(np.unique(x))))
    if k < 1:
        raise ValueError("cluster_decays needs at least one decay value")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(x)
    order = np.argsort(km.cluster_centers_[:, 0])  # small decay = forgets fast
    remap = np.empty(k, dtype=int)
    remap[order] = np.arange(k)
    labels = remap[km.labels_]
    groups = []
    for g in range(k):
        v = x[labels == g, 0]
        groups.append({"count": int(v.size), "center": float(v.mean()), "min": float(v.min()),
                       "max": float(v.max())})
    return labels, groups
