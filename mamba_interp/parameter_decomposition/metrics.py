"""Figures of merit of a parameter decomposition (APD paper §3.1, SPD paper §3.1 and Table 1; spd-main's
``IdentityCIError`` / ``DenseCIPattern``).

* **MMCS** = (1/n) Σ_j max_c cos(P_c[:, j], W[:, j]) over the features j (columns of the feature matrix), with P_c
  the c-th (sub)component as a matrix — the papers' mean max cosine similarity.
* **ML2R** (norm-aware) = (1/n) Σ_j ‖P_{c*}[:, j]‖ / ‖W[:, j]‖ with c* = argmax_c ⟨P_c[:, j], Ŵ_j⟩, the largest
  projection on the feature's direction. The reference analyser takes c* = argmax of the cosine over all
  subcomponents, which can pick a dead one (norm ~1e-5, cosine 0.99995) and read 0 for that feature; the
  projection cannot. ``mmcs_norm_aware`` is the cosine of that same c*.
* **identity-CI error**: the importances [n, C] of one-hot inputs x = 0.75 e_j, columns permuted by the Hungarian
  assignment towards the identity; errors = off-diagonal entries > tol + diagonal entries < 1 − tol. 0 is a perfect
  one-subcomponent-per-feature pattern.
* **dense-CI error** (k): columns sorted by mass; the first k must each hold an entry ≥ 1 − tol, all others none
  above tol (an identity matrix should be one always-important rank-k mechanism).
* **alive**: subcomponents whose importance exceeds a threshold somewhere on held-out data. The count depends on
  the threshold and the sample (spd issue #143); report it at several thresholds, next to the norms.
* **CI-L0**: mean number of subcomponents per token (or sample) with importance above a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

LARGE_FRACTION = 0.3  # a subcomponent is "large" when its norm exceeds this fraction of its matrix's largest
ONE_HOT_VALUE = 0.75
TOLERANCE = 0.1


@dataclass
class FeatureMatch:
    mmcs: float
    mmcs_norm_aware: float
    ml2r: float
    best: list[int]  # c* per feature
    cosine: list[float]  # cos of c* per feature
    norm_ratio: list[float]  # ‖P_c*[:, j]‖ / ‖W[:, j]‖ per feature
    ml2r_cosine_argmax: float  # ML2R as the reference analyser computes it (c* = argmax cosine), for comparison

    def to_dict(self) -> dict[str, Any]:
        return {"mmcs": self.mmcs, "mmcs_norm_aware": self.mmcs_norm_aware, "ml2r": self.ml2r, "best": self.best,
                "cosine_per_feature": self.cosine, "norm_ratio_per_feature": self.norm_ratio,
                "ml2r_cosine_argmax": self.ml2r_cosine_argmax}


def feature_match(P: Tensor, W: Tensor, eps: float = 1e-12) -> FeatureMatch:
    """MMCS and norm-aware ML2R of components P [C, o, n] against the feature matrix W [o, n] (features are
    columns)."""
    P, W = P.detach().double().cpu(), W.detach().double().cpu()
    Wn = W.norm(dim=0)  # (n,)
    cols = P.norm(dim=1)  # (C, n) norm of each component's column j
    dots = torch.einsum("con,on->cn", P, W)  # (C, n)
    cos = dots / (cols * Wn + eps)
    proj = dots / (Wn + eps)  # ⟨P_c[:, j], Ŵ_j⟩
    best = proj.argmax(0)  # (n,)
    idx = torch.arange(W.shape[1])
    ratio = cols[best, idx] / (Wn + eps)
    by_cos = cos.argmax(0)
    return FeatureMatch(float(cos.max(0).values.mean()), float(cos[best, idx].mean()), float(ratio.mean()),
                        best.tolist(), cos[best, idx].tolist(), ratio.tolist(),
                        float((cols[by_cos, idx] / (Wn + eps)).mean()))


def n_large(norms: Tensor, fraction: float = LARGE_FRACTION) -> int:
    """Number of subcomponents whose norm exceeds ``fraction`` × the largest."""
    return int((norms > fraction * norms.max()).sum())


def identity_ci_error(ci: Tensor, tol: float = TOLERANCE) -> int:
    """Distance of ci [n, C] (n ≤ C) from a column permutation of the identity (Hungarian assignment)."""
    from scipy.optimize import linear_sum_assignment

    ci = ci.detach().double().cpu()
    n, C = ci.shape
    if C < n:
        raise ValueError(f"identity_ci_error needs at least as many subcomponents ({C}) as features ({n})")
    _, cols = linear_sum_assignment(-ci.numpy())
    order = list(cols) + sorted(set(range(C)) - set(cols.tolist()))
    perm = ci[:, order]
    diag = torch.diagonal(perm[:, :n])
    off = perm.clone()
    off[torch.arange(n), torch.arange(n)] = 0.0
    return int((off > tol).sum() + (diag < 1 - tol).sum())


def dense_ci_error(ci: Tensor, k: int, tol: float = TOLERANCE) -> int:
    """Distance of ci [N, C] from "exactly k columns active": missing strong entries in the k heaviest columns plus
    entries above ``tol`` in the others (spd-main's ``DenseCIPattern``)."""
    ci = ci.detach().double().cpu()
    order = ci.sum(0).argsort(descending=True)
    s = ci[:, order]
    strong = (s >= 1 - tol).sum(0)
    missing = (1 - strong[:k]).clamp(min=0).sum()
    extra = (s[:, k:] > tol).sum()
    return int(missing + extra)


def alive(ci: Tensor, threshold: float) -> Tensor:
    """[C] bool: importance above ``threshold`` on at least one token of ci [..., C]."""
    return (ci.detach().reshape(-1, ci.shape[-1]) > threshold).any(0)


def ci_l0(ci: Tensor, threshold: float, valid: Tensor | None = None) -> float:
    """Mean number of subcomponents per token above ``threshold``; ci [..., C], valid [...] bool or None."""
    active = (ci.detach() > threshold).sum(-1).double()
    if valid is None:
        return float(active.mean())
    valid = valid.to(active.device)
    return float(active[valid].mean())


def one_hot_importances(decomposition: Any, value: float = ONE_HOT_VALUE) -> dict[str, Tensor]:
    """Importances of every module on the inputs x = value · e_j of a toy target, each [n_features, C]."""
    n = decomposition.target.toy.n_features
    return {k: v.detach().cpu() for k, v in decomposition.importances(value * torch.eye(n)).items()}


def decomposition_metrics(decomposition: Any, n_eval: int = 100_000, thresholds: tuple[float, ...] = (0.1, 0.5),
                          seed: int = 12345) -> dict[str, Any]:
    """Weight-space figures for any decomposition; on a toy target also MMCS/ML2R, one-hot CI patterns, alive
    counts and reconstruction errors on ``n_eval`` held-out samples (drawn with ``seed``, apart from training)."""
    dec = decomposition
    target, model = dec.target, dec.model
    with torch.no_grad():
        out: dict[str, Any] = {"method": dec.method, "faithfulness": float(model.faithfulness(target))}
    per: dict[str, dict[str, Any]] = {}
    for name in target.modules:
        norms = model.norms(name).cpu()
        per[name] = {"C": int(norms.numel()), "n_large": n_large(norms),
                     "largest_norms": [round(float(v), 4) for v in norms.sort(descending=True).values[:10]]}
    out["modules"] = per
    toy = target.toy
    if toy is None:
        return out
    if toy.feature_module is not None:
        W = target.model.get_submodule(toy.feature_module).weight
        fm = feature_match(dec.component_matrices(toy.feature_module), W)
        out.update(fm.to_dict())
    one_hot = one_hot_importances(dec)
    for name, ci in one_hot.items():
        dense_k = (toy.dense_modules or {}).get(name)
        if dense_k is not None:
            per[name]["dense_ci_error"] = dense_ci_error(ci, dense_k)
        else:
            per[name]["identity_ci_error"] = identity_ci_error(ci)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = target.sample(n_eval, gen)
        imps = dec.importances(x)
        for name, ci in imps.items():
            for t in thresholds:
                per[name][f"alive_{t:g}"] = int(alive(ci, t).sum())
            per[name]["ci_l0_0.1"] = ci_l0(ci, 0.1)
        y = target.forward(target.model, x)
        masks = model.eval_masks(target, x)
        out["recon_mse_importance_masked"] = float(target.loss(model.forward_with(target.forward, x, masks), y, x))
        ones = {n: None for n in target.modules}
        out["recon_mse_unmasked"] = float(target.loss(model.forward_with(target.forward, x, ones), y, x))
        zeros = {n: torch.zeros(*x.shape[:-1], model.n_components(n)) for n in target.modules}
        out["recon_mse_all_ablated"] = float(target.loss(model.forward_with(target.forward, x, zeros), y, x))
        out["target_mse_vs_input"] = float((y - x).pow(2).mean()) if y.shape == x.shape else None
        out["active_features_per_sample"] = float((x != 0).sum(-1).double().mean())
    out["n_eval"] = n_eval
    return out


def summary_line(m: dict[str, Any]) -> str:
    """A one-line summary of toy metrics (the bench prints it)."""
    parts = [f"MMCS {m['mmcs']:.5f}", f"ML2R {m['ml2r']:.4f}"] if "mmcs" in m else []
    for name, p in m["modules"].items():
        ci = p.get("identity_ci_error", p.get("dense_ci_error"))
        parts.append(f"{name}: {p['n_large']} large, alive@0.5 {p.get('alive_0.5')}, CI error {ci}")
    return "; ".join(parts)
