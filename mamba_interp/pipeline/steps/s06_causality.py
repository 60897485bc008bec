"""Step 6 (causality): necessity and sufficiency of every step-5 circuit on held-out data, against random controls.

For each circuit of step 5, on fresh examples of its dataset (step 1's ``heldout`` for the primary set) and their
corrupted partners (``mamba_interp.circuits.evaluate_circuit``):

* sufficiency: denoise only the circuit (clean → corrupted run), fraction of the metric gap restored;
* necessity: resample-ablate (the corrupted partner's activations) and mean-ablate (clean class means) the
  circuit in the clean run, fraction of the gap lost and accuracy drop;
* bootstrap 95% CIs over examples; ``n_random`` random circuits of the same layout (same number of channels per
  (layer, hook, position class)) as the null, on the first ``null_examples`` examples: a paired sign-flip
  permutation test per kind (the circuit against the controls' mean on each example) and the circuit's rank
  among the controls; ``p_value`` = max of the sufficiency and necessity p-values, Holm-corrected across
  the circuits of a dataset (``correction``);
* on the first ``agreement_samples`` of those examples: the sufficiency-vs-size curve of the AtP ranking
  (top-k prefixes with ``curve_random`` matched random controls each), and AtP against exact patching at every
  (hook, position class) site: Spearman / Kendall rank correlation, top-10 overlap, and the sites where AtP is
  most wrong.

Metrics: ``circuits`` {name: {sufficiency, sufficiency_ci, necessity, necessity_ci, units, p_value,
random_sufficiency_mean, random_necessity_mean, ...}} and ``atp_spearman`` for the primary dataset;
``datasets`` holds the same for every dataset. Files: ``causality.json`` (everything, with the random controls'
means and every site of the agreement), ``per_example.safetensors``; figures ``circuits.png``, ``size_curve.png``,
``atp_vs_exact.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mamba_interp.circuits import PatchPair, Unit, atp_agreement, evaluate_circuit, size_curve
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import StepSkipped, register_step
from mamba_interp.pipeline.steps.s05_circuits import corrupt_partner, fresh_sample
from mamba_interp.stats import correct_pvalues


@dataclass(frozen=True)
class Options:
    n_eval: int | None = None
    """Held-out examples per dataset; None: as many as step 1 sampled (``--samples``)."""
    n_random: int = 100
    """Random control circuits per circuit (the null)."""
    null_examples: int | None = 16
    """Held-out examples the random controls run on (the circuit is re-measured on them for the paired test);
    None: all of them (``n_random`` times the cost of the circuit's own tests)."""
    null_kinds: tuple[str, ...] = ("sufficiency", "resample")
    """Tests run on the random controls too (``mean`` adds mean ablation)."""
    correction: str = "holm"
    """Across the circuits of a dataset: ``holm`` or ``fdr_bh``."""
    alpha: float = 0.01
    agreement_samples: int = 32
    """Examples for the size curve and the AtP-vs-exact comparison (one exact patch per site and class)."""
    curve_random: int = 3
    """Random controls per point of the size curve."""
    n_permutations: int = 9999

    def __post_init__(self) -> None:
        for name in ("n_random", "agreement_samples", "curve_random", "n_permutations"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("n_eval", "null_examples"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 2):
                raise ValueError(f"{name}={v!r} must be an integer >= 2 or null")
        kinds = (self.null_kinds,) if isinstance(self.null_kinds, str) else tuple(self.null_kinds)
        bad = [k for k in kinds if k not in ("sufficiency", "resample", "mean")]
        if bad or not kinds:
            raise ValueError(f"null_kinds={self.null_kinds!r}: use sufficiency, resample, mean")
        object.__setattr__(self, "null_kinds", kinds)
        if self.correction not in ("holm", "fdr_bh"):
            raise ValueError(f"correction={self.correction!r} is unknown; use holm or fdr_bh")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha={self.alpha!r} must be in (0, 1)")


def _curve_sizes(n_ranked: int, n_circuit: int) -> list[int]:
    top = min(n_ranked, max(8, 2 * n_circuit))
    sizes = sorted({min(top, 2 ** i) for i in range(0, int(np.log2(max(top, 1))) + 2)} | {min(n_circuit, top)})
    return [s for s in sizes if s >= 1]


@register_step(6, "causality", requires=(1, 5), title="Necessity and sufficiency of the circuits, with controls",
               options=Options, version=1, reads=("samples", "batch_size", "figures"))
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    circuits = ctx.data(5)["circuits"]
    if not circuits:
        raise StepSkipped("step 5 found no circuits")
    primary = ctx.data(1)["primary"]
    n_eval = opts.n_eval or ctx.config.samples
    per_set: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for i, (name, found) in enumerate(ctx.progress(list(circuits.items()), desc="datasets")):
        held = fresh_sample(ctx, name, n_eval, ctx.seed + 17 * i)
        pair = PatchPair.build(ctx.model, held, corrupt_partner(ctx, name, held, ctx.seed + 17 * i + 1),
                               batch_size=ctx.batch_size)
        tests = {}
        for c in ctx.progress(found, desc=f"{name}: circuits"):
            tests[c.name] = evaluate_circuit(pair, c, n_random=opts.n_random, null_kinds=opts.null_kinds,
                                             seed=ctx.seed + i, n_permutations=opts.n_permutations,
                                             null_examples=opts.null_examples)
        _, adjusted = correct_pvalues([t.p_value for t in tests.values()], opts.correction, opts.alpha)
        records = {}
        for (cname, t), p_adj in zip(tests.items(), adjusted):
            records[cname] = {**t.to_dict(), "p_value_uncorrected": t.p_value, "p_value": p_adj,
                              "significant": p_adj < opts.alpha}
            for kind, values in t.per_example.items():
                tensors[f"{name}/{cname}/{kind}"] = values
        sub_pair = pair.select(slice(0, min(opts.agreement_samples, len(pair))))
        atp = next((c for c in found if c.name == "atp"), None)
        curve = []
        if atp is not None and atp.info.get("ranking"):
            ranking = [Unit.from_dict(u) for u in atp.info["ranking"]]
            sizes = _curve_sizes(len(ranking), atp.size(pair.shapes))
            curve = size_curve(sub_pair, ranking, sizes, opts.curve_random, ctx.seed)
        agreement = atp_agreement(sub_pair)
        per_set[name] = {"examples": len(pair), "clean_metric": float(pair.clean_values.mean()),
                         "corrupt_metric": float(pair.corrupt_values.mean()), "clean_accuracy": pair.clean_accuracy,
                         "metric": pair.main_metric.name, "circuits": records, "size_curve": curve,
                         "agreement": agreement}
    ctx.save_json("causality", per_set)
    ctx.save_tensors("per_example", tensors)
    if ctx.config.figures:
        _figures(ctx, per_set)
    main = per_set.get(primary) or next(iter(per_set.values()))
    ag = main["agreement"]
    metrics = {
        "circuits": main["circuits"], "atp_spearman": ag["spearman"], "atp_kendall": ag["kendall"],
        "atp_top_k_overlap": ag["top_k_overlap"], "atp_most_wrong": ag["worst"][:5],
        "size_curve": main["size_curve"], "examples": main["examples"], "correction": opts.correction,
        "datasets": {k: {kk: vv for kk, vv in v.items() if kk != "agreement"} | {
            "atp_spearman": v["agreement"]["spearman"]} for k, v in per_set.items()},
    }
    return StepResult(metrics=metrics, reading=_reading(per_set, opts))


def _reading(per_set: dict, opts: Options) -> str:
    parts = []
    for name, m in per_set.items():
        parts.append(f"{name} ({m['examples']} held-out examples, {m['metric']}):")
        for cname, r in m["circuits"].items():
            sc, nc = r["sufficiency_ci"], r["necessity_ci"]
            parts.append(
                f"{cname} ({r['units']} units) restores {r['sufficiency']:.3f} [{sc[0]:.3f}, {sc[1]:.3f}] of the gap "
                f"when patched alone and loses {r['necessity']:.3f} [{nc[0]:.3f}, {nc[1]:.3f}] when resample-ablated "
                f"({r['necessity_mean_ablation']:.3f} mean-ablated; accuracy drop {r['accuracy_drop']:.3f}); "
                f"{r['n_random']} random circuits of the same layout (on {r['null_examples']} examples) restore "
                f"{r['random_sufficiency_mean']:.3f} on average (max {r['random_sufficiency_max']:.3f}) and lose "
                f"{r['random_necessity_mean']:.3f}; p = {r['p_value']:.2g} ({opts.correction})"
                + (" — the controls equal the circuit (all channels of each site), so the test cannot reject."
                   if r["degenerate_null"] else ".")
            )
        ag = m["agreement"]
        worst = ag["worst"][0] if ag["worst"] else None
        parts.append(
            f"AtP vs exact patching over {ag['n_sites']} (hook, position class) sites: Spearman "
            f"{ag['spearman']:.3f}, top-{ag['top_k']} overlap {ag['top_k_overlap']:.2f}"
            + (f"; most wrong at {worst['hook']} @{worst['position_class']} (AtP {worst['atp']:.3f}, exact "
               f"{worst['exact']:.3f})." if worst else ".")
        )
    return " ".join(parts)


def _figures(ctx: StepContext, per_set: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, m in per_set.items():
        recs = m["circuits"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
        for ax, key, rkey, title in ((axes[0], "sufficiency", "random_sufficiency_mean", "sufficiency (denoise)"),
                                     (axes[1], "necessity", "random_necessity_mean", "necessity (resample)")):
            names = list(recs)
            vals = [recs[c][key] for c in names]
            lo = [recs[c][key] - recs[c][f"{key}_ci"][0] for c in names]
            hi = [recs[c][f"{key}_ci"][1] - recs[c][key] for c in names]
            x = np.arange(len(names))
            ax.bar(x, vals, yerr=[lo, hi], color="tab:blue", label="circuit (95% CI)")
            ax.scatter(x, [recs[c][rkey] if recs[c][rkey] is not None else np.nan for c in names], color="tab:red",
                       zorder=3, label="random controls (mean)")
            ax.set_xticks(x, [f"{c}\n({recs[c]['units']})" for c in names], fontsize=7)
            ax.set(title=f"{name}: {title}", ylabel="fraction of the gap")
            ax.axhline(0, color="grey", lw=0.8)
            ax.legend(fontsize=7)
        ctx.save_figure(fig, f"circuits_{name}" if len(per_set) > 1 else "circuits")
        if m["size_curve"]:
            fig, ax = plt.subplots(figsize=(5.5, 3.6), layout="constrained")
            c = m["size_curve"]
            ax.errorbar([p["size"] for p in c], [p["sufficiency"] for p in c],
                        yerr=[[p["sufficiency"] - p["ci"][0] for p in c], [p["ci"][1] - p["sufficiency"] for p in c]],
                        marker="o", label="top-k by AtP")
            ax.plot([p["size"] for p in c], [p["random_mean"] for p in c], "s--", color="tab:red",
                    label="random, same layout")
            ax.set(xscale="log", xlabel="units", ylabel="sufficiency", title=f"{name}: sufficiency vs size")
            ax.legend(fontsize=7)
            ctx.save_figure(fig, f"size_curve_{name}" if len(per_set) > 1 else "size_curve")
        sites = m["agreement"]["sites"]
        fig, ax = plt.subplots(figsize=(5, 4.2), layout="constrained")
        ex, ap = [s["exact"] for s in sites], [s["atp"] for s in sites]
        ax.scatter(ex, ap, s=12)
        lim = [min(ex + ap + [0]), max(ex + ap + [1])]
        ax.plot(lim, lim, color="grey", lw=0.8, ls="--")
        for s in m["agreement"]["worst"][:4]:
            ax.annotate(f"{s['hook'].replace('blocks.', 'L').replace('.mixer', '')} @{s['position_class']}",
                        (s["exact"], s["atp"]), fontsize=6)
        ax.set(xlabel="exact denoising effect", ylabel="AtP estimate",
               title=f"{name}: AtP vs exact (Spearman {m['agreement']['spearman']:.2f})")
        ctx.save_figure(fig, f"atp_vs_exact_{name}" if len(per_set) > 1 else "atp_vs_exact")
