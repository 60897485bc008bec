"""The figures of step 3 (sae): latent density, loss recovered, training curves, the best |r| per variable and
SAE, the best latent of each variable against it, and the top-activating held-out tokens."""

from __future__ import annotations

import numpy as np

from mamba_interp.pipeline.context import StepContext
from mamba_interp.pipeline.sae_support import MIN_ABLATION_EFFECT, TrainedSAE, fmt_pct


def draw_figures(ctx: StepContext, trained: dict[str, TrainedSAE], per_sae: dict, histories: dict, best: dict,
                 correlations: dict, base_of: dict, features: dict, variables: dict, top: list[dict]) -> None:
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

    # 2. loss with the SAE spliced in vs clean and the two ablations
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(keys) + 2), 3.4), layout="constrained")
    x = np.arange(len(keys))
    kinds = (("clean_loss", "clean"), ("spliced_loss", "SAE spliced"), ("mean_ablation_loss", "mean ablation"),
             ("zero_ablation_loss", "zero ablation"))
    for j, (field_, label) in enumerate(kinds):
        ax.bar(x + (j - 1.5) * 0.2, [per_sae[k][field_] for k in keys], width=0.2, label=label)
    labels = [f"{k}\n{fmt_pct(per_sae[k]['recovered_vs_mean'])} rec." if per_sae[k]["ablation_effect"]
              >= MIN_ABLATION_EFFECT else f"{k}\n(ablation Δ < {MIN_ABLATION_EFFECT})" for k in keys]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set(ylabel="cross-entropy at target positions", title="loss recovered (vs mean ablation)")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "loss_recovered")

    # 3. training curves of every SAE
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), layout="constrained")
    for key, h in histories.items():
        axes[0].plot(h.step, h.fvu, label=key, lw=1)
        axes[1].plot(h.step, h.l0, lw=1)
        axes[2].plot(h.step, h.dead_fraction, lw=1)
    axes[0].set(yscale="log", title="batch FVU", xlabel="step")
    axes[1].set(title="L0", xlabel="step", ylim=(0, 1.1 * max(max(h.l0, default=1.0) for h in histories.values())))
    axes[2].set(title="dead fraction (AuxK window)", xlabel="step")
    axes[0].legend(fontsize=7)
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

    # 6. top-activating examples as a text table
    shown = top[:6]
    lines: list[tuple[str, str]] = []
    for entry in shown:
        lines.append((f"{entry['sae']} latent {entry['latent']}  (best for {entry['variable']}, r = {entry['r']:.2f})",
                      "head"))
        for ex in entry["examples"][:5]:
            ctx_tokens = list(ex["context"])
            ctx_tokens[ex["focus"]] = f"[{ctx_tokens[ex['focus']]}]"
            lines.append((f"   {ex['activation']:7.3f}   seq {ex['sequence']:>4} pos {ex['position']:>3}:   "
                          + " ".join(ctx_tokens), "row"))
    fig = plt.figure(figsize=(9, 0.22 * (len(lines) + 2)))
    fig.text(0.01, 1 - 0.8 / (len(lines) + 2), "top-activating held-out tokens: activation, where, and the context "
             "([the token], the tokens before it)", fontsize=9, style="italic")
    for j, (text, kind) in enumerate(lines):
        fig.text(0.01, 1 - (j + 2) / (len(lines) + 2), text, family="monospace", fontsize=8,
                 weight="bold" if kind == "head" else "normal")
    ctx.save_figure(fig, "top_examples")
