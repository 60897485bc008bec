"""Step 16 (probe_report): every probe of step 4 in figures, and a reading of its strongest and weakest findings.

Figures (from step 4's data, so a resumed run redraws them from ``probes.json``):

* ``score_heatmap.png`` — held-out score per variable × (layer, hook), one panel per probe method;
* ``selectivity_heatmap.png`` — selectivity (score − control-task score) in the same layout;
* ``sparsity_curves.png`` — held-out score of k-sparse probes against k at each variable's best (layer, hook),
  with 95% CIs and the dense probe's score there;
* ``support_overlap.png`` — Jaccard overlap of each other method's top-k dimensions with the k-sparse support;
* ``state_map.png`` — per stored variable, layer × channel (Mamba-1) or head (Mamba-2) importance from the state
  probes, the confirmed top units marked;
* ``amnesic.png`` — model accuracy clean, with the variable erased at its best probe's hook, and with permuted
  labels of the same rank erased;
* ``head_scores.png`` (Mamba-2) — per-head probe scores of the per-head hooks.

A "finding" is one variable's best probe; its strength is the lower end of the CI of its selectivity (of its
score above chance when it has no control). The reading names the strongest and weakest, the largest and smallest
amnesic effects, and the state probe with the largest margin over random units.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import StepSkipped, register_step


def _cells(report: Any) -> list[tuple[int, str]]:
    return list(dict.fromkeys((r.layer, r.hook) for r in report.records))


def _grid(report: Any, method: str, field: str) -> tuple[list[str], list[tuple[int, str]], np.ndarray]:
    variables = list(report.variables)
    cells = _cells(report)
    grid = np.full((len(variables), len(cells)), np.nan)
    for r in report.records:
        if r.method != method or r.variable not in variables:
            continue
        value = r.score.value if field == "score" else (None if r.selectivity is None else r.selectivity.value)
        if value is not None:
            grid[variables.index(r.variable), cells.index((r.layer, r.hook))] = value
    return variables, cells, grid


def finding_strength(row: dict, task: str) -> float:
    """Lower CI end of the selectivity, else of the score above chance."""
    if row.get("selectivity_ci") is not None:
        return float(row["selectivity_ci"][0])
    return float(row["score_ci"][0]) - (0.5 if task == "classification" else 0.0)


@register_step(16, "probe_report", requires=(4,), title="Probe report: scores, selectivity, sparsity, states, erasure",
               version=1)
def run(ctx: StepContext) -> StepResult:
    d = ctx.data(4)
    report = d["report"]
    if not report.records:
        raise StepSkipped("step 4 fitted no probe")
    if ctx.config.figures:
        _figures(ctx, report, d)
    best, amnesic = d["best"], d["amnesic"]
    strength = {v: finding_strength(b, report.variables[v]["task"]) for v, b in best.items()}
    metrics: dict[str, Any] = {"finding_strength": strength}
    if strength:
        metrics["strongest"] = max(strength, key=strength.get)
        metrics["weakest"] = min(strength, key=strength.get)
    effects = {v: a["erased"]["example_accuracy_change"]["value"] - a["control"]["example_accuracy_change"]["value"]
               for v, a in amnesic.items()}
    if effects:
        metrics["amnesic_margin"] = effects
    return StepResult(metrics=metrics, reading=_reading(report, d, strength, effects))


def _ci(v: float, ci: Any) -> str:
    return f"{v:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _describe(v: str, b: dict) -> str:
    sel = "" if b["selectivity"] is None else f", selectivity {_ci(b['selectivity'], b['selectivity_ci'])}"
    return (f"{v} ({b['method']}, k={b['k']}, layer {b['layer']} {b['hook']}: score {_ci(b['score'], b['score_ci'])}"
            f"{sel})")


def _reading(report: Any, d: dict, strength: dict, effects: dict) -> str:
    best, amnesic = d["best"], d["amnesic"]
    parts = [f"{len(report.records)} probes of {len(report.variables)} variables at {len(_cells(report))} "
             f"(layer, hook) sites."]
    if strength:
        hi, lo = max(strength, key=strength.get), min(strength, key=strength.get)
        parts.append(f"Strongest finding: {_describe(hi, best[hi])}. Weakest: {_describe(lo, best[lo])}.")
    if effects:
        hi, lo = max(effects, key=lambda v: -effects[v]), max(effects, key=lambda v: effects[v])

        def eff(v: str) -> str:
            a = amnesic[v]
            e, c = a["erased"]["example_accuracy_change"], a["control"]["example_accuracy_change"]
            return (f"erasing {v} at layer {a['layer']} {a['hook']} changes accuracy by {_ci(e['value'], e['ci'])} "
                    f"(permuted labels, same rank {a['rank']}: {_ci(c['value'], c['ci'])})")

        parts.append(f"Largest amnesic effect: {eff(hi)}. Smallest: {eff(lo)}.")
    margins = [(sp.top_score.value - max(sp.random_scores), v, layer, sp) for v, by in d["state_details"].items()
               for layer, sp in by.items()]
    if margins:
        m, v, layer, sp = max(margins, key=lambda t: t[0])
        parts.append(f"State probes: {v} is held by layer {layer}'s {sp.unit}s {sp.top} (together "
                     f"{_ci(sp.top_score.value, sp.top_score.ci)}, {m:+.2f} above the best of "
                     f"{len(sp.random_scores)} random sets of as many {sp.unit}s).")
    return " ".join(parts)


# ---- figures -------------------------------------------------------------------------------------------
def _heatmaps(ctx: StepContext, report: Any, field: str, name: str, title: str, vmin: float, cmap: str) -> None:
    import matplotlib.pyplot as plt

    methods = list(report.methods)
    variables, cells = list(report.variables), _cells(report)
    fig, axes = plt.subplots(1, len(methods), figsize=(0.55 * len(cells) * len(methods) + 3, 0.42 * len(variables) + 2),
                             squeeze=False, layout="constrained")
    for ax, method in zip(axes[0], methods):
        _, _, grid = _grid(report, method, field)
        im = ax.imshow(grid, vmin=vmin, vmax=1.0, cmap=cmap, aspect="auto")
        for (r, c), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="w" if (v - vmin) / (1 - vmin) < 0.6 else "k")
        ax.set_xticks(range(len(cells)), [f"L{i} {h}" for i, h in cells], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(variables)), variables, fontsize=8)
        ax.set_title(f"{title}: {method}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    ctx.save_figure(fig, name)


def _figures(ctx: StepContext, report: Any, d: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _heatmaps(ctx, report, "score", "score_heatmap", "held-out score (balanced acc. / R²)", 0.0, "viridis")
    _heatmaps(ctx, report, "selectivity", "selectivity_heatmap", "selectivity", -0.5, "RdBu_r")

    # sparsity curves at each variable's best (layer, hook)
    curves = {}
    for v in report.variables:
        if report.for_variable(v):
            b = report.best(v)
            if (v, b.layer, b.hook) in report.curves:
                curves[v] = ((v, b.layer, b.hook), report.curves[(v, b.layer, b.hook)])
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
        for v, ((_, layer, hook), c) in curves.items():
            ks = sorted(c)
            vals = np.array([c[k].value for k in ks])
            lo, hi = np.array([c[k].ci_low for k in ks]), np.array([c[k].ci_high for k in ks])
            (line,) = ax.plot(ks, vals, marker="o", ms=3, label=f"{v} (L{layer} {hook})")
            ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.15)
            dense = [r for r in report.records if (r.variable, r.layer, r.hook) == (v, layer, hook)
                     and r.method != "ksparse"]
            if dense:
                top = max(dense, key=lambda r: r.score.value)
                ax.axhline(top.score.value, color=line.get_color(), ls=":", lw=0.9)
        ax.set(xscale="log", xlabel="k (dimensions)", ylabel="held-out score",
               title="k-sparse probes (dotted: best other probe at the same site)")
        ax.legend(fontsize=7)
        ctx.save_figure(fig, "sparsity_curves")

    # support overlap of the other methods with the k-sparse support
    others = [m for m in report.methods if m != "ksparse"]
    if "ksparse" in report.methods and others:
        variables, cells = list(report.variables), _cells(report)
        fig, axes = plt.subplots(1, len(others), figsize=(0.55 * len(cells) * len(others) + 3,
                                                         0.42 * len(variables) + 2), squeeze=False,
                                 layout="constrained")
        for ax, method in zip(axes[0], others):
            grid = np.full((len(variables), len(cells)), np.nan)
            for r_, v in enumerate(variables):
                for c_, (layer, hook) in enumerate(cells):
                    grid[r_, c_] = report.support_overlap(v, layer, hook).get(method, np.nan)
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto")
            ax.set_xticks(range(len(cells)), [f"L{i} {h}" for i, h in cells], rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(variables)), variables, fontsize=8)
            ax.set_title(f"Jaccard(top-{report.k} of {method}, k-sparse support)", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.04)
        ctx.save_figure(fig, "support_overlap")

    # state-probe map
    states = {v: by for v, by in d["state_details"].items() if by}
    if states:
        fig, axes = plt.subplots(len(states), 1, figsize=(11, 1.2 + 0.5 * max(len(by) for by in states.values())
                                                         * len(states)), squeeze=False, layout="constrained")
        for ax, (v, by) in zip(axes[:, 0], states.items()):
            layers = sorted(by)
            grid = np.array([by[i].importance for i in layers])
            im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            for r_, i in enumerate(layers):
                ax.scatter(by[i].top, [r_] * len(by[i].top), marker="v", s=14, color="red")
            unit = by[layers[0]].unit
            ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
            ax.set(xlabel=unit, title=f"{v}: held-out score of a probe on each {unit}'s state (red: top set)")
            fig.colorbar(im, ax=ax, fraction=0.02)
        ctx.save_figure(fig, "state_map")

    # amnesic tests
    amnesic = d["amnesic"]
    if amnesic:
        names = list(amnesic)
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 3.6), layout="constrained")
        x = np.arange(len(names))
        for j, (kind, label) in enumerate((("clean", "clean"), ("erased", "variable erased"),
                                           ("control", "permuted labels erased"))):
            vals, err = [], []
            for v in names:
                a = amnesic[v]
                if kind == "clean":
                    vals.append(a["erased"]["clean_accuracy"])
                    err.append((0.0, 0.0))
                else:
                    e = a[kind]["example_accuracy_change"]
                    vals.append(a[kind]["erased_accuracy"])
                    err.append((max(0.0, e["value"] - e["ci"][0]), max(0.0, e["ci"][1] - e["value"])))
            ax.bar(x + (j - 1) * 0.27, vals, width=0.27, yerr=np.array(err).T, capsize=2, label=label)
        ax.set_xticks(x, [f"{v}\nL{amnesic[v]['layer']} {amnesic[v]['hook']}" for v in names], fontsize=7)
        ax.set(ylabel="model accuracy", ylim=(0, 1.05), title="amnesic test of each variable's best probe (LEACE)")
        ax.legend(fontsize=7)
        ctx.save_figure(fig, "amnesic")

    if report.head_scores:
        keys = list(report.head_scores)
        grid = np.array([report.head_scores[k] for k in keys])
        fig, ax = plt.subplots(figsize=(9, 0.3 * len(keys) + 1.5), layout="constrained")
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(keys)), [f"{v} L{i} {h}" for v, i, h in keys], fontsize=7)
        ax.set(xlabel="head", title="held-out score of a probe on each head alone")
        fig.colorbar(im, ax=ax, fraction=0.03)
        ctx.save_figure(fig, "head_scores")
