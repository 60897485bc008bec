"""The figures of step 3 (sae): latent density, loss recovered, training curves, the best |r| per variable and
SAE, and the best latent of each variable against it. (The top-activating contexts are in the report's feature
dashboards.)"""

from __future__ import annotations

import numpy as np

from mamba_interp.pipeline.context import StepContext
from mamba_interp.pipeline.sae_support import MIN_ABLATION_EFFECT, TrainedSAE, fmt_pct


def draw_figures(ctx: StepContext, trained: dict[str, TrainedSAE], per_sae: dict, histories: dict, best: dict,
                 correlations: dict, base_of: dict, features: dict, variables: dict, architecture: str) -> None:
    """Draw step 3's figures into its folder (``ctx.save_figure``) from the numbers the step measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mamba_interp.sparse_autoencoder.plots import DENSITY_FLOOR

    keys = list(trained)
    # 1. latent density histograms, one panel per SAE
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False, layout="constrained")
    bins = np.linspace(np.log10(DENSITY_FLOOR), 0.0, 61)
    for ax, key in zip(axes.flat, keys):
        d = trained[key].density.double().numpy()
        ax.hist(np.log10(d + DENSITY_FLOOR), bins=bins, color="tab:blue")
        ax.axvline(-1, color="k", ls="--", lw=0.8)
        ax.set_title(f"{key}: dead {int((d == 0).sum())}, dense {int((d > 0.1).sum())} of {d.size}", fontsize=8)
        ax.set_xlabel("log10(firing frequency + 1e-10)", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    ctx.save_figure(fig, "feature_density")

    # 2. loss recovered: the losses on a log axis (clean and spliced are often ~1e-3 of the ablations), and the
    # recovered fraction against each ablation
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(9.0, 2.0 * len(keys) + 3), 3.6), layout="constrained")
    x = np.arange(len(keys))
    kinds = (("clean_loss", "clean"), ("spliced_loss", "SAE spliced"), ("mean_ablation_loss", "mean ablation"),
             ("zero_ablation_loss", "zero ablation"))
    for j, (field_, label) in enumerate(kinds):
        ax.bar(x + (j - 1.5) * 0.2, [max(per_sae[k][field_], 1e-6) for k in keys], width=0.2, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, keys, fontsize=7, rotation=20)
    ax.set(ylabel="cross-entropy at target positions (log)", title="loss with the activation replaced")
    ax.legend(fontsize=7)
    informative = [per_sae[k]["ablation_effect"] >= MIN_ABLATION_EFFECT for k in keys]
    for j, (field_, label) in enumerate((("recovered_vs_mean", "vs mean ablation"),
                                         ("recovered_vs_zero", "vs zero ablation"))):
        vals = [per_sae[k][field_] if ok else 0.0 for k, ok in zip(keys, informative)]
        ax2.bar(x + (j - 0.5) * 0.35, vals, width=0.35, label=label)
    shown = [per_sae[k][f] for k, ok in zip(keys, informative) if ok for f in ("recovered_vs_mean",
                                                                             "recovered_vs_zero")]
    top = max([1.0, *shown]) + 0.15
    for i, (k, ok) in enumerate(zip(keys, informative)):
        text = fmt_pct(per_sae[k]["recovered_vs_mean"]) if ok else f"ablation Δ < {MIN_ABLATION_EFFECT}"
        ax2.text(i, max(per_sae[k]["recovered_vs_mean"], 0.0) + 0.03 if ok else 0.02, text, ha="center",
                 fontsize=7, rotation=0 if ok else 90, va="bottom")
    ax2.axhline(1.0, color="k", lw=0.8, ls="--")
    ax2.set_xticks(x, keys, fontsize=7, rotation=20)
    ax2.set(ylim=(min([0.0, *shown]) - 0.05, top), ylabel="fraction of the loss recovered",
            title="loss recovered by the SAE (1 = as good as clean)")
    ax2.legend(fontsize=7, loc="lower right")
    ctx.save_figure(fig, "loss_recovered")

    # 3. training curves of every SAE; TopK and BatchTopK hold L0 at k by construction, so no L0 panel for them
    fixed_l0 = architecture in ("topk", "batchtopk")
    panels = ("fvu", "dead") if fixed_l0 else ("fvu", "l0", "dead")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.2), layout="constrained")
    ax_of = dict(zip(panels, axes))
    for key, h in histories.items():
        ax_of["fvu"].plot(h.step, h.fvu, label=key, lw=1)
        ax_of["dead"].plot(h.step, h.dead_fraction, lw=1)
        if not fixed_l0:
            ax_of["l0"].plot(h.step, h.l0, lw=1)
    ax_of["fvu"].set(yscale="log", title="batch FVU", xlabel="step")
    ax_of["dead"].set(title="dead fraction (AuxK window)" if fixed_l0 else "dead fraction", xlabel="step")
    if not fixed_l0:
        ax_of["l0"].set(title="L0", xlabel="step",
                        ylim=(0, 1.1 * max(max(h.l0, default=1.0) for h in histories.values())))
    ax_of["fvu"].legend(fontsize=7)
    ctx.save_figure(fig, "training_curves")

    if not best:
        return
    # 4. best |r| per (variable, SAE)
    var_names = list(best)
    grid = np.zeros((len(var_names), len(keys)))
    for c, key in enumerate(keys):
        for rec in correlations[key]:
            r = var_names.index(base_of[rec["variable"]])
            grid[r, c] = max(grid[r, c], rec["abs_r"])
    fig, ax = plt.subplots(figsize=(1.0 * len(keys) + 3, 0.35 * len(var_names) + 1.6), layout="constrained")
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(var_names)), var_names, fontsize=8)
    ax.set_title("best |r| of any latent with each variable (any class)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ctx.save_figure(fig, "correlation_heatmap")

    # 5. the best latent of each variable against the variable (held-out tokens, subsampled)
    cols = min(4, len(var_names))
    rows = -(-len(var_names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    gen = np.random.default_rng(0)
    for ax, var in zip(axes.flat, var_names):
        b = best[var]
        v = variables[b["variable"]].numpy()
        a = features[b["sae"]][:, b["latent"]].double().numpy()
        ok = np.flatnonzero(np.isfinite(v))
        if ok.size > 3000:
            ok = np.sort(gen.choice(ok, 3000, replace=False))
        binary = set(np.unique(v[ok]).tolist()) <= {0.0, 1.0}
        jitter = (0.08 if binary else 0.01 * (np.std(v[ok]) or 1.0)) * gen.standard_normal(ok.size)
        ax.scatter(v[ok] + jitter, a[ok], s=3, alpha=0.35)
        ax.set_title(f"{b['variable']}: {b['sae']} #{b['latent']}\nr = {b['r']:.2f} "
                     f"(shuffled {b['shuffled_best_abs_r']:.2f})", fontsize=8)
        ax.set_xlabel(b["variable"], fontsize=8)
        ax.set_ylabel("latent activation", fontsize=8)
    for ax in list(axes.flat)[len(var_names):]:
        ax.axis("off")
    ctx.save_figure(fig, "feature_variable_matches")
