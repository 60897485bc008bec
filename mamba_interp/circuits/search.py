"""Candidate circuits: grown greedily by attribution, pruned by real patching (ACDC-style on a coarse graph).

1. **Scores**: attribution patching (AtP, or its integrated-gradients variant) of every unit
   (layer, hook, position class, channel) in one backward pass (``activation_patching.attribution_patch``).
2. **Growth**: the units in order of decreasing score; the smallest prefix whose joint denoising patch restores
   ≥ ``threshold`` of the metric gap is found by doubling, then bisection (a handful of real patches).
3. **Pruning** (after ACDC, Conmy et al. 2023, arXiv 2304.14997: visit the graph from the output backwards and
   remove every component whose removal keeps the metric): whole sites first, latest hook first; then within
   each remaining site the largest block of lowest-scored channels whose removal keeps ≥ ``threshold``
   (bisection); then, for small circuits, single channels. Every test is a real joint patch.

The result is small and sufficient on the batch it was found on; evaluate it on held-out data (``evaluate``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mamba_interp.activation_patching import attribution_patch
from mamba_interp.activation_patching.sites import DEFAULT_HOOKS, hook_layer, resolve_hooks, short_name
from mamba_interp.circuits.pair import PatchPair
from mamba_interp.circuits.units import Circuit, Unit


def as_pair(model_or_pair: Any, clean: Any = None, corrupt: Any = None, metric: Any = None, **kw: Any) -> PatchPair:
    """A :class:`PatchPair` as given, or built from a model and a clean / corrupted ``TaskBatch`` pair."""
    if isinstance(model_or_pair, PatchPair):
        return model_or_pair
    if clean is None or corrupt is None:
        raise ValueError("pass a PatchPair, or a model with clean= and corrupt= TaskBatches")
    return PatchPair.build(model_or_pair, clean, corrupt, metric, **kw)


def unit_scores(pair: PatchPair, hooks: Sequence[str] | None = None, method: str = "atp", steps: int = 5
                ) -> list[tuple[float, Unit]]:
    """(normalised first-order effect, single-channel unit) for every channel of every hook and position class,
    best first."""
    names = resolve_hooks(pair.model, hooks if hooks is not None else DEFAULT_HOOKS)
    labels = list(pair.classes)
    res = attribution_patch(pair.model, pair.clean.tokens, pair.corrupt.tokens, pair.main_metric, names, method=method,
                            steps=steps, positions=pair.classes, per_channel=True, state_mode=pair.state_mode,
                            attention_mask=pair.clean.attention_mask, batch_size=pair.batch_size)
    n = pair.model.cfg.n_layer
    out = []
    for name, eff in res.effect.items():
        layer = hook_layer(name, n)
        for p, label in enumerate(labels):
            for c, v in enumerate(eff[p].tolist()):
                out.append((v, Unit(layer, short_name(name), label, (c,))))
    out.sort(key=lambda t: -t[0])
    return out


def _topo_key(pair: PatchPair) -> Callable[[tuple], tuple]:
    order = {name: i for i, name in enumerate(pair.model.hook_dict)}
    return lambda site: (order[Unit(site[0], site[1], site[2]).hook_name], site[2])


def find_circuit(
    model_or_pair: Any,
    clean: Any = None,
    corrupt: Any = None,
    metric: Any = None,
    *,
    hooks: Sequence[str] | None = None,
    threshold: float = 0.9,
    method: str = "atp",
    steps: int = 5,
    max_evals: int = 150,
    single_pass_max: int = 32,
    name: str = "atp",
    **pair_kw: Any,
) -> Circuit:
    """The smallest set of units, grown by attribution and pruned by patching, whose joint denoising patch
    restores ≥ ``threshold`` of the metric gap (module docstring). ``max_evals`` caps the real patches.

    ``circuit.info``: ``sufficiency`` (on this batch), ``reached`` (threshold met), ``growth`` ([size, sufficiency]
    pairs tried), ``evaluations``, ``ranking`` (the first 256 scored units, for size curves), ``scores``.
    """
    pair = as_pair(model_or_pair, clean, corrupt, metric, **pair_kw)
    ranked = unit_scores(pair, hooks, method, steps)
    positive = [(s, u) for s, u in ranked if s > 0]
    evals = [0]

    def suff(units: Sequence[Unit]) -> float:
        evals[0] += 1
        return float(pair.sufficiency(Circuit("probe", tuple(units))).mean()) if units else 0.0

    units = [u for _, u in positive]
    growth: list[list[float]] = []
    lo, hi, best = 0, None, None
    k = 1
    while units:  # doubling
        k = min(k, len(units))
        value = suff(units[:k])
        growth.append([k, value])
        if value >= threshold:
            hi, best = k, value
            break
        lo = k
        if k == len(units):
            break
        k *= 2
    reached = hi is not None
    if not reached:
        hi, best = len(units), (growth[-1][1] if growth else 0.0)
    while reached and hi - lo > 1 and evals[0] < max_evals:  # bisection
        mid = (lo + hi) // 2
        value = suff(units[:mid])
        growth.append([mid, value])
        if value >= threshold:
            hi, best = mid, value
        else:
            lo = mid
    kept = units[:hi]
    score = {u: s for s, u in positive}
    if reached:
        kept, best = _prune(pair, kept, score, threshold, best, suff, evals, max_evals, single_pass_max)
    info = {
        "threshold": threshold, "reached": reached, "sufficiency": best, "growth": growth,
        "evaluations": evals[0], "method": method, "n_scored_units": len(ranked),
        "ranking": [u.to_dict() for _, u in ranked[:256]], "scores": [s for s, _ in ranked[:256]],
    }
    return Circuit(name, tuple(kept), "atp" if method == "atp" else "atp-ig", info)


def _prune(pair: PatchPair, kept: list[Unit], score: dict, threshold: float, best: float, suff: Callable,
           evals: list[int], max_evals: int, single_pass_max: int) -> tuple[list[Unit], float]:
    key = _topo_key(pair)
    sites = sorted({u.site for u in kept}, key=key, reverse=True)  # from the output backwards
    for site in sites:  # whole sites
        if evals[0] >= max_evals or len({u.site for u in kept}) == 1:
            break
        trial = [u for u in kept if u.site != site]
        value = suff(trial)
        if value >= threshold:
            kept, best = trial, value
    for site in sorted({u.site for u in kept}, key=key, reverse=True):  # lowest-scored channels of each site
        here = sorted((u for u in kept if u.site == site), key=lambda u: score[u])
        lo, hi = 0, len(here)  # removable count lies in [lo, hi)
        while hi - lo > 1 and evals[0] < max_evals:
            mid = (lo + hi) // 2
            drop = set(here[:mid])
            trial = [u for u in kept if u not in drop]
            value = suff(trial)
            if value >= threshold:
                lo, best = mid, value
            else:
                hi = mid
        if lo:
            drop = set(here[:lo])
            kept = [u for u in kept if u not in drop]
    if len(kept) <= single_pass_max:  # single channels, least important first
        for u in sorted(kept, key=lambda u: score[u]):
            if evals[0] >= max_evals or len(kept) == 1:
                break
            trial = [v for v in kept if v != u]
            value = suff(trial)
            if value >= threshold:
                kept, best = trial, value
    return kept, best
