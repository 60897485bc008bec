"""Step 2 (activations): collect activations at the chosen layers and hooks; baseline statistics per layer/hook.

Statistics and their sources are described in ``pipeline/activation_stats.py``; they stream over chunks of
sequences, one (layer, hook) at a time. Outputs in the step folder: the activations, either
``activations.safetensors`` (in-memory store: every collected hook, [b, l, k] float32, plus ``mask``;
``ActivationSet.load`` reads it) or ``activations/`` (disk store, ``--activation-store disk`` or ``auto`` for runs
too large to hold: one file per (layer, hook), written as collected; ``pipeline/activation_store.py``),
``stats.safetensors`` (per-dimension arrays: ``<hook name>.rms`` etc., Δ quantiles per channel),
and the figures ``stats_heatmap.png``, ``channel_rms.png``, ``distributions.png``, ``delta.png``,
``state_norm.png``.

Data for later steps (``ctx.data(2)``): ``activations`` (an :class:`ActivationSet` over the primary dataset of
step 1) and ``dataset`` (its name). Steps that also need the tokens or ground truth require step 1 as well.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mamba_interp.pipeline.activation_stats import (
    STATE_NORM,
    ActivationSet,
    baseline_stats,
    delta_stats,
    hook_name,
    norm_by_position,
    per_head_rms,
)
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import register_step

SUMMARY_KEYS = ("rms", "kurtosis", "dead_fraction", "n_outlier")
ACTIVATIONS_FILE = "activations.safetensors"


STORE_FOLDER = "activations"


def load(ctx: StepContext) -> dict:
    from mamba_interp.pipeline.activation_store import DiskActivationSet

    path, folder = ctx.out_dir / ACTIVATIONS_FILE, ctx.out_dir / STORE_FOLDER
    result = ctx.results.get(2)
    dataset = result.metrics.get("dataset") if result is not None else None
    if (folder / "index.json").is_file():
        return {"activations": DiskActivationSet.open(folder), "dataset": dataset}
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (save_activations was off)")
    return {"activations": ActivationSet.load(path), "dataset": dataset}


def _A(model: Any, layer: int) -> torch.Tensor:
    """The (negative) decay rates A of a layer: [e, n] (Mamba-1) or [h] (Mamba-2)."""
    return -torch.exp(model.blocks[layer].mixer.A_log.detach().float().cpu())


@register_step(2, "activations", requires=(1,), title="Activations and baseline statistics per layer and hook",
               load=load, reads=("layers", "batch_size", "hooks", "dead_threshold", "outlier_ratio", "save_activations",
                                 "figures"))
def run(ctx: StepContext) -> StepResult:
    from mamba_interp.pipeline.activation_store import DiskActivationSet, collect_for_run

    ds = ctx.data(1)
    batch, dataset = ds["batch"], ds["primary"]
    cfg = ctx.model.cfg
    hooks = ctx.config.hooks
    acts = collect_for_run(ctx, batch, ctx.layers, hooks, STORE_FOLDER, desc="collecting")
    seq_len = batch.seq_len
    per_layer: dict[str, dict[str, Any]] = {}
    delta: dict[str, Any] = {}
    heads: dict[str, Any] = {}
    state_pos: dict[int, np.ndarray] = {}
    arrays: dict[str, torch.Tensor] = {}
    extents: dict[tuple[str, int], tuple[float, float]] = {}
    work = [(i, s) for i in ctx.layers for s in hooks]
    for i, s in ctx.progress(work, desc="statistics"):
        x = acts.token_source(s, i)  # (N, k), streamed in chunks of sequences
        st = baseline_stats(x, ctx.config.dead_threshold, ctx.config.outlier_ratio)
        per_layer.setdefault(str(i), {})[s] = st.summary
        extents[(s, i)] = st.extent
        name = hook_name(s, i)
        for key, arr in st.per_dim.items():
            arrays[f"{name}.{key}"] = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        if s == "dt":
            ds_ = delta_stats(x, _A(ctx.model, i), seq_len)
            delta[str(i)] = ds_.summary
            for key, arr in ds_.per_dim.items():
                arrays[f"{name}.delta_{key}"] = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        if s == STATE_NORM:
            state_pos[i] = norm_by_position(acts.iter_sequences(s, i))
            arrays[f"{name}.by_position"] = torch.from_numpy(state_pos[i].astype(np.float32))
        if cfg.arch == "mamba2":
            h = cfg.nheads
            if s in ("x", "y"):
                heads.setdefault(str(i), {})[f"{s}_rms"] = per_head_rms(st.per_dim["rms"], h).tolist()
            elif s == "dt":
                heads.setdefault(str(i), {})["dt_median"] = ds_.per_dim["quantiles"][2].tolist()
            elif s == STATE_NORM:
                heads.setdefault(str(i), {})["state_norm_mean"] = st.per_dim["mean"].tolist()
    if cfg.arch == "mamba2" and "dt" in hooks:
        for i in ctx.layers:
            tau = arrays[f"{hook_name('dt', i)}.delta_timescale"]
            heads.setdefault(str(i), {})["timescale"] = tau.tolist()
    ctx.save_tensors("stats", arrays)
    on_disk = isinstance(acts, DiskActivationSet)
    if ctx.config.save_activations and not on_disk:
        acts.save(ACTIVATIONS_FILE, save=lambda name, tensors, meta: ctx.save_tensors(name, tensors, meta))
    if ctx.config.figures:
        _figures(ctx, acts, per_layer, delta, state_pos, arrays, extents)
    metrics: dict[str, Any] = {
        "dataset": dataset,
        "tokens": int(acts.mask.sum()),
        "sequences": int(batch.tokens.shape[0]),
        "layers": list(ctx.layers),
        "hooks": list(hooks),
        "dims": {s: int(acts[(s, ctx.layers[0])].shape[-1]) for s in hooks},
        "activation_megabytes": round(acts.nbytes() / 2**20, 2),
        "stats": per_layer,
    }
    artifacts = [f"{STORE_FOLDER}/{f.name}" for f in sorted(acts.folder.iterdir())] if on_disk else []
    if delta:
        metrics["delta"] = delta
    if state_pos:
        metrics["state_norm_by_position"] = {
            str(i): {"first": float(v[0]), "last": float(v[-1]), "max": float(v.max())} for i, v in state_pos.items()
        }
    if heads:
        metrics["per_head"] = heads
    return StepResult(metrics=metrics, reading=_reading(ctx, per_layer, delta, state_pos, seq_len),
                      artifacts=artifacts, data={"activations": acts, "dataset": dataset})


def _reading(ctx: StepContext, per_layer: dict, delta: dict, state_pos: dict, seq_len: int) -> str:
    parts: list[str] = []
    # the most heavy-tailed hook and the most outlier-rich one
    flat = [(int(i), s, st) for i, hs in per_layer.items() for s, st in hs.items()]
    kurt = [(st["kurtosis"], i, s) for i, s, st in flat if st["kurtosis"] == st["kurtosis"]]
    if kurt:
        k, i, s = max(kurt)
        parts.append(f"The heaviest-tailed activation is {s} in layer {i} (excess kurtosis {k:.1f}; a Gaussian has 0).")
    outl = [(st["n_outlier"], st["max_rms_ratio"], i, s, st["dims"]) for i, s, st in flat]
    n, ratio, i, s, dims = max(outl)
    if n:
        parts.append(f"{s} in layer {i} has {n} of {dims} outlier dimensions (up to {ratio:.1f}x the median RMS).")
    else:
        parts.append(f"No hook has outlier dimensions above {ctx.config.outlier_ratio:g}x the median RMS.")
    dead = [(st["dead_fraction"], i, s) for i, s, st in flat if st["dead_fraction"] > 0]
    if dead:
        f, i, s = max(dead)
        parts.append(f"Near-dead dimensions: up to {100 * f:.1f}% ({s}, layer {i}).")
    else:
        parts.append("No near-dead dimensions.")
    unit = "head" if ctx.model.cfg.arch == "mamba2" else "channel"
    for i, d in delta.items():
        parts.append(
            f"Layer {i}: median Δ {d['median']:.3g}, per-{unit} medians {d['channel_median_min']:.3g}–"
            f"{d['channel_median_max']:.3g}, selectivity (CV over tokens) median {d['cv_median']:.2f}; "
            f"{100 * d['long_memory_fraction']:.0f}% of {unit}s remember longer than the {seq_len}-token sequence "
            f"(slowest-mode timescale)."
        )
    for i, v in state_pos.items():
        parts.append(f"Layer {i}'s state norm goes from {v[0]:.3g} at the first token to {v[-1]:.3g} at the last.")
    return " ".join(parts)


def _figures(ctx: StepContext, acts: ActivationSet, per_layer: dict, delta: dict, state_pos: dict,
             arrays: dict[str, torch.Tensor], extents: dict[tuple[str, int], tuple[float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, hooks = list(ctx.layers), list(ctx.config.hooks)
    # 1. per-layer heatmaps of the summary statistics (hook x layer)
    fig, axes = plt.subplots(1, len(SUMMARY_KEYS), figsize=(3.2 * len(SUMMARY_KEYS), 0.35 * len(hooks) + 1.8),
                             layout="constrained")
    for ax, key in zip(axes, SUMMARY_KEYS):
        grid = np.array([[per_layer[str(i)][s][key] for i in layers] for s in hooks], dtype=float)
        shown = np.log10(np.maximum(grid, 1e-12)) if key == "rms" else grid
        im = ax.imshow(shown, aspect="auto", cmap="magma")
        ax.set_xticks(range(len(layers)), [str(i) for i in layers])
        ax.set_yticks(range(len(hooks)), hooks)
        ax.set(title="log10 RMS" if key == "rms" else key.replace("_", " "), xlabel="layer")
        for (r, c), v in np.ndenumerate(grid):
            if len(layers) * len(hooks) <= 120:
                ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=6, color="cyan")
        fig.colorbar(im, ax=ax, fraction=0.05)
    ctx.save_figure(fig, "stats_heatmap")

    # 2. per-dimension RMS relative to the median, per layer (hooks as rows): outlier/dead dimensions
    fig, axes = plt.subplots(len(layers), 1, figsize=(11, 0.3 * len(hooks) * len(layers) + 1.2 * len(layers)),
                             squeeze=False, layout="constrained")
    for ax, i in zip(axes[:, 0], layers):
        width = max(int(arrays[f"{hook_name(s, i)}.rms"].numel()) for s in hooks)
        grid = np.full((len(hooks), width), np.nan)
        for r, s in enumerate(hooks):
            rms = arrays[f"{hook_name(s, i)}.rms"].numpy()
            grid[r, : rms.size] = rms / max(float(np.median(rms)), 1e-12)
        im = ax.imshow(np.log10(np.maximum(grid, 1e-3)), aspect="auto", cmap="coolwarm", vmin=-2, vmax=2,
                       interpolation="nearest")
        ax.set_yticks(range(len(hooks)), hooks)
        ax.set(title=f"layer {i}: log10(dimension RMS / median RMS)", xlabel="dimension")
        fig.colorbar(im, ax=ax, fraction=0.02)
    ctx.save_figure(fig, "channel_rms")

    # 3. value distributions per hook, one line per layer (log density)
    cols = min(4, len(hooks))
    rows = -(-len(hooks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False, layout="constrained")
    for ax, s in zip(axes.flat, hooks):
        lo, hi = min(extents[(s, i)][0] for i in layers), max(extents[(s, i)][1] for i in layers)
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 81)
        for i in layers:  # histogram counts accumulated over chunks: the same density as one np.histogram
            counts = sum(np.histogram(c.numpy().ravel(), bins=edges)[0] for c in acts.token_source(s, i))
            density = counts / max(counts.sum(), 1) / np.diff(edges)
            ax.stairs(np.maximum(density, 1e-6), edges, label=f"layer {i}")
        ax.set(title=s, xlabel="value", yscale="log")
    for ax in list(axes.flat)[len(hooks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    ctx.save_figure(fig, "distributions")

    # 4. Δ per channel (Mamba-1) or head (Mamba-2): median and 5–95% band, channels sorted by median
    if delta:
        unit = "head" if ctx.model.cfg.arch == "mamba2" else "channel"
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), layout="constrained")
        for i in layers:
            q = arrays[f"{hook_name('dt', i)}.delta_quantiles"].numpy()  # (5, k)
            order = np.argsort(q[2])
            x = np.arange(q.shape[1])
            (line,) = axes[0].plot(x, q[2, order], lw=1.2, label=f"layer {i}")
            axes[0].fill_between(x, q[0, order], q[4, order], alpha=0.2, color=line.get_color())
            tau = arrays[f"{hook_name('dt', i)}.delta_timescale"].numpy()
            axes[1].hist(np.log10(np.maximum(tau, 1e-3)), bins=40, histtype="step", label=f"layer {i}")
        axes[0].set(yscale="log", title=f"Δ per {unit} (median, 5–95%)", xlabel=f"{unit} (sorted by median Δ)",
                    ylabel="Δ")
        axes[1].axvline(np.log10(acts.mask.shape[1]), color="grey", ls="--", lw=1, label="sequence length")
        axes[1].set(title="memory timescale 1/(median Δ·min|A|)", xlabel="log10 tokens", ylabel=f"{unit}s")
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
        ctx.save_figure(fig, "delta")

    # 5. SSM state norm by position
    if state_pos:
        fig, ax = plt.subplots(figsize=(6, 3.4), layout="constrained")
        for i, v in state_pos.items():
            ax.plot(np.arange(v.size), v, label=f"layer {i}")
        unit = "head" if ctx.model.cfg.arch == "mamba2" else "channel"
        ax.set(title=f"SSM state norm per {unit}, mean over sequences", xlabel="position", ylabel="‖h_t‖")
        ax.legend(fontsize=7)
        ctx.save_figure(fig, "state_norm")
