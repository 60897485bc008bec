"""Step 8 (temporal): how much every earlier position influences the answer, by position class and distance; the
memory horizon per layer; and long-range dependence at 1×, 4× and 16× the sequence length.

Influence = ‖∂ log p(answer) / ∂ a_s‖ at the position that predicts the answer (induction: the final trigger),
for a_s the embedding and each analysed layer's ``resid_pre`` (``temporal_causality.influence_on_answer``; one
backward per batch for all of them). Per sequence the shares of the total influence falling on the trigger, the
source (the answer's earlier position), the query itself, the 3 positions before it (the conv window) and the
rest; the influence profile by distance t − s; the memory horizon (farthest source with influence ≥
``threshold`` × the peak). ``top_source_hit``: the fraction of sequences whose most influential source other
than the query is the trigger or the source, at 1× (step 1's batch) and at ``lengths`` × the length on
``long_range_samples`` fresh sequences. For language models the same on repeated random tokens, plus the IOI
prompts (is the indirect object the top source?) when step 1 built them.

Outputs: ``influence.safetensors`` (per-sequence influence rows, profiles), ``data.json``, figures
``influence_classes.png``, ``influence_distance.png``, ``influence_examples.png``, ``long_range.png``.
Data for later steps: ``influence`` {source ("embed" or layer): {class: mean share}}, ``top_source_hit``
{"1x": v, ...}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.datasets import repeated_tokens
from mamba_interp.pipeline.registry import StepSkipped, register_step
from mamba_interp.stats import estimate
from mamba_interp.temporal_causality import (
    class_shares,
    influence_on_answer,
    influence_profile,
    lookup_positions,
    memory_horizon,
    position_classes,
    proportion_ci,
    top_source_hit,
)

EMBED = "hook_embed"


@dataclass(frozen=True)
class Options:
    lengths: tuple[int, ...] = (4, 16)
    """Multiples of the sequence length for the long-range check (1× is step 1's batch)."""
    long_range_samples: int = 64
    """Fresh sequences per longer length (the 16× pass dominates the step's time)."""
    threshold: float = 0.1
    """Memory horizon: the farthest source with influence ≥ threshold × the peak."""
    examples: int = 4

    def __post_init__(self) -> None:
        lengths = self.lengths
        if isinstance(lengths, str):
            lengths = tuple(p for p in lengths.replace(" ", "").split(",") if p)
        if isinstance(lengths, (int, float)) and not isinstance(lengths, bool):
            lengths = (lengths,)
        try:
            lengths = tuple(int(x) for x in lengths)
        except (TypeError, ValueError):
            raise ValueError(f"lengths={self.lengths!r} must be a list of integers > 1, e.g. 4,16") from None
        if not all(x > 1 for x in lengths):
            raise ValueError(f"lengths={self.lengths!r} must be integers > 1 (multiples of the sequence length)")
        object.__setattr__(self, "lengths", lengths)
        for name in ("long_range_samples", "examples"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold!r} must be in (0, 1]")


def load(ctx: StepContext) -> dict:
    raw = json.loads((ctx.out_dir / "data.json").read_text())
    raw["influence"] = {(k if k == "embed" else int(k)): v for k, v in raw["influence"].items()}
    return raw


def _label(name: str) -> str | int:
    return "embed" if name == EMBED else int(name.split(".")[1])


def _longer_batch(ctx: StepContext, ds: dict, length: int, n: int, seed: int) -> Any:
    """``n`` fresh sequences of the primary task at ``length`` tokens, or None when the task has a fixed length."""
    task = ds["task"]
    if ds["kind"] == "lm":  # repeated random tokens at any length (the model's own vocabulary)
        return repeated_tokens(ctx.model.cfg.vocab_size, n, length, seed)
    if task is None or getattr(task, "finite", False):
        return None
    try:
        return task.sample(n, seed=seed, seq_len=length, split="test")
    except (ValueError, TypeError):
        return None


@register_step(8, "temporal", requires=(1,), title="Temporal influence, memory horizon and long-range dependence",
               options=Options, load=load)
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    ds = ctx.data(1)
    batch = ds["batch"]
    lookup = lookup_positions(batch)
    if lookup is None:
        raise StepSkipped("the primary dataset has no scored position to measure influence on")
    model = ctx.model
    has_source = lookup.source is not None
    # layer 0's resid_pre is the embedding itself: one gradient serves both
    names = [EMBED] + [f"blocks.{i}.hook_resid_pre" for i in ctx.layers if i > 0]
    infl = influence_on_answer(model, batch, names, lookup, ctx.batch_size)  # name -> (b, l)
    if 0 in ctx.layers:
        names.insert(1, "blocks.0.hook_resid_pre")
        infl[names[1]] = infl[EMBED]
    last = lookup.column(-1)
    query = last.query[:, 0]
    classes = position_classes(lookup, batch.seq_len)
    metrics: dict[str, Any] = {"dataset": ds["primary"], "sequences": len(batch), "seq_len": batch.seq_len,
                               "threshold": opts.threshold, "classes": list(classes)}
    shares_m, horizon_m, profiles, data_infl = {}, {}, {}, {}
    for name in names:
        label = _label(name)
        x = infl[name]
        shares = class_shares(x, classes)
        shares_m[str(label)] = {c: estimate(v, seed=ctx.seed).to_dict() for c, v in shares.items()}
        data_infl[label] = {c: float(np.mean(v)) for c, v in shares.items()}
        horizon = memory_horizon(x[:, None], opts.threshold, query)[:, 0].double()
        horizon_m[str(label)] = estimate(horizon, "median", seed=ctx.seed).to_dict()
        profiles[str(label)] = influence_profile(x[:, None], query)
    metrics["influence_share"] = shares_m
    metrics["memory_horizon"] = horizon_m

    hits: dict[str, float] = {}
    hit_m: dict[str, Any] = {}
    if has_source:
        value, per = top_source_hit(model, batch, lookup, influence=infl[EMBED])
        hits["1x"] = value
        hit_m["1x"] = {"value": value, "ci_exact": proportion_ci(per), "n": int(per.numel()),
                       "seq_len": batch.seq_len}
        for k in ctx.progress(opts.lengths, desc="long range"):
            longer = _longer_batch(ctx, ds, k * batch.seq_len, opts.long_range_samples, ctx.seed % (2**31) + k)
            if longer is None:
                hit_m[f"{k}x"] = {"skipped": "the task has a fixed length"}
                continue
            value, per = top_source_hit(model, longer, batch_size=ctx.batch_size)
            hits[f"{k}x"] = value
            hit_m[f"{k}x"] = {"value": value, "ci_exact": proportion_ci(per), "n": int(per.numel()),
                              "seq_len": longer.seq_len}
        metrics["top_source_hit"] = hits
        metrics["top_source_hit_ci"] = hit_m
    ioi = ds["sets"].get("ioi") if ds["primary"] != "ioi" else None
    if ioi is not None:
        value, per = top_source_hit(model, ioi, batch_size=ctx.batch_size)
        metrics["ioi_top_source_hit"] = {"value": value, "ci_exact": proportion_ci(per), "n": int(per.numel())}

    tensors = {f"influence.{_label(n)}": infl[n] for n in names}
    tensors.update({f"profile.{k}": v for k, v in profiles.items()})
    tensors["query"] = query
    ctx.save_tensors("influence", tensors)
    data = {"influence": data_infl, "top_source_hit": hits}
    ctx.save_json("data", {"influence": {str(k): v for k, v in data_infl.items()}, "top_source_hit": hits})
    if ctx.config.figures:
        _figures(ctx, names, shares_m, profiles, infl, last, hit_m, opts)
    return StepResult(metrics=metrics, reading=_reading(metrics, has_source), data=data)


def _reading(m: dict[str, Any], has_source: bool) -> str:
    parts = []
    for label, shares in m["influence_share"].items():
        where = "the embedding" if label == "embed" else f"the input of layer {label}"
        top = sorted(shares.items(), key=lambda kv: -kv[1]["value"])
        text = ", ".join(f"{c} {v['value']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]" for c, v in top)
        h = m["memory_horizon"][label]
        parts.append(f"Share of the answer's gradient norm at {where}: {text}; median memory horizon "
                     f"{h['value']:.0f} tokens [{h['ci'][0]:.0f}, {h['ci'][1]:.0f}] at threshold {m['threshold']:g}.")
    if has_source:
        hits = m["top_source_hit_ci"]
        desc = "; ".join(
            f"{k}: {v['value']:.3f} (exact CI {v['ci_exact'][0]:.3f}–{v['ci_exact'][1]:.3f}, {v['n']} sequences of "
            f"{v['seq_len']} tokens)" if "value" in v else f"{k}: skipped ({v['skipped']})" for k, v in hits.items())
        parts.append("The most influential source other than the query is the trigger or the source in a fraction "
                     f"of the sequences: {desc}.")
    else:
        parts.append("The task has no recall source, so top_source_hit is not defined.")
    if "ioi_top_source_hit" in m:
        v = m["ioi_top_source_hit"]
        parts.append(f"On IOI prompts the indirect object is the top source in {v['value']:.3f} of {v['n']} prompts "
                     f"(exact CI {v['ci_exact'][0]:.3f}–{v['ci_exact'][1]:.3f}).")
    return " ".join(parts)


def _figures(ctx: StepContext, names: list[str], shares: dict, profiles: dict, infl: dict, last: Any, hits: dict,
             opts: Options) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(_label(n)) for n in names]
    classes = list(next(iter(shares.values())))
    fig, ax = plt.subplots(figsize=(1.4 * len(labels) * len(classes) / 2 + 3, 3.6), layout="constrained")
    width = 0.8 / len(classes)
    x = np.arange(len(labels))
    for k, c in enumerate(classes):
        vals = np.array([shares[lab][c]["value"] for lab in labels])
        err = np.array([[v - shares[lab][c]["ci"][0], shares[lab][c]["ci"][1] - v] for lab, v in zip(labels, vals)]).T
        ax.bar(x + k * width, vals, width, yerr=err, label=c)
    ax.set_xticks(x + 0.4 - width / 2, ["embedding" if lab == "embed" else f"resid_pre {lab}" for lab in labels])
    ax.set(title="share of the answer's gradient norm by source position (95% CI)", ylabel="share", ylim=(0, 1.05))
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "influence_classes")

    fig, ax = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
    for lab in labels:
        p = profiles[lab].numpy()
        ax.plot(np.arange(p.size), np.maximum(p, 1e-8), label="embedding" if lab == "embed" else f"resid_pre {lab}")
    ax.set(yscale="log", title="mean normalised influence by distance", xlabel="t − s (tokens)", ylabel="share")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "influence_distance")

    n = min(opts.examples, infl[names[0]].shape[0])
    fig, axes = plt.subplots(n, 1, figsize=(9, 1.7 * n + 0.6), squeeze=False, layout="constrained")
    for r in range(n):
        ax = axes[r, 0]
        for name, lab in zip(names, labels):
            ax.plot(infl[name][r].numpy(), lw=1, label="embedding" if lab == "embed" else f"resid_pre {lab}")
        for pos, (c, style) in ((last.source, ("tab:red", "--")), (last.trigger, ("tab:green", ":"))):
            if pos is not None:
                ax.axvline(int(pos[r, 0]), color=c, ls=style, lw=1)
        ax.axvline(int(last.query[r, 0]), color="k", lw=1)
        ax.set(yscale="log", ylabel="‖grad‖")
        ax.set_title(f"sequence {r}: query (black), source (red), trigger (green)", fontsize=8)
    axes[0, 0].legend(fontsize=7, ncol=len(labels))
    axes[-1, 0].set_xlabel("source position s")
    ctx.save_figure(fig, "influence_examples")

    done = {k: v for k, v in hits.items() if "value" in v}
    if done:
        fig, ax = plt.subplots(figsize=(5, 3.4), layout="constrained")
        xs = [v["seq_len"] for v in done.values()]
        ys = [v["value"] for v in done.values()]
        err = np.array([[y - v["ci_exact"][0], v["ci_exact"][1] - y] for y, v in zip(ys, done.values())]).T
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3)
        ax.set(xscale="log", ylim=(0, 1.05), title="top source is the trigger or the source (exact 95% CI)",
               xlabel="sequence length", ylabel="fraction of sequences")
        ax.title.set_fontsize(9)
        ctx.save_figure(fig, "long_range")
