"""Step 7 (ssm_dynamics): Δ selectivity, decay timescales, hidden attention, induction score and knockout per layer.

Methods (``mamba_interp.temporal_causality``):

* Δ selectivity: per channel (Mamba-1) or head (Mamba-2), the per-sequence log ratio of mean Δ on the task's
  relevant tokens (induction: the triggers; MQAR: keys and queries; repeated tokens: the second copy; IOI: the
  names) to the rest, with bootstrap CIs over sequences, and a control with random positions of the same count;
* decay timescales τ = 1/(Δ·|A|) of the slowest mode, against 1×, 4× and 16× the sequence length;
* hidden attention (Ali et al. 2024; Mamba-2: the SSD matrix): the rows at the query, and full maps (mean |α|
  over units and the top unit) of ``example_sequences`` sequences;
* for recall tasks, per layer, the induction score (rows peaking at the source, e.g. induction's p+1) against
  a control (a source taken from another sequence), and the accuracy drop when the flow source → query is
  knocked out (against a random-source knockout of the same size).

Outputs: ``hidden_attention_examples.safetensors`` (maps), ``selectivity.safetensors`` (per-unit effects and CIs),
``timescales.safetensors``, ``data.json`` (what later steps read), figures ``delta_selectivity.png``,
``timescales.png``, ``hidden_attention.png``, ``lookup.png``.
Data for later steps: ``induction_score`` {layer: value}, ``knockout_accuracy_drop`` {layer: value},
``top_channels`` {layer: every channel/head ranked by |α| from the source to the query}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import register_step
from mamba_interp.stats import estimate
from mamba_interp.temporal_causality import (
    Lookup,
    answer_correct,
    decay_timescales,
    delta_selectivity,
    hidden_attention,
    induction_score,
    knockout_accuracy_drop,
    lookup_attention,
    lookup_positions,
    proportion_ci,
    ssm_inputs,
    top_units,
)

MULTIPLES = (1, 4, 16)


@dataclass(frozen=True)
class Options:
    example_sequences: int = 2
    """Sequences whose full hidden-attention maps are saved and drawn."""
    top_channels: int = 8
    """Channels/heads listed in the metrics (the data holds the full ranking)."""
    knockout: bool = True
    """Run the knockout (two extra forward passes per layer)."""

    def __post_init__(self) -> None:
        for name in ("example_sequences", "top_channels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if not isinstance(self.knockout, bool):
            raise ValueError(f"knockout={self.knockout!r} must be true or false")


def relevant_tokens(batch: Any) -> tuple[torch.Tensor, str] | None:
    """[b, l] bool of the task's relevant tokens and their name, or None when the task defines none."""
    meta, b, l = batch.metadata, len(batch), batch.seq_len
    pos = torch.arange(l).expand(b, l)

    def at(*keys: str) -> torch.Tensor:
        m = torch.zeros(b, l, dtype=torch.bool)
        for k in keys:
            m[torch.arange(b)[:, None], torch.as_tensor(meta[k]).long().reshape(b, -1)] = True
        return m

    if batch.task == "induction":
        return batch.tokens == int(meta["trigger_token"]), "trigger tokens"
    if batch.task == "mqar":
        return at("key_pos", "query_pos"), "keys and queries"
    if batch.task in ("repeated_tokens", "text_induction") and "period" in meta:
        return pos >= int(meta.get("first_start", 0)) + int(meta["period"]), "second-copy tokens"
    if batch.task == "ioi":
        return at("io_pos", "s1_pos", "s2_pos"), "name tokens"
    if isinstance(meta.get("is_data"), torch.Tensor):
        return meta["is_data"].bool(), "data tokens"
    return None


def _layer_dt(ctx: StepContext, batch: Any) -> dict[int, torch.Tensor]:
    """Δ [b, l, k] per analysed layer: step 2's activations when it collected them, else one pass here."""
    acts = ctx.data(2).get("activations")
    if acts is not None and "dt" in acts.hooks and set(ctx.layers) <= set(acts.layers):
        return {i: acts[("dt", i)] for i in ctx.layers}
    parts: dict[int, list[torch.Tensor]] = {i: [] for i in ctx.layers}
    for start in range(0, len(batch), ctx.batch_size):
        sl = slice(start, start + ctx.batch_size)
        mask = None if batch.attention_mask is None else batch.attention_mask[sl].to(ctx.device)
        for i, inp in ssm_inputs(ctx.model, batch.tokens[sl].to(ctx.device), ctx.layers, mask).items():
            parts[i].append(inp.dt.float().cpu())
    return {i: torch.cat(v) for i, v in parts.items()}


def load(ctx: StepContext) -> dict:
    raw = json.loads((ctx.out_dir / "data.json").read_text())
    return {key: {int(k): v for k, v in raw[key].items()} for key in raw}


@register_step(7, "ssm_dynamics", requires=(1, 2), title="SSM dynamics: Δ selectivity, timescales, hidden attention",
               options=Options, load=load)
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    batch = ctx.data(1)["batch"]
    model, arch = ctx.model, ctx.model.cfg.arch
    unit = "channel" if arch == "mamba1" else "head"
    valid = torch.ones(batch.tokens.shape, dtype=torch.bool) if batch.attention_mask is None else \
        batch.attention_mask.bool()
    metrics: dict[str, Any] = {"unit": unit, "layers": list(ctx.layers), "sequences": len(batch),
                               "seq_len": batch.seq_len}
    notes: list[str] = []

    # 1. Δ selectivity and 2. timescales
    dt = _layer_dt(ctx, batch)
    relevant = relevant_tokens(batch)
    selectivity: dict[int, dict[str, Any]] = {}
    if relevant is not None:
        mask, label = relevant
        for i in ctx.layers:
            try:
                selectivity[i] = delta_selectivity(dt[i], mask, valid, seed=ctx.seed)
            except ValueError as exc:
                notes.append(f"Δ selectivity skipped in layer {i}: {exc}")
        metrics["delta_selectivity"] = {"relevant": label, **{str(i): _selectivity_summary(s)
                                                              for i, s in selectivity.items()}}
    else:
        notes.append("Δ selectivity skipped: the task defines no relevant tokens")
    timescales = decay_timescales(model, {i: dt[i][valid] for i in ctx.layers})
    L = batch.seq_len
    metrics["timescales"] = {str(i): {
        "tau_median": float(np.median(ts.tau[1])), "tau_q90_max": float(ts.tau[2].max()),
        "half_life_median": float(np.median(ts.half_life)), "resting_tau_median": float(np.median(ts.resting)),
        "decay_median": float(np.median(ts.decay[1])),
        "longer_than": {f"{m}x": ts.long_memory_fraction(m * L) for m in MULTIPLES},
    } for i, ts in timescales.items()}
    ctx.save_tensors("timescales", {f"layer{i}.{k}": torch.from_numpy(np.ascontiguousarray(getattr(ts, k)))
                                    for i, ts in timescales.items() for k in ("tau", "tau_fast", "decay", "resting")})
    if selectivity:
        ctx.save_tensors("selectivity", {f"layer{i}.{k}": torch.from_numpy(np.asarray(s[k], dtype=np.float64))
                                         for i, s in selectivity.items() for k in ("log_ratio", "control_log_ratio")})

    # 3. hidden attention at the queries: induction score, top units, knockout
    lookup = lookup_positions(batch)
    has_lookup = lookup is not None and lookup.source is not None
    data: dict[str, dict[int, Any]] = {"induction_score": {}, "knockout_accuracy_drop": {}, "top_channels": {}}
    aligned: dict[int, np.ndarray] = {}
    if has_lookup:
        clean = answer_correct(model, batch, lookup, ctx.batch_size) if opts.knockout else None
        perm = torch.from_numpy(np.random.default_rng(ctx.seed).permutation(len(batch)))
        score_m, ko_m = {}, {}
        for i in ctx.progress(ctx.layers, desc="hidden attention"):
            att = lookup_attention(model, batch, i, lookup, ctx.batch_size)
            value, per_seq = induction_score(model, batch, i, lookup, attention=att)
            _, control = induction_score(model, batch, i, _with_source(lookup, lookup.source[perm]), attention=att)
            score_m[str(i)] = {**estimate(per_seq, seed=ctx.seed).to_dict(), "ci_exact": proportion_ci(per_seq > 0.5)
                               if lookup.query.shape[1] == 1 else None,
                               "control": estimate(control, seed=ctx.seed).to_dict()}
            data["induction_score"][i] = value
            data["top_channels"][i] = top_units(att)
            aligned[i] = _aligned_row(att.rows, lookup)
            if opts.knockout:
                ko = knockout_accuracy_drop(model, batch, i, lookup, ctx.batch_size, seed=ctx.seed, clean=clean)
                ko_m[str(i)] = ko
                data["knockout_accuracy_drop"][i] = ko["drop"]["value"]
        metrics["induction_score"] = {str(i): v for i, v in data["induction_score"].items()}
        metrics["induction_score_ci"] = score_m
        if opts.knockout:
            metrics["knockout_accuracy_drop"] = {str(i): v for i, v in data["knockout_accuracy_drop"].items()}
            metrics["knockout"] = ko_m
        metrics["top_channels"] = {str(i): v[: opts.top_channels] for i, v in data["top_channels"].items()}
    else:
        notes.append("induction score and knockout skipped: the batch has no recall source position")
    ctx.save_json("data", {k: {str(i): v for i, v in d.items()} for k, d in data.items()})

    # 4. example maps
    n_ex = min(opts.example_sequences, len(batch))
    ids = batch.tokens[:n_ex].to(ctx.device)
    mask = None if batch.attention_mask is None else batch.attention_mask[:n_ex].to(ctx.device)
    maps: dict[str, torch.Tensor] = {}
    for i in ctx.layers:
        maps[f"layer{i}.mean_abs"] = hidden_attention(model, ids, i, mask, reduce="mean_abs").float().cpu()
        top = data["top_channels"].get(i, [0])[0]
        maps[f"layer{i}.top_unit"] = hidden_attention(model, ids, i, mask, channels=[top])[:, 0].float().cpu()
        maps[f"layer{i}.top_unit_index"] = torch.tensor([top])
    ctx.save_tensors("hidden_attention_examples", maps)
    if ctx.config.figures:
        _figures(ctx, unit, selectivity, relevant, timescales, maps, aligned, metrics, batch, n_ex)
    metrics["notes"] = notes
    return StepResult(metrics=metrics, reading=_reading(metrics, unit, L, notes), data=data)


def _with_source(lookup: Lookup, source: torch.Tensor) -> Lookup:
    return Lookup(lookup.query, lookup.answer, source, lookup.trigger)


def _aligned_row(rows: torch.Tensor, lookup: Any) -> np.ndarray:
    """Mean |α| row at the first query, indexed by the offset s − source (−(l−1)..l−1), NaN where unseen."""
    r = rows[:, 0].double()  # (b, l)
    b, l = r.shape
    offset = torch.arange(l)[None, :] - lookup.source[:, :1]  # (b, l)
    keep = torch.arange(l)[None, :] < lookup.query[:, :1]
    idx = (offset + l - 1)[keep]
    total = torch.zeros(2 * l - 1, dtype=torch.float64).index_add_(0, idx, r[keep])
    count = torch.zeros(2 * l - 1, dtype=torch.float64).index_add_(0, idx, torch.ones_like(r[keep]))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan"))).numpy()


def _selectivity_summary(sel: dict[str, Any]) -> dict[str, Any]:
    return {k: sel[k] for k in ("mean", "control_mean", "top", "fraction_above_control", "sequences")}


def _reading(m: dict[str, Any], unit: str, L: int, notes: list[str]) -> str:
    parts: list[str] = []
    sel = m.get("delta_selectivity")
    if sel:
        for i in m["layers"]:
            s = sel.get(str(i))
            if not s:
                continue
            e, c, t = s["mean"], s["control_mean"], s["top"][0]
            parts.append(
                f"Layer {i}: mean Δ on {sel['relevant']} is {np.exp(e['value']):.2f}× "
                f"(95% CI {np.exp(e['ci'][0]):.2f}–{np.exp(e['ci'][1]):.2f}) the mean Δ elsewhere, geometric mean "
                f"over {unit}s (same count of random positions: {np.exp(c['value']):.2f}×, "
                f"CI {np.exp(c['ci'][0]):.2f}–{np.exp(c['ci'][1]):.2f}); "
                f"{100 * s['fraction_above_control']:.0f}% of {unit}s differ more than any {unit} does under the "
                f"control; the most selective {unit}, {t['unit']}, is at {np.exp(t['log_ratio']):.2f}× "
                f"(CI {np.exp(t['ci'][0]):.2f}–{np.exp(t['ci'][1]):.2f}).")
    for i in m["layers"]:
        t = m["timescales"][str(i)]
        parts.append(
            f"Layer {i}: median timescale of the slowest mode {t['tau_median']:.3g} tokens (half-life "
            f"{t['half_life_median']:.3g}); {100 * t['longer_than']['1x']:.0f}% of {unit}s remember longer than the "
            f"{L}-token sequence, {100 * t['longer_than']['16x']:.0f}% longer than 16× it.")
    scores = m.get("induction_score")
    if scores:
        ko = m.get("knockout_accuracy_drop", {})
        best = max(scores, key=lambda k: (ko.get(k, 0.0), scores[k]))
        desc = []
        for i in m["layers"]:
            sc = m["induction_score_ci"][str(i)]
            text = (f"layer {i}: induction score {sc['value']:.2f} [{sc['ci'][0]:.2f}, {sc['ci'][1]:.2f}] "
                    f"(control {sc['control']['value']:.2f})")
            if str(i) in ko:
                k = m["knockout"][str(i)]
                d = k["drop"]
                text += (f", knockout drop {d['value']:.2f} [{d['ci'][0]:.2f}, {d['ci'][1]:.2f}] (random-source "
                         f"control {k['control_drop']['value']:.2f}, McNemar p = {k['p_vs_control']:.2g})")
            desc.append(text)
        sc_best = scores[best]
        if ko and ko[best] > 0.1:
            verdict = (f"Blocking the source→query entry hurts most in layer {best} (accuracy drop {ko[best]:.2f}), "
                       f"whose induction score is {sc_best:.2f}: "
                       + ("the lookup happens there, through that entry of the hidden attention" if sc_best > 0.5 else
                          "the answer depends on that entry, but the row seldom peaks there, so the lookup is spread "
                          "over other entries or layers too"))
        elif ko:
            verdict = (f"No single layer's source→query entry carries the lookup on its own (largest knockout drop "
                       f"{max(ko.values()):.2f})")
        else:
            verdict = f"Layer {best} has the highest induction score ({sc_best:.2f})"
        parts.append(verdict + ". Per layer: " + "; ".join(desc) + ".")
    if notes:
        parts.append(" ".join(notes) + ".")
    return " ".join(parts)


def _figures(ctx: StepContext, unit: str, selectivity: dict, relevant: Any, timescales: dict, maps: dict,
             aligned: dict, metrics: dict, batch: Any, n_ex: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(ctx.layers)
    if selectivity:
        fig, axes = plt.subplots(1, len(selectivity), figsize=(4.2 * len(selectivity), 3.4), squeeze=False,
                                 layout="constrained")
        for ax, (i, s) in zip(axes[0], selectivity.items()):
            lr, ctl = np.asarray(s["log_ratio"]), np.asarray(s["control_log_ratio"])
            x = np.arange(lr.size)
            ax.plot(x, np.exp(np.sort(lr)), lw=1.4, label=relevant[1])
            ax.plot(x, np.exp(np.sort(ctl)), lw=1, color="grey", ls="--", label="random positions (control)")
            ax.axhline(1, color="k", lw=0.6)
            ax.set(yscale="log", title=f"layer {i}: mean Δ on {relevant[1]} / elsewhere", xlabel=f"{unit} (sorted)",
                   ylabel="ratio of mean Δ")
            ax.legend(fontsize=7)
        ctx.save_figure(fig, "delta_selectivity")

    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    for i, ts in timescales.items():
        ax.hist(np.log10(np.maximum(ts.tau[1], 1e-3)), bins=40, histtype="step", label=f"layer {i}")
    for m, ls in zip(MULTIPLES, ("--", "-.", ":")):
        ax.axvline(np.log10(m * batch.seq_len), color="grey", ls=ls, lw=1, label=f"{m}× length")
    ax.set(title=f"median timescale 1/(Δ·min|A|) per {unit}", xlabel="log10 tokens", ylabel=f"{unit}s")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "timescales")

    fig, axes = plt.subplots(n_ex, 2 * len(layers), figsize=(3.1 * 2 * len(layers), 2.9 * n_ex), squeeze=False,
                             layout="constrained")
    for r in range(n_ex):
        for c, i in enumerate(layers):
            for k, key in enumerate(("mean_abs", "top_unit")):
                ax = axes[r, 2 * c + k]
                a = maps[f"layer{i}.{key}"][r].abs().numpy()
                shown = np.log10(np.maximum(a / max(a.max(), 1e-30), 1e-3))
                im = ax.imshow(shown, cmap="magma", vmin=-3, vmax=0, interpolation="nearest")
                name = f"mean |α| over {unit}s" if key == "mean_abs" else \
                    f"{unit} {int(maps[f'layer{i}.top_unit_index'][0])}"
                ax.set(title=f"seq {r}, layer {i}: {name}", xlabel="source s", ylabel="target t")
                ax.title.set_fontsize(8)
        fig.colorbar(im, ax=axes[r, -1], fraction=0.05, label="log10 |α| / max")
    ctx.save_figure(fig, "hidden_attention")

    if aligned:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
        l = batch.seq_len
        for i, row in aligned.items():
            axes[0].plot(np.arange(-(l - 1), l), row, label=f"layer {i}")
        axes[0].axvline(0, color="grey", ls="--", lw=1)
        axes[0].set(yscale="log", title="mean |α| at the query, by offset from the source", xlabel="s − source",
                    ylabel=f"mean |α| over {unit}s")
        axes[0].legend(fontsize=7)
        x = np.arange(len(layers))
        sc = metrics["induction_score_ci"]
        axes[1].bar(x - 0.2, [sc[str(i)]["value"] for i in layers], 0.2, label="induction score",
                    yerr=np.array([[sc[str(i)]["value"] - sc[str(i)]["ci"][0],
                                    sc[str(i)]["ci"][1] - sc[str(i)]["value"]] for i in layers]).T)
        axes[1].bar(x, [sc[str(i)]["control"]["value"] for i in layers], 0.2, label="score control")
        if "knockout" in metrics:
            ko = metrics["knockout"]
            axes[1].bar(x + 0.2, [ko[str(i)]["drop"]["value"] for i in layers], 0.2, label="knockout drop",
                        yerr=np.array([[ko[str(i)]["drop"]["value"] - ko[str(i)]["drop"]["ci"][0],
                                        ko[str(i)]["drop"]["ci"][1] - ko[str(i)]["drop"]["value"]]
                                       for i in layers]).T)
            axes[1].bar(x + 0.4, [ko[str(i)]["control_drop"]["value"] for i in layers], 0.2, label="knockout control")
        axes[1].set_xticks(x + 0.1, [f"layer {i}" for i in layers])
        axes[1].set(title="where the lookup happens (95% CIs)", ylim=(0, 1.05))
        axes[1].legend(fontsize=7)
        ctx.save_figure(fig, "lookup")
