"""Step 19 (clusters): group step 17's subcomponents by causal-importance co-activation, ablate each group.

1. Importances of every subcomponent of step 17's decomposition on the evaluation tokens; subcomponents never above
   ``activation_threshold`` are dead and left out; the rest are binarised at it.
2. Greedy MDL merging (``parameter_decomposition.clusters.merge_by_mdl``: spd-main's merge criterion, always the
   cheapest merge, until no merge shortens the description).
3. Each of the ``max_clusters`` largest clusters is ablated (its masks set to 0, every other subcomponent at mask
   1, i.e. the cluster removed from the weights) at all positions; the change in accuracy and answer loss is paired
   over sequences (bootstrap CI).
4. The ``n_top`` clusters with the largest accuracy drop are compared against ``n_random`` random clusters of the
   same size drawn from the alive subcomponents (or, ``random_control="same_modules"``, as many from each matrix):
   permutation p-value (Holm-corrected over the tested clusters), and ablated again at each position class only
   (trigger, value, query/answer, ...), against one random cluster ablated at the same positions.
5. The answer-carrying cluster: the largest drop, if it is at least ``answer_drop`` and beats every random control
   (p < 0.05 after correction) with the random clusters' mean drop at most ``random_max``; otherwise the reading says
   which condition fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mamba_interp.parameter_decomposition.analysis import flat_importances, importances_on, valid_mask
from mamba_interp.parameter_decomposition.clusters import merge_by_mdl, stratified_random_like
from mamba_interp.parameter_decomposition.mamba import ablation_scores, position_classes
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import register_step
from mamba_interp.stats import correct_pvalues, estimate, paired_diff_ci, permutation_pvalue


@dataclass(frozen=True)
class Options:
    n_eval: int = 128
    activation_threshold: float = 0.1
    alpha: float = 1.0
    max_clusters: int = 40
    n_top: int = 3
    n_random: int = 20
    answer_drop: float = 0.5
    random_max: float = 0.1
    random_control: str = "alive"
    """Random clusters of the same size drawn from all alive subcomponents ("alive"), or with the same number
    from each matrix ("same_modules"; when a cluster holds most of a matrix's alive subcomponents, such controls
    nearly repeat the cluster)."""

    def __post_init__(self) -> None:
        for name in ("n_eval", "max_clusters", "n_top", "n_random"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not 0 < self.activation_threshold < 1:
            raise ValueError(f"activation_threshold={self.activation_threshold!r} must be in (0, 1)")
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha!r} must be >= 0")
        if self.random_control not in ("alive", "same_modules"):
            raise ValueError(f"random_control={self.random_control!r} is unknown; use 'alive' or 'same_modules'")


def _ablate(ids: list[tuple[str, int]], members: list[int]) -> dict[str, torch.Tensor]:
    out: dict[str, list[int]] = {}
    for j in members:
        name, c = ids[j]
        out.setdefault(name, []).append(c)
    return {n: torch.tensor(cs) for n, cs in out.items()}


@register_step(19, "clusters", requires=(1, 17), title="Clusters of SPD subcomponents and cluster ablations",
               options=Options, version=1, default=False, reads=("batch_size", "figures"))
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    seed = ctx.seed % 2**31
    dec = ctx.data(17)["decomposition"]
    batch = ctx.data(1)["batch"]
    batch = batch.select(slice(0, min(opts.n_eval, len(batch))))
    imps = importances_on(dec, batch, ctx.batch_size)
    valid = valid_mask(batch)
    flat, all_ids = flat_importances(imps, valid)  # (N, K)
    live = (flat > opts.activation_threshold).any(0).nonzero().flatten().tolist()
    if len(live) < 2:
        from mamba_interp.pipeline.registry import StepSkipped

        raise StepSkipped(f"only {len(live)} subcomponent(s) of step 17 are ever important (> "
                          f"{opts.activation_threshold}); nothing to cluster")
    ids = [all_ids[j] for j in live]
    active = flat[:, live] > opts.activation_threshold  # (N, K_alive)
    merged = merge_by_mdl(active, alpha=opts.alpha)
    groups = merged.groups
    strata_names = list(dict.fromkeys(n for n, _ in ids))
    strata = ([strata_names.index(n) for n, _ in ids] if opts.random_control == "same_modules"
              else [0] * len(ids))

    base = ablation_scores(dec, batch, ctx.batch_size, {})
    evaluated = []
    for g in ctx.progress(groups[: opts.max_clusters], desc="cluster ablations"):
        s = ablation_scores(dec, batch, ctx.batch_size, _ablate(ids, g))
        evaluated.append((g, s))
    drop = lambda s: paired_diff_ci(base["correct"], s["correct"], seed=seed)  # noqa: E731  (positive = worse)
    ranked = sorted(evaluated, key=lambda gs: -float((base["correct"] - gs[1]["correct"]).mean()))
    gen = torch.Generator().manual_seed(seed)
    classes = position_classes(batch)
    top, pvals = [], []
    for g, s in ctx.progress(ranked[: opts.n_top], desc="random controls"):
        observed = drop(s)
        rand_groups = stratified_random_like(g, strata, opts.n_random, gen)
        null = [float((base["correct"] - ablation_scores(dec, batch, ctx.batch_size, _ablate(ids, r))["correct"])
                      .mean()) for r in rand_groups]
        p = permutation_pvalue(observed.value, null, "greater")
        pvals.append(p)
        per_class = {}
        for cls, where in classes.items():
            sc = ablation_scores(dec, batch, ctx.batch_size, _ablate(ids, g), positions=where)
            rc = ablation_scores(dec, batch, ctx.batch_size, _ablate(ids, rand_groups[0]), positions=where)
            per_class[cls] = {"accuracy_drop": drop(sc).to_dict(), "random_accuracy_drop": drop(rc).to_dict(),
                              "loss_increase": paired_diff_ci(sc["loss"], base["loss"], seed=seed).to_dict()}
        top.append({
            "size": len(g), "members": [f"{ids[j][0]}[{ids[j][1]}]" for j in g],
            "by_module": {n: sum(1 for j in g if ids[j][0] == n) for n in strata_names if any(ids[j][0] == n
                                                                                             for j in g)},
            "frequency": float(active[:, g].any(1).double().mean()),
            "accuracy_drop": observed.to_dict(),
            "loss_increase": paired_diff_ci(s["loss"], base["loss"], seed=seed).to_dict(),
            "random_accuracy_drop_mean": float(sum(null) / len(null)), "random_accuracy_drop_max": float(max(null)),
            "p_value": p, "by_position_class": per_class,
        })
    _, corrected = correct_pvalues(pvals, "holm")
    for t, pc in zip(top, corrected):
        t["p_value_holm"] = pc
    best = top[0] if top else None
    answer = None
    why = ""
    if best is not None:
        ok_drop = best["accuracy_drop"]["value"] >= opts.answer_drop
        ok_random = best["random_accuracy_drop_mean"] <= opts.random_max
        ok_p = best["p_value_holm"] < 0.05
        if ok_drop and ok_random and ok_p:
            answer = 0
        else:
            why = "; ".join(msg for ok, msg in (
                (ok_drop, f"the largest drop {best['accuracy_drop']['value']:.3f} is below {opts.answer_drop}"),
                (ok_random, f"random clusters of that size already drop it by "
                            f"{best['random_accuracy_drop_mean']:.3f} on average (> {opts.random_max})"),
                (ok_p, f"it does not beat the random clusters (Holm p = {best['p_value_holm']:.3g})")) if not ok)
    sizes = [len(g) for g in groups]
    metrics: dict[str, Any] = {
        "n_tokens": int(active.shape[0]), "n_subcomponents": len(all_ids), "n_alive": len(live),
        "n_clusters": len(groups), "n_evaluated": len(evaluated), "largest_cluster": max(sizes),
        "singletons": sum(1 for s in sizes if s == 1), "mdl_start": merged.mdl_start, "mdl_end": merged.mdl_end,
        "baseline_accuracy": estimate(base["correct"], seed=seed).to_dict(),
        "all_drops": [{"size": len(g), "accuracy_drop": float((base["correct"] - s["correct"]).mean())}
                      for g, s in ranked],
        "top_clusters": top, "answer_cluster": answer, "answer_cluster_reason": why or None,
    }
    ctx.save_json("clusters", {"members": [[f"{ids[j][0]}[{ids[j][1]}]" for j in g] for g in groups]})
    if ctx.config.figures and top:
        _figures(ctx, metrics)
    return StepResult(metrics=metrics, reading=_reading(metrics, opts), data={"clusters": groups, "ids": ids})


def _reading(m: dict[str, Any], opts: Options) -> str:
    parts = [f"{m['n_alive']} of {m['n_subcomponents']} subcomponents are important (> {opts.activation_threshold}) "
             f"on some of {m['n_tokens']} tokens; MDL merging groups them into {m['n_clusters']} clusters "
             f"(largest {m['largest_cluster']}, {m['singletons']} singletons; description length "
             f"{m['mdl_start']:.2f} -> {m['mdl_end']:.2f} bits per token). Baseline accuracy (every mask 1) "
             f"{m['baseline_accuracy']['value']:.3f}."]
    for i, t in enumerate(m["top_clusters"]):
        d = t["accuracy_drop"]
        mods = ", ".join(f"{k.split('.', 1)[1]} x{v}" for k, v in t["by_module"].items())
        parts.append(f"Cluster {i + 1} ({t['size']} subcomponents: {mods}; active on {t['frequency']:.1%} of "
                     f"tokens): ablating it drops accuracy by {d['value']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}] "
                     f"vs {t['random_accuracy_drop_mean']:.3f} on average (max {t['random_accuracy_drop_max']:.3f}) "
                     f"for {opts.n_random} random clusters of the same size (Holm p = "
                     f"{t['p_value_holm']:.3g}).")
    if m["answer_cluster"] is not None:
        t = m["top_clusters"][m["answer_cluster"]]
        by_cls = {k: v["accuracy_drop"]["value"] for k, v in t["by_position_class"].items()}
        where = max(by_cls, key=by_cls.get)
        parts.append(f"Cluster 1 carries the answer; ablated at one position class only, it matters most at "
                     f"{where} (drop {by_cls[where]:.3f}).")
    elif m["answer_cluster_reason"]:
        parts.append(f"No cluster carries the answer by the step's rule: {m['answer_cluster_reason']}.")
    return " ".join(parts)


def _figures(ctx: StepContext, m: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    ax = axes[0]
    ax.scatter([d["size"] for d in m["all_drops"]], [d["accuracy_drop"] for d in m["all_drops"]], s=14,
               label="clusters")
    for t in m["top_clusters"]:
        ax.errorbar([t["size"]], [t["random_accuracy_drop_mean"]], yerr=[[0], [t["random_accuracy_drop_max"]
                                                                              - t["random_accuracy_drop_mean"]]],
                    fmt="x", color="grey")
    ax.set(xscale="log", xlabel="cluster size (subcomponents)", ylabel="accuracy drop when ablated",
           title="cluster ablations (x: random clusters, mean to max)")
    ax = axes[1]
    t = m["top_clusters"][0]
    cls = list(t["by_position_class"])
    x = np.arange(len(cls))
    ax.bar(x - 0.2, [t["by_position_class"][c]["accuracy_drop"]["value"] for c in cls], 0.4, label="cluster 1")
    ax.bar(x + 0.2, [t["by_position_class"][c]["random_accuracy_drop"]["value"] for c in cls], 0.4,
           label="random, same size")
    ax.set_xticks(x, cls, fontsize=7)
    ax.set(ylabel="accuracy drop", title="cluster 1 ablated at one position class")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "cluster_ablations")
