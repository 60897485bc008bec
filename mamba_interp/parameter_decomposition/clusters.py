"""Clusters of subcomponents by causal-importance co-activation, and size-matched random controls.

SPD's subcomponents are rank one and live in one matrix; a mechanism of higher rank, or spanning several matrices,
shows up as a set of subcomponents that are important on the same tokens (SPD paper §3.1 on TMS + identity, §3.3
on the residual MLP's W_out). Grouping follows spd-main's ``spd/clustering`` MDL criterion (derived from the APD
paper's description length): with k groups, group activation frequencies s_g (fraction of tokens where any member is
active) and ranks r_g (number of members), the description length of the activations is

    MDL = Σ_g s_g (log2 k + α r_g)

and merging groups i and j changes it by

    Δ = (s_Σ − s_i − s_j) log2((k−1)/k) + s_{i∪j} log2(k−1) − (s_i + s_j) log2 k
        + α (s_{i∪j}(r_i + r_j) − s_i r_i − s_j r_j).

spd-main samples a pair among those whose Δ is in the lowest 5 % of the range (or by a Metropolis rule) and runs a
fixed number of iterations; here the merge is **greedy and deterministic**: always the pair with the lowest Δ,
stopping when no merge shortens the description (Δ ≥ 0) — the same criterion without its randomness, so one seed
gives one partition. α (bits per rank) is the resolution knob: larger α keeps rarely co-active groups apart.

Index letters: N tokens, K subcomponents (across all matrices), k current groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class MergeResult:
    groups: list[list[int]]
    """Members (column indices of the activation matrix) of each final group, largest first."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One record per merge: the merged groups' sizes, Δ, and the MDL after it."""
    mdl_start: float = 0.0
    mdl_end: float = 0.0


def description_length(active: Tensor, groups: list[list[int]], alpha: float) -> float:
    """MDL of ``active`` [N, K] bool under the partition ``groups`` (brute force, for checks)."""
    k = len(groups)
    if k == 0:
        return 0.0
    bits = math.log2(k) if k > 1 else 0.0
    total = 0.0
    for g in groups:
        s = float(active[:, g].any(1).double().mean())
        total += s * (bits + alpha * len(g))
    return total


def merge_costs(s: Tensor, r: Tensor, s_or: Tensor, alpha: float) -> Tensor:
    """Δ for every pair [k, k] (diagonal +inf) from frequencies s [k], ranks r [k] and OR-frequencies [k, k]."""
    k = s.shape[0]
    if k < 2:
        return torch.full((k, k), math.inf, dtype=torch.float64)
    log_k = math.log2(k)
    log_km1 = math.log2(k - 1) if k > 2 else 0.0
    s_sum = s.sum()
    si, sj = s[:, None], s[None, :]
    ri, rj = r[:, None], r[None, :]
    cost = ((s_sum - si - sj) * (log_km1 - log_k) + s_or * log_km1 - (si + sj) * log_k
            + alpha * (s_or * (ri + rj) - si * ri - sj * rj))
    cost.fill_diagonal_(math.inf)
    return cost


def merge_by_mdl(active: Tensor, alpha: float = 1.0, max_merges: int | None = None) -> MergeResult:
    """Greedy MDL merging of the columns of ``active`` [N, K] (bool: subcomponent important on token)."""
    if active.dim() != 2:
        raise ValueError(f"active must be [tokens, subcomponents], got shape {tuple(active.shape)}")
    if alpha < 0:
        raise ValueError(f"alpha={alpha} must be >= 0")
    M = active.to(torch.float64)  # (N, k) group activations
    n = max(M.shape[0], 1)
    groups = [[j] for j in range(M.shape[1])]
    counts = M.sum(0)  # (k,)
    both = M.T @ M  # (k, k) tokens where both groups are active
    r = torch.ones(len(groups), dtype=torch.float64)
    result = MergeResult(groups, mdl_start=description_length(active, groups, alpha))
    mdl = result.mdl_start
    limit = len(groups) - 1 if max_merges is None else min(max_merges, len(groups) - 1)
    for _ in range(limit):
        s = counts / n
        s_or = (counts[:, None] + counts[None, :] - both) / n
        cost = merge_costs(s, r, s_or, alpha)
        flat = int(cost.argmin())
        i, j = divmod(flat, cost.shape[1])
        delta = float(cost[i, j])
        if not delta < 0:
            break
        i, j = min(i, j), max(i, j)
        new = torch.maximum(M[:, i], M[:, j])  # OR of the two groups
        M[:, i] = new
        groups[i] = groups[i] + groups[j]
        r[i] = r[i] + r[j]
        keep = [t for t in range(M.shape[1]) if t != j]
        M, r = M[:, keep], r[keep]
        del groups[j]
        counts = M.sum(0)
        row = new @ M  # (k,)
        both = both[keep][:, keep]
        both[i, :] = row
        both[:, i] = row
        mdl += delta
        result.history.append({"size": float(r[i]), "delta": delta, "mdl": mdl, "groups": float(len(groups))})
    result.groups = sorted(groups, key=lambda g: (-len(g), g[0]))
    result.mdl_end = mdl
    return result


def stratified_random_like(members: list[int], strata: list[int], n: int, generator: torch.Generator
                           ) -> list[list[int]]:
    """``n`` random groups with the same number of members from each stratum (e.g. each matrix) as ``members``.

    ``strata`` [K]: the stratum of every column. Members are drawn without replacement within each stratum.
    """
    by_stratum: dict[int, list[int]] = {}
    for idx, s in enumerate(strata):
        by_stratum.setdefault(s, []).append(idx)
    need: dict[int, int] = {}
    for m in members:
        need[strata[m]] = need.get(strata[m], 0) + 1
    out = []
    for _ in range(n):
        pick: list[int] = []
        for s, count in sorted(need.items()):
            pool = torch.tensor(by_stratum[s])
            pick += pool[torch.randperm(len(pool), generator=generator)[:count]].tolist()
        out.append(sorted(pick))
    return out
