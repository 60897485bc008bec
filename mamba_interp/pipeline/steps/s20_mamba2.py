"""Step 20 (mamba2): the all-layer, per-head analysis of a Mamba-2 model (skipped on Mamba-1).

On ``samples`` sequences of step 1's primary dataset, for every layer and head
(``mamba_interp.temporal_causality.dynamics``):

* gates: silu(z) distribution per head (mean, 5/50/95 %) and the fraction of near-closed gates (< ``closed``);
* decay spectrum: per-token decay exp(Δ·A_h) quantiles and timescales; all heads of all layers grouped into
  fast / medium / slow by 1-D k-means on their median decay (counts and decay values per group: the measured
  counterpart of a "0.7 / 0.9 / 0.98 multi-timescale" description);
* state compression: entropy effective rank of each head's state H_t ∈ R^{p×n} by position, and the participation
  ratio of the flattened state over (sequence, position) samples;
* SSD attention sparsity: Gini, normalised entropy and top-5 mass of the hidden-attention rows |M_h[t, :t+1]|
  (rows t ≥ ``min_row``), and the sources holding ``mass`` of the final row;
* token efficiency: how many past tokens carry ``mass`` (90 %) of the gradient influence on the answer's log-prob.

Files (the methodology's names): ``mamba2_baseline_stats.json`` (model and per-layer summary),
``mamba2_ssm_parameters_layer_<i>.json`` (per head: A, dt_bias, D, Δ/decay/timescale quantiles, group),
``mamba2_sequence_dynamics_layer_<i>.json`` (per head: gates, effective rank by position, participation ratio,
sparsity), ``mamba2_comprehensive_report.json`` (groups, token efficiency, the reading). Figures ``gates.png``,
``decay_spectrum.png``, ``state_rank.png``, ``attention_sparsity.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mamba_interp.models.cache import get_act_name
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import StepSkipped, register_step
from mamba_interp.stats import estimate
from mamba_interp.temporal_causality import (
    attention_weights,
    cluster_decays,
    decay_timescales,
    effective_rank,
    gate_stats,
    influence_on_answer,
    lookup_positions,
    participation_ratio,
    row_sparsity,
    ssm_inputs,
    tokens_for_mass,
)

GROUP_NAMES = {1: ["single"], 2: ["fast", "slow"], 3: ["fast", "medium", "slow"]}


@dataclass(frozen=True)
class Options:
    samples: int = 64
    """Sequences analysed (states and attention matrices are [samples, l, ...] per layer)."""
    closed: float = 0.05
    """A gate value silu(z) below this counts as closed."""
    groups: int = 3
    """Timescale groups for the k-means on median decays."""
    mass: float = 0.9
    """Influence / attention mass whose token count is reported."""
    min_row: int = 4
    """Attention rows t < min_row (fewer than min_row + 1 sources) are left out of the sparsity means."""
    pr_samples: int = 4096
    """At most this many (sequence, position) states per head enter the participation ratio."""

    def __post_init__(self) -> None:
        for name in ("samples", "groups", "pr_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if not isinstance(self.min_row, int) or self.min_row < 0:
            raise ValueError(f"min_row={self.min_row!r} must be a non-negative integer")
        if not 0 < self.closed < 1:
            raise ValueError(f"closed={self.closed!r} must be in (0, 1)")
        if not 0 < self.mass <= 1:
            raise ValueError(f"mass={self.mass!r} must be in (0, 1]")


def _collect(model: Any, batch: Any, layer: int, pr_samples: int, seed: int) -> dict[str, Any]:
    """Gate values, per-position effective ranks and a state sample of one layer (states reduced in the hook)."""
    h = model.cfg.nheads
    out: dict[str, Any] = {}
    b, l = batch.tokens.shape
    g = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(b * l, generator=g)[:pr_samples]

    def states(t: torch.Tensor, hook: Any) -> None:  # (b, l, h, p, n) -> ranks (b, l, h) and a row sample
        out["erank"] = effective_rank(t.detach()).float().cpu()
        out["sample"] = t.detach().reshape(b * l, h, -1)[pick.to(t.device)].float().cpu()

    def gates(t: torch.Tensor, hook: Any) -> None:
        out["gate"] = t.detach().float().cpu()

    mask = None if batch.attention_mask is None else batch.attention_mask
    stop = layer + 1
    with torch.no_grad(), model.hooks(fwd_hooks=[(get_act_name("ssm_state", layer), states),
                                                 (get_act_name("gate", layer), gates)]):
        model(batch.tokens.to(next(model.parameters()).device), attention_mask=mask,
              stop_at_layer=None if stop >= model.cfg.n_layer else stop)
    return out


@register_step(20, "mamba2", requires=(1,), title="Mamba-2, all layers per head: gates, timescales, state rank, "
               "SSD attention sparsity", options=Options)
def run(ctx: StepContext) -> StepResult:
    cfg = ctx.model.cfg
    if cfg.arch != "mamba2":
        raise StepSkipped("step 20 analyses Mamba-2 models (per-head decays, SSD attention); this model is Mamba-1 "
                          "— run it on a Mamba-2 model, e.g. --model induction-mamba2")
    opts: Options = ctx.options or Options()
    model = ctx.model
    full = ctx.data(1)["batch"]
    batch = full.select(slice(0, min(opts.samples, len(full))))
    b, l = batch.tokens.shape
    valid = torch.ones(b, l, dtype=torch.bool) if batch.attention_mask is None else batch.attention_mask.bool()
    device = ctx.device
    ids = batch.tokens.to(device)
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    layers = list(range(cfg.n_layer))
    inputs = ssm_inputs(model, ids, layers, mask)
    timescales = decay_timescales(model, {i: inputs[i].dt.cpu()[valid] for i in layers})
    rows_t = torch.arange(l).expand(b, l)
    per_layer: dict[int, dict[str, Any]] = {}
    for i in ctx.progress(layers, desc="layers"):
        col = _collect(model, batch.to(device), i, opts.pr_samples, ctx.seed + i)
        gs = gate_stats(col["gate"][valid], cfg.nheads, opts.closed)
        erank = col["erank"]  # (b, l, h)
        w = valid[..., None].float()
        erank_pos = (torch.nan_to_num(erank) * w).sum(0) / w.sum(0).clamp_min(1)  # (l, h)
        pr = [participation_ratio(col["sample"][:, k]) for k in range(cfg.nheads)]
        M = attention_weights(inputs[i]).abs().cpu()  # (b, h, l, l)
        sp = row_sparsity(M, rows_t[:, None, :].expand(b, cfg.nheads, l))  # each (b, h, l)
        keep = (valid & (rows_t >= opts.min_row))[:, None, :].expand_as(sp["gini"])
        sparsity = {k: [float(v[:, k_][keep[:, k_]].nanmean()) for k_ in range(cfg.nheads)] for k, v in sp.items()}
        final_tokens = tokens_for_mass(M[:, :, -1, :], opts.mass).double()  # (b, h)
        per_layer[i] = {"gates": gs, "erank_by_position": erank_pos, "erank_mean": erank_pos.mean(0),
                        "erank_last": erank_pos[-1], "participation_ratio": pr, "sparsity": sparsity,
                        "final_row_tokens": final_tokens.median(0).values}

    medians = np.concatenate([timescales[i].decay[1] for i in layers])  # all heads of all layers
    labels, groups = cluster_decays(medians, opts.groups, seed=ctx.seed)
    names = GROUP_NAMES.get(len(groups), [f"group {k}" for k in range(len(groups))])
    for g, name in zip(groups, names):
        g["name"] = name
    head_labels = labels.reshape(len(layers), cfg.nheads)

    lookup = lookup_positions(batch)
    efficiency: dict[str, Any] = {}
    if lookup is not None:
        infl = influence_on_answer(model, batch, lookup=lookup, batch_size=ctx.batch_size)["hook_embed"]
        tokens = tokens_for_mass(infl, opts.mass).double()
        q = lookup.column(-1).query[:, 0].double() + 1
        efficiency = {"mass": opts.mass, "tokens": estimate(tokens, "median", seed=ctx.seed).to_dict(),
                      "fraction_of_context": estimate(tokens / q, "median", seed=ctx.seed).to_dict(),
                      "context_tokens_median": float(q.median())}

    for i in layers:
        ctx.save_json(f"mamba2_ssm_parameters_layer_{i}", _parameters(model, i, timescales[i], head_labels[i], names))
        ctx.save_json(f"mamba2_sequence_dynamics_layer_{i}", _dynamics(per_layer[i]))
    baseline = {"arch": "mamba2", "n_layer": cfg.n_layer, "nheads": cfg.nheads, "headdim": cfg.headdim,
                "d_state": cfg.d_state, "ngroups": cfg.ngroups, "sequences": b, "seq_len": l,
                "layers": {str(i): _layer_summary(per_layer[i], timescales[i]) for i in layers}}
    ctx.save_json("mamba2_baseline_stats", baseline)
    metrics = {"sequences": b, "seq_len": l, "layers": baseline["layers"], "timescale_groups": groups,
               "token_efficiency": efficiency}
    reading = _reading(metrics, opts, l)
    ctx.save_json("mamba2_comprehensive_report", {**metrics, "model": {k: baseline[k] for k in (
        "n_layer", "nheads", "headdim", "d_state", "ngroups")}, "head_groups": head_labels.tolist(),
        "reading": reading})
    if ctx.config.figures:
        _figures(ctx, per_layer, timescales, head_labels, names, opts)
    return StepResult(metrics=metrics, reading=reading,
                      data={"head_groups": head_labels, "timescales": timescales})


def _parameters(model: Any, i: int, ts: Any, labels: np.ndarray, names: list[str]) -> dict[str, Any]:
    mix = model.blocks[i].mixer
    A = -torch.exp(mix.A_log.detach().double().cpu())
    return {"layer": i, "A_log": mix.A_log.detach().cpu().tolist(), "A": A.tolist(),
            "dt_bias": mix.dt_bias.detach().cpu().tolist(), "D": mix.D.detach().cpu().tolist(),
            "timescale_q10_q50_q90": ts.tau.T.tolist(), "decay_q10_q50_q90": ts.decay.T.tolist(),
            "half_life_median": ts.half_life.tolist(), "resting_timescale": ts.resting.tolist(),
            "group": [names[int(k)] for k in labels]}


def _dynamics(d: dict[str, Any]) -> dict[str, Any]:
    return {"gates": {k: np.asarray(v).tolist() for k, v in d["gates"].items()},
            "effective_rank_by_position": d["erank_by_position"].T.tolist(),
            "effective_rank_mean": d["erank_mean"].tolist(), "effective_rank_last": d["erank_last"].tolist(),
            "participation_ratio": d["participation_ratio"], "attention_sparsity": d["sparsity"],
            "final_row_tokens_for_mass_median": d["final_row_tokens"].tolist()}


def _layer_summary(d: dict[str, Any], ts: Any) -> dict[str, Any]:
    return {"gate_mean": float(np.mean(d["gates"]["mean"])),
            "closed_fraction": float(np.mean(d["gates"]["closed_fraction"])),
            "decay_median": float(np.median(ts.decay[1])), "timescale_median": float(np.median(ts.tau[1])),
            "effective_rank_mean": float(d["erank_mean"].mean()),
            "participation_ratio_median": float(np.nanmedian(d["participation_ratio"])),
            **{f"{k}_mean": float(np.nanmean(v)) for k, v in d["sparsity"].items()},
            "final_row_tokens_median": float(d["final_row_tokens"].median())}


def _reading(m: dict[str, Any], opts: Options, l: int) -> str:
    parts = []
    for i, s in m["layers"].items():
        parts.append(
            f"Layer {i}: gates average {s['gate_mean']:.2f} with {100 * s['closed_fraction']:.1f}% below "
            f"{opts.closed:g}; median per-step decay {s['decay_median']:.3f} (timescale {s['timescale_median']:.3g} "
            f"tokens); state effective rank {s['effective_rank_mean']:.2f}, participation ratio "
            f"{s['participation_ratio_median']:.2f}; attention rows: Gini {s['gini_mean']:.2f}, entropy "
            f"{s['entropy_mean']:.2f}, top-5 mass {s['top_mass_mean']:.2f}; the final row needs "
            f"{s['final_row_tokens_median']:.0f} sources for {100 * opts.mass:.0f}% of its mass.")
    g = "; ".join(f"{x['name']}: {x['count']} heads, decay {x['center']:.3f} ({x['min']:.3f}–{x['max']:.3f})"
                  for x in m["timescale_groups"])
    parts.append(f"Heads grouped by median decay (k-means over all layers): {g}.")
    e = m["token_efficiency"]
    if e:
        t, f = e["tokens"], e["fraction_of_context"]
        parts.append(f"{100 * e['mass']:.0f}% of the answer's gradient influence comes from a median of "
                     f"{t['value']:.0f} past tokens [{t['ci'][0]:.0f}, {t['ci'][1]:.0f}], {100 * f['value']:.1f}% of "
                     f"the {e['context_tokens_median']:.0f}-token context.")
    return " ".join(parts)


def _figures(ctx: StepContext, per_layer: dict, timescales: dict, head_labels: np.ndarray, names: list[str],
             opts: Options) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(per_layer)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    for i in layers:
        gs = per_layer[i]["gates"]
        x = np.arange(len(gs["mean"]))
        (line,) = axes[0].plot(x, gs["q50"], label=f"layer {i}")
        axes[0].fill_between(x, gs["q05"], gs["q95"], alpha=0.2, color=line.get_color())
        axes[1].plot(x, gs["closed_fraction"], marker=".", label=f"layer {i}")
    axes[0].set(title="silu(z) per head (median, 5–95%)", xlabel="head", ylabel="gate")
    axes[1].set(title=f"fraction of gates < {opts.closed:g}", xlabel="head", ylabel="fraction")
    axes[0].legend(fontsize=7)
    ctx.save_figure(fig, "gates")

    fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
    markers = "os^vD"
    for li, i in enumerate(layers):
        d = timescales[i].decay
        x = np.arange(d.shape[1]) + li * 0.15
        for g, name in enumerate(names):
            sel = head_labels[li] == g
            ax.errorbar(x[sel], d[1, sel], yerr=[d[1, sel] - d[0, sel], d[2, sel] - d[1, sel]], fmt=markers[g % 5],
                        ms=4, lw=0.8, color=f"C{g}", label=f"{name}" if li == 0 else None)
    ax.set(title="per-step decay exp(Δ·A) per head (median, 10–90%), by timescale group",
           xlabel="head (layers offset)", ylabel="decay")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "decay_spectrum")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    for i in layers:
        e = per_layer[i]["erank_by_position"].mean(1).numpy()
        axes[0].plot(np.arange(e.size), e, label=f"layer {i}")
        axes[1].plot(per_layer[i]["participation_ratio"], marker=".", label=f"layer {i}")
    axes[0].set(title="state effective rank, mean over heads", xlabel="position", ylabel="erank")
    axes[1].set(title="participation ratio of the state per head", xlabel="head", ylabel="PR")
    axes[0].legend(fontsize=7)
    ctx.save_figure(fig, "state_rank")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), layout="constrained")
    for ax, key in zip(axes, ("gini", "entropy", "top_mass")):
        for i in layers:
            ax.plot(per_layer[i]["sparsity"][key], marker=".", label=f"layer {i}")
        ax.set(title=f"attention rows: {key.replace('_', ' ')}", xlabel="head")
    axes[0].legend(fontsize=7)
    ctx.save_figure(fig, "attention_sparsity")
