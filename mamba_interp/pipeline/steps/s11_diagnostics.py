"""Step 11 (diagnostics): logit lens and tuned lens by layer, direct logit attribution, layer ablation.

On step 1's primary dataset (methods in :mod:`mamba_interp.lens`):

* **Lenses.** The logit lens at every residual entry (the embedding, the input of each block, the final
  residual): KL(final ‖ lens) over all real tokens and at the scored positions, and the top-1 accuracy on the
  target there. A tuned lens (Belrose et al. 2023) is trained on step 1's held-out sequences (or the first half of
  the batch when there are none) and evaluated on both: its KL on its training tokens and on the primary batch.
  "Decodable" = the first entry whose lens accuracy reaches ``decodable_fraction`` of the model's own.
* **Direct logit attribution** at the scored positions: each component's contribution to the target's centred
  logit (target logit minus the mean logit over the vocabulary), through the final RMSNorm with its scale frozen;
  against a random-token control (the same attribution for a random token of the vocabulary instead of the
  target); per position class (the clean model right / wrong, and for tasks with a ``distance`` the nearer and
  farther half); the top channels (Mamba-1) or heads (Mamba-2) of every mixer.
* **Layer ablation** of every analysed layer's mixer output and of its conv / SSM / gate components, for each
  ablation kind (zero; per-position mean and resampling over the held-out sequences), on ``ablation_samples``
  sequences: loss and accuracy change with bootstrap CIs over sequences, normalised by ablating every mixer.

Outputs: ``lens_kl.png``, ``lens_accuracy.png``, ``dla.png``, ``ablation.png``, ``tuned_lens/`` (the trained lens,
``TunedLens.load``), ``lens.safetensors`` (per-sequence KL per entry), ``dla.safetensors`` (per-pair
contributions, units' mean attributions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mamba_interp.lens import (ABLATION_KINDS, COMPONENT_HOOKS, TunedLens, TunedLensConfig, dla_at, layer_ablation,
                               logit_lens)
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import register_step
from mamba_interp.pipeline.steps.s03_sae import _tuple_of
from mamba_interp.stats import estimate
from mamba_interp.tasks.base import IGNORE

LENS_FOLDER = "tuned_lens"
LENS_ELEMENTS = 2**24


@dataclass(frozen=True)
class Options:
    lens_steps: int = 250
    """SGD steps of the tuned lens (Belrose et al. train 250 steps of 2^18 tokens)."""
    lens_lr: float = 0.1
    lens_batch_tokens: int = 4096
    """Tokens per tuned-lens step (random subsets of the training tokens)."""
    ablation_kinds: tuple[str, ...] = ABLATION_KINDS
    ablation_components: tuple[str, ...] = tuple(COMPONENT_HOOKS)
    ablation_samples: int = 64
    """Sequences of the primary batch the ablations run on (each ablation is one forward pass over them)."""
    top_units: int = 5
    """Channels / heads per mixer listed by their direct attribution."""
    decodable_fraction: float = 0.9
    n_resamples: int = 1000
    """Bootstrap resamples of every CI."""

    def __post_init__(self) -> None:
        for name, allowed in (("ablation_kinds", ABLATION_KINDS), ("ablation_components", tuple(COMPONENT_HOOKS))):
            values = _tuple_of(getattr(self, name), name, str)
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"{name}: {bad[0]!r} is unknown; choose from {', '.join(allowed)}")
            object.__setattr__(self, name, tuple(dict.fromkeys(values)))
        for name in ("lens_steps", "lens_batch_tokens", "ablation_samples", "top_units", "n_resamples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.lens_lr, (int, float)) or not self.lens_lr > 0:
            raise ValueError(f"lens_lr={self.lens_lr!r} must be a positive number")
        if not 0 < self.decodable_fraction <= 1:
            raise ValueError(f"decodable_fraction={self.decodable_fraction!r} must be in (0, 1]")


def _per_sequence(values: torch.Tensor, where: torch.Tensor) -> np.ndarray:
    """values [b, l], where [b, l] bool -> the mean over each sequence's selected positions [b] (NaN if none)."""
    w = where.double()
    return ((values.double().nan_to_num() * w).sum(-1) / w.sum(-1)).numpy()


def _lens_metrics(res, scored: torch.Tensor, n_resamples: int, seed: int) -> dict[str, Any]:
    """Per entry: KL (all real tokens, scored positions), top-1 accuracy and target probability at the scored
    positions, each an estimate with a bootstrap CI over sequences."""
    out: dict[str, list] = {"kl": [], "kl_scored": [], "accuracy": [], "target_prob": []}
    for i in range(len(res.labels)):
        kw = dict(n_resamples=n_resamples, seed=seed)
        out["kl"].append(estimate(_per_sequence(res.kl[i], res.mask), **kw).to_dict())
        out["kl_scored"].append(estimate(_per_sequence(res.kl[i], scored), **kw).to_dict())
        out["accuracy"].append(estimate(_per_sequence((res.target_rank[i] == 0).double(), scored), **kw).to_dict())
        out["target_prob"].append(estimate(_per_sequence(res.target_logprob[i].exp(), scored), **kw).to_dict())
    return out


def _decodable(labels: list[str], accuracy: list[dict], fraction: float) -> str | None:
    final = accuracy[-1]["value"]
    if not final > 0:
        return None
    return next(lab for lab, a in zip(labels, accuracy) if a["value"] >= fraction * final)


def _lenses(ctx: StepContext, opts: Options, batch, train) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
    """Lens metrics, per-sequence KL tensors, and the logit lens of the batch (its final entry is the model)."""
    model, seed = ctx.model, ctx.seed
    # one entry's float64 log-probabilities per chunk: keep them near LENS_ELEMENTS for large vocabularies
    bs = max(1, min(ctx.batch_size, LENS_ELEMENTS // (batch.seq_len * model.cfg.vocab_size)))
    scored = batch.eval_mask & (batch.targets != IGNORE)
    ll = logit_lens(model, batch.tokens, batch.targets, batch.attention_mask, batch_size=bs, return_logits=False)
    lens = TunedLens.for_model(model)
    config = TunedLensConfig(steps=opts.lens_steps, lr=opts.lens_lr, batch_tokens=opts.lens_batch_tokens,
                             seed=seed % 2**31)
    fit = lens.fit(model, train.tokens, train.attention_mask, config, batch_size=bs)
    lens.save(ctx.path(LENS_FOLDER))
    tl = lens.lens(model, batch.tokens, batch.targets, batch.attention_mask, batch_size=bs)
    logit_m = _lens_metrics(ll, scored, opts.n_resamples, seed)
    tuned_m = _lens_metrics(tl, scored, opts.n_resamples, seed)
    tuned_m["kl_train"] = fit.kl_after.tolist()
    logit_m["kl_train"] = fit.kl_before.tolist()
    tuned_m["loss_first_last"] = [fit.history[0], fit.history[-1]]
    tuned_m["train_sequences"], tuned_m["train_tokens"] = len(train), fit.tokens
    metrics = {
        "labels": ll.labels, "logit_lens": logit_m, "tuned_lens": tuned_m,
        "decodable": {"logit": _decodable(ll.labels, logit_m["accuracy"], opts.decodable_fraction),
                      "tuned": _decodable(ll.labels, tuned_m["accuracy"], opts.decodable_fraction)},
        "scored_positions": int(scored.sum()),
    }
    per_seq = {f"{name}.kl": torch.stack([torch.from_numpy(_per_sequence(r.kl[i], r.mask))
                                          for i in range(len(r.labels))]).float()
               for name, r in (("logit_lens", ll), ("tuned_lens", tl))}
    return metrics, per_seq, ll


def _position_classes(batch, rows: torch.Tensor, cols: torch.Tensor, correct: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean masks over the scored pairs: the clean model right / wrong, and (tasks with a ``distance`` to the
    answer) the nearer and farther half."""
    classes = {"model right": correct, "model wrong": ~correct}
    dist = batch.metadata.get("distance")
    if isinstance(dist, torch.Tensor) and dist.dim() == 1:
        d = dist[rows].double()
        median = float(d.median())
        classes[f"distance <= {median:g}"] = d <= median
        classes[f"distance > {median:g}"] = d > median
    return {k: v for k, v in classes.items() if int(v.sum()) >= 2}


def _dla(ctx: StepContext, opts: Options, batch, clean_rank: torch.Tensor
         ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``clean_rank`` [b, l]: the target's rank under the model (the logit lens' final entry)."""
    model, seed = ctx.model, ctx.seed
    scored = batch.eval_mask & (batch.targets != IGNORE)
    rows, cols = torch.nonzero(scored, as_tuple=True)
    answer = batch.targets[rows, cols]
    res = dla_at(model, batch.tokens, rows, cols, answer, "mean", units=True,
                 attention_mask=batch.attention_mask, batch_size=ctx.batch_size)
    vocab = model.cfg.vocab_size
    gen = torch.Generator().manual_seed(seed % 2**31)
    random_tok = (answer + torch.randint(1, vocab, answer.shape, generator=gen)) % vocab  # never the answer
    control = dla_at(model, batch.tokens, rows, cols, random_tok, "mean", attention_mask=batch.attention_mask,
                     batch_size=ctx.batch_size)
    kw = dict(n_resamples=opts.n_resamples, seed=seed)
    stack, names = res.stacked()
    recomposed = stack.sum(0) + res.bias
    # float32 forward vs float64 attribution: the error relative to the largest logit difference
    rel_err = float((recomposed - res.total).abs().max() / res.total.abs().max().clamp(min=1e-12))
    classes = _position_classes(batch, rows, cols, clean_rank[rows, cols] == 0)
    metrics: dict[str, Any] = {
        "metric": "target logit minus the mean logit over the vocabulary",
        "pairs": int(rows.numel()),
        "max_relative_error": rel_err,
        "total": estimate(res.total, **kw).to_dict(),
        "components": {n: estimate(res.contributions[n], **kw).to_dict() for n in names},
        "control": {n: estimate(control.contributions[n], **kw).to_dict() for n in names},
        "by_class": {c: {"n": int(m.sum()),
                         "components": {n: estimate(res.contributions[n][m], **kw).to_dict() for n in names}}
                     for c, m in classes.items()},
        "unit_kind": res.unit_kind,
        "top_units": {},
    }
    tensors = {"rows": rows, "positions": cols, "answer": answer, "total": res.total.float()}
    for n in names:
        tensors[f"contribution.{n}"] = res.contributions[n].float()
    for name, per_unit in res.units.items():
        mean = per_unit.mean(0)
        tensors[f"units_mean.{name}"] = mean.float()
        top = torch.argsort(mean, descending=True)[: opts.top_units].tolist()
        layer_total = float(res.contributions[name].mean())
        metrics["top_units"][name] = [
            {"unit": int(u), **estimate(per_unit[:, u], **kw).to_dict(),
             "share": float(mean[u]) / layer_total if abs(layer_total) > 1e-12 else None} for u in top]
    return metrics, tensors


def _ablation(ctx: StepContext, opts: Options, batch, reference) -> dict[str, Any]:
    sub = batch.select(slice(0, min(opts.ablation_samples, len(batch))))
    reference = reference.select(slice(0, min(opts.ablation_samples, len(reference))))
    out = {}
    for kind in ctx.progress(opts.ablation_kinds, desc="ablation"):
        res = layer_ablation(ctx.model, sub, kind, layers=ctx.layers, components=opts.ablation_components,
                             reference=None if kind == "zero" else reference, batch_size=ctx.batch_size,
                             seed=ctx.seed % 2**31, n_resamples=opts.n_resamples)
        out[kind] = {"clean": res["clean"], "effects": [e.to_dict() for e in res["effects"]]}
    return {"sequences": len(sub), "reference_sequences": len(reference), "kinds": out}


@register_step(11, "diagnostics", requires=(1,), title="Logit / tuned lens, direct logit attribution, layer ablation",
               options=Options, version=1)
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    ds = ctx.data(1)
    batch, heldout = ds["batch"], ds["heldout"]
    if heldout is None or heldout.seq_len != batch.seq_len:
        if len(batch) < 2:
            raise ValueError("step 11 needs at least 2 sequences to train the tuned lens on held-out ones; raise "
                             "--samples")
        half = max(1, len(batch) // 2)
        heldout, batch = batch.select(slice(0, half)), batch.select(slice(half, len(batch)))
    if int((batch.eval_mask & (batch.targets != IGNORE)).sum()) == 0:
        raise ValueError(f"the primary dataset {ds['primary']!r} has no scored positions to attribute")
    lens_m, lens_t, ll = _lenses(ctx, opts, batch, heldout)
    dla_m, dla_t = _dla(ctx, opts, batch, ll.target_rank[-1])
    abl_m = _ablation(ctx, opts, batch, heldout)
    ctx.save_tensors("lens", lens_t)
    ctx.save_tensors("dla", dla_t)
    metrics = {"dataset": ds["primary"], "sequences": len(batch), "lens": lens_m, "dla": dla_m, "ablation": abl_m}
    if ctx.config.figures:
        from mamba_interp.lens import plots

        for name, fig in plots.diagnostics_figures(metrics).items():
            ctx.save_figure(fig, name)
    return StepResult(metrics=metrics, reading=_reading(metrics),
                      artifacts=[f"{LENS_FOLDER}/tuned_lens.safetensors", f"{LENS_FOLDER}/tuned_lens.json"])


def _fmt(e: dict[str, Any], digits: int = 3) -> str:
    lo, hi = e["ci"]
    return f"{e['value']:.{digits}g} [{lo:.{digits}g}, {hi:.{digits}g}]"


def _reading(m: dict[str, Any]) -> str:
    lens, dla, abl = m["lens"], m["dla"], m["ablation"]
    labels = lens["labels"]
    ll, tl = lens["logit_lens"], lens["tuned_lens"]
    parts = []
    final_acc = ll["accuracy"][-1]["value"]
    for name, key in (("logit", "logit"), ("tuned", "tuned")):
        at = lens["decodable"][key]
        acc = (ll if key == "logit" else tl)["accuracy"]
        if at is None:
            parts.append(f"With the {name} lens the target is never decodable (the model's own top-1 accuracy at "
                         f"the {lens['scored_positions']} scored positions is {final_acc:.3f}).")
        else:
            i = labels.index(at)
            prev = f", against {_fmt(acc[i - 1])} at {labels[i - 1]}" if i > 0 else ""
            parts.append(f"With the {name} lens the target becomes decodable at {at}: top-1 accuracy {_fmt(acc[i])}"
                         f"{prev} (the model: {final_acc:.3f}).")
    kl = " / ".join(f"{a['value']:.3g}" for a in ll["kl"][:-1])
    tkl = " / ".join(f"{a['value']:.3g}" for a in tl["kl"][:-1])
    train_better = all(t <= lg + 1e-9 for t, lg in zip(tl["kl_train"], ll["kl_train"]))
    held_better = all(t["value"] <= lg["value"] + 1e-9 for t, lg in zip(tl["kl"], ll["kl"]))
    parts.append(f"KL(final ‖ lens) in nats over {', '.join(labels[:-1])}: logit lens {kl}, tuned lens {tkl} on "
                 f"held-out tokens; the tuned lens is {'at or below' if held_better else 'not everywhere below'} the "
                 f"logit lens there, and {'at or below' if train_better else 'NOT everywhere below'} it on its "
                 f"{tl['train_sequences']} training sequences.")
    comps = dla["components"]
    order = sorted((n for n in comps if n != "embed"), key=lambda n: -abs(comps[n]["value"]))
    desc = "; ".join(f"{n} {_fmt(comps[n])} (random-token control {_fmt(dla['control'][n])})" for n in order[:3])
    parts.append(f"Direct logit attribution of the target's centred logit ({_fmt(dla['total'])} in total over "
                 f"{dla['pairs']} scored positions): embedding {_fmt(comps['embed'])}; {desc}.")
    top = order[0] if order else None
    if top and dla["top_units"].get(top):
        units = dla["top_units"][top][:3]
        unit_txt = ", ".join(f"{dla['unit_kind']} {u['unit']} {u['value']:.3g}" for u in units)
        share = sum(u["share"] or 0 for u in units)
        parts.append(f"In {top} the top {dla['unit_kind']}s are {unit_txt} ({100 * share:.0f}% of its attribution).")
    for kind, res in abl["kinds"].items():
        effects = [e for e in res["effects"] if e["target"] != "all mixers"]
        worst = max(effects, key=lambda e: e["delta_loss"]["value"])
        allm = next(e for e in res["effects"] if e["target"] == "all mixers")
        mixers = [e for e in effects if e["target"].endswith(".mixer")]
        mix_txt = ", ".join(f"{e['target']} {_fmt(e['delta_loss'])}" for e in mixers)
        parts.append(f"{kind.capitalize()} ablation on {abl['sequences']} sequences (clean loss "
                     f"{res['clean']['loss']:.3g}): loss change {mix_txt}; the largest is {worst['target']} "
                     f"({_fmt(worst['delta_loss'])} nats, accuracy {_fmt(worst['delta_accuracy'])}); every mixer at "
                     f"once {_fmt(allm['delta_loss'])}.")
    return " ".join(parts)
