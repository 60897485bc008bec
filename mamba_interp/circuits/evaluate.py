"""Necessity and sufficiency of a circuit, against random controls, with their statistics.

For a circuit C on a :class:`PatchPair` (``pair.py``): sufficiency (denoise only C), necessity under mean and
resample ablation (fraction of the gap lost, accuracy drop), each with a bootstrap CI over examples; then
``n_random`` random controls of the same layout (``units.random_circuits``) as the null. The test that C matters
more than its random controls is paired over examples: each example's effect of C against the mean effect of the
random controls on that example, by sign flips (``scipy.stats.permutation_test`` via ``mamba_interp.stats``);
the rank of C's mean among the controls' means is reported too (p = (1 + #{null ≥ observed}) / (1 + K)).
The controls may run on a subset of the examples (``null_examples``), with C re-measured on the same subset.
``p_value`` is the larger of the sufficiency and the necessity p-values (both claims must hold).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mamba_interp import stats
from mamba_interp.activation_patching.sites import DEFAULT_HOOKS, hook_layer, resolve_hooks, short_name
from mamba_interp.circuits.pair import PatchPair
from mamba_interp.circuits.search import as_pair
from mamba_interp.circuits.units import Circuit, Unit, random_circuits

NULL_KINDS = ("sufficiency", "resample", "mean")


@dataclass
class CircuitTest:
    """What :func:`evaluate_circuit` measured (``to_dict`` gives the issue's metric record)."""

    name: str
    units: int
    layout: dict[str, int]
    sufficiency: stats.Estimate
    necessity: stats.Estimate
    """Resample ablation with the corrupted partner (the primary necessity)."""
    necessity_mean: stats.Estimate
    accuracy_clean: float
    accuracy_drop: stats.Estimate
    accuracy_drop_mean: stats.Estimate
    n_random: int
    null_examples: int
    """Examples the random controls (and the paired test) ran on."""
    random: dict[str, list[float]]
    """Kind -> the random controls' mean effects."""
    p_values: dict[str, float]
    degenerate_null: bool
    per_example: dict[str, Tensor] = field(repr=False, default_factory=dict)

    @property
    def p_value(self) -> float:
        return max(self.p_values.get("sufficiency", 1.0), self.p_values.get("resample", 1.0))

    def to_dict(self) -> dict[str, Any]:
        rnd = {k: float(np.mean(v)) if v else None for k, v in self.random.items()}
        return {
            "units": self.units, "layout": self.layout,
            "sufficiency": self.sufficiency.value, "sufficiency_ci": list(self.sufficiency.ci),
            "necessity": self.necessity.value, "necessity_ci": list(self.necessity.ci),
            "necessity_mean_ablation": self.necessity_mean.value,
            "necessity_mean_ablation_ci": list(self.necessity_mean.ci),
            "accuracy_clean": self.accuracy_clean,
            "accuracy_drop": self.accuracy_drop.value, "accuracy_drop_ci": list(self.accuracy_drop.ci),
            "accuracy_drop_mean_ablation": self.accuracy_drop_mean.value,
            "p_value": self.p_value, "p_values": dict(self.p_values),
            "random_sufficiency_mean": rnd.get("sufficiency"), "random_necessity_mean": rnd.get("resample"),
            "random_necessity_mean_ablation_mean": rnd.get("mean"),
            "random_sufficiency_max": max(self.random.get("sufficiency") or [float("nan")]),
            "n_random": self.n_random, "null_examples": self.null_examples, "degenerate_null": self.degenerate_null, "n_examples": self.sufficiency.n,
        }


def _est(x: Tensor, seed: int) -> stats.Estimate:
    return stats.estimate(x.double().numpy(), seed=seed)


def evaluate_circuit(
    model_or_pair: Any,
    circuit: Circuit,
    clean: Any = None,
    corrupt: Any = None,
    metric: Any = None,
    *,
    n_random: int = 100,
    null_kinds: tuple[str, ...] = ("sufficiency", "resample"),
    seed: int = 0,
    n_permutations: int = 9999,
    null_examples: int | None = None,
    **pair_kw: Any,
) -> CircuitTest:
    """Sufficiency, necessity (mean and resample ablation), accuracy drops, and ``n_random`` matched random
    controls for the kinds in ``null_kinds`` (module docstring). Works on any model + clean / corrupted
    ``TaskBatch`` pair, or a prepared :class:`PatchPair`.

    ``null_examples``: run the random controls (and the paired test, with the circuit on the same examples) on the
    first ``null_examples`` examples only, to bound the cost of ``n_random`` controls; the circuit's own effects
    and CIs always use every example. None: every example."""
    bad = [k for k in null_kinds if k not in NULL_KINDS]
    if bad:
        raise ValueError(f"null kind {bad[0]!r} is unknown; use {NULL_KINDS}")
    pair = as_pair(model_or_pair, clean, corrupt, metric, **pair_kw)
    suff = pair.sufficiency(circuit)
    nec, ok = pair.necessity(circuit, "resample")
    nec_mean, ok_mean = pair.necessity(circuit, "mean")
    clean_ok = pair.clean_run.metric_values[:, 1]
    observed = {"sufficiency": suff, "resample": nec, "mean": nec_mean}
    null_pair = pair
    if null_examples is not None and null_examples < len(pair):
        null_pair = pair.select(slice(0, null_examples))
        observed = {"sufficiency": null_pair.sufficiency(circuit)}
        observed.update({k: null_pair.necessity(circuit, k)[0] for k in ("resample", "mean") if k in null_kinds})

    controls = random_circuits(circuit, n_random, pair.shapes, seed)
    fixed = all(u.channels is None and u.basis is None for u in circuit.units)
    per_control: dict[str, list[Tensor]] = {k: [] for k in null_kinds}
    for r, control in enumerate(controls):
        for kind in null_kinds:
            if fixed and r > 0:  # every control is the circuit itself
                per_control[kind].append(per_control[kind][0])
            elif kind == "sufficiency":
                per_control[kind].append(null_pair.sufficiency(control))
            else:
                per_control[kind].append(null_pair.necessity(control, kind)[0])
    p_values: dict[str, float] = {}
    random: dict[str, list[float]] = {}
    for kind, values in per_control.items():
        if not values:
            continue
        null = torch.stack(values)  # (K, b)
        random[kind] = null.double().mean(1).tolist()
        paired = stats.paired_permutation_test(observed[kind].double().numpy(), null.double().mean(0).numpy(),
                                               "greater", n_permutations, seed)
        rank = stats.permutation_pvalue(float(observed[kind].double().mean()), random[kind], "greater")
        p_values[kind] = paired
        p_values[f"{kind}_rank"] = rank
    return CircuitTest(
        circuit.name, circuit.size(pair.shapes), circuit.layout(pair.shapes), _est(suff, seed), _est(nec, seed),
        _est(nec_mean, seed), float(clean_ok.mean()),
        stats.paired_diff_ci(clean_ok.numpy(), ok.numpy(), seed=seed),
        stats.paired_diff_ci(clean_ok.numpy(), ok_mean.numpy(), seed=seed), n_random, len(null_pair), random,
        p_values, fixed,
        {"sufficiency": suff, "necessity": nec, "necessity_mean": nec_mean},
    )


def size_curve(pair: PatchPair, ranking: list[Unit], sizes: list[int], n_random: int = 5, seed: int = 0
               ) -> list[dict[str, Any]]:
    """Sufficiency of the first k units of ``ranking`` for each k in ``sizes``, with the mean of ``n_random``
    matched random controls of each prefix."""
    out = []
    for k in sizes:
        prefix = Circuit(f"top{k}", tuple(ranking[:k]))
        est = _est(pair.sufficiency(prefix), seed)
        rnd = [float(pair.sufficiency(c).mean()) for c in random_circuits(prefix, n_random, pair.shapes, seed + k)]
        out.append({"size": prefix.size(pair.shapes), "k": k, "sufficiency": est.value, "ci": list(est.ci),
                    "random_mean": float(np.mean(rnd)) if rnd else None})
    return out


def atp_agreement(pair: PatchPair, hooks: list[str] | None = None, method: str = "atp", top: int = 10,
                  seed: int = 0) -> dict[str, Any]:
    """Attribution patching against exact denoising at every (hook, position class) site (all channels): Spearman
    and Kendall rank correlations, overlap of the top-``top`` sites, and the sites where AtP is most wrong."""
    from scipy import stats as sps

    from mamba_interp.activation_patching import attribution_patch

    names = resolve_hooks(pair.model, hooks if hooks is not None else DEFAULT_HOOKS)
    pair.ensure(names)
    atp = attribution_patch(pair.model, pair.clean.tokens, pair.corrupt.tokens, pair.main_metric, names,
                            method=method, positions=pair.classes, state_mode=pair.state_mode,
                            attention_mask=pair.clean.attention_mask, batch_size=pair.batch_size)
    n = pair.model.cfg.n_layer
    sites = []
    for name in names:
        for p, label in enumerate(pair.classes):
            unit = Circuit("site", (Unit(hook_layer(name, n), short_name(name), label),))
            exact = float(pair.sufficiency(unit).mean())
            sites.append({"hook": name, "position_class": label, "exact": exact,
                          "atp": float(atp.effect[name][p]), "error": float(atp.effect[name][p]) - exact})
    ex = np.array([s["exact"] for s in sites])
    ap = np.array([s["atp"] for s in sites])
    rho = sps.spearmanr(ap, ex).statistic if np.ptp(ex) > 0 and np.ptp(ap) > 0 else float("nan")
    tau = sps.kendalltau(ap, ex).statistic if np.ptp(ex) > 0 and np.ptp(ap) > 0 else float("nan")
    k = min(top, len(sites))
    top_exact = set(np.argsort(-np.abs(ex))[:k])
    top_atp = set(np.argsort(-np.abs(ap))[:k])
    worst = sorted(sites, key=lambda s: -abs(s["error"]))[:k]
    return {"spearman": float(rho), "kendall": float(tau), "n_sites": len(sites), "top_k": k,
            "top_k_overlap": len(top_exact & top_atp) / k if k else float("nan"), "worst": worst, "sites": sites,
            "method": method}

