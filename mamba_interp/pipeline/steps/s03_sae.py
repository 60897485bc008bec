"""Step 3 (sae): sparse autoencoders on chosen hooks, their quality, and what their latents mean.

For every (hook, layer) in the options (default: the residual stream ``resid_post`` and the SSM input ``x`` and
output ``y`` at every analysed layer) one SAE (``mamba_interp.sparse_autoencoder.train_sae``; TopK by default,
d_sae = ``expansion`` · d, sparse_coding.md §8) is trained on step 2's activations of the primary dataset
(``ActivationSet.tokens``; Mamba-2's [b, l, h, p] hooks are flattened to h·p). Everything else is measured on
held-out tokens: step 1's ``heldout`` sequences (fresh samples of the task), or the last ``eval_fraction`` of the
sequences when there are none (or the task is finite, e.g. modular addition, whose held-out sample is the same
fixed test split).

Per SAE (sparse_coding.md §2.2): L0, FVU, dead/dense fractions, shrinkage (``sae_metrics``) on the held-out tokens
(FVU on the training tokens too, to show over-fitting); loss recovered when the SAE's reconstruction replaces the
activation in the model at every position, scored by the mean cross-entropy at the task's target positions,
against zero ablation and mean ablation (the training mean) of the same activation (``loss_recovered``); the
Pearson correlation of every live latent with every ground-truth variable (``pipeline/task_variables.py``:
token, previous token, position, the answer, and task-specific ones such as induction's ``after_trigger`` and
``stored_value``; categorical variables one-hot per class), with a shuffled-variable baseline
(``feature_variable_correlation``); and the top-activating held-out tokens of the best latent per variable.
Loss recovered is reported for every SAE, but the reading skips hooks whose mean ablation moves the loss by less
than ``MIN_ABLATION_EFFECT`` nats (a ratio of two tiny differences). Each SAE is measured, saved and handed on with
its activation scale folded into the weights, so a resumed run that loads it reproduces the same numbers.

Outputs: one folder per SAE, ``sae_L<layer>_<hook>/`` (``cfg.json`` + ``sae.safetensors``, SAELens layout,
``save_sae``), ``latent_density.safetensors`` (firing frequency of every latent on the held-out tokens, by SAE),
``correlations.json`` (best latent per variable class, per SAE), ``top_examples.json``; figures
``feature_density.png``, ``loss_recovered.png``, ``feature_variable_matches.png``, ``correlation_heatmap.png``,
``training_curves.png``, ``top_examples.png``.

Data for later steps (``ctx.data(3)``): ``saes`` (key ``"L<layer>_<hook>"`` -> :class:`TrainedSAE`) and
``options``; the loader rebuilds both from the folders on ``--resume``. :func:`sae_activations` gives later
steps the same train/held-out activations.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_interp.pipeline.activation_stats import STATE_NORM, ActivationSet, collect_activations, hook_name
from mamba_interp.pipeline.config import HOOK_CHOICES
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import register_step
from mamba_interp.sparse_autoencoder import (
    ARCHITECTURES,
    SAEConfig,
    SparseAutoencoder,
    encode_activations,
    feature_variable_correlation,
    load_sae,
    loss_recovered,
    sae_metrics,
    save_sae,
    top_activating_examples,
)

SAE_HOOKS = tuple(h for h in HOOK_CHOICES if h != STATE_NORM)
"""Hooks an SAE can be trained on and spliced into (``state_norm`` is a derived statistic, not an activation)."""
DENSITY_FILE = "latent_density"
MATCH_THRESHOLD = 0.8  # the bar for "a latent tracks a ground-truth variable"
MIN_ABLATION_EFFECT = 0.01
"""Nats: below this change of the loss under mean ablation, "loss recovered" divides noise by noise."""


def _tuple_of(value: Any, name: str, kind: type) -> tuple:
    if isinstance(value, str) and kind is str:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                       for v in value):
        raise ValueError(f"{name}={value!r} must be a list of {kind.__name__}s")
    return tuple(value)


@dataclass(frozen=True)
class Options:
    """Which activations get an SAE, the SAE recipe, and the analysis settings."""

    hooks: tuple[str, ...] = ("resid_post", "x", "y")
    """Short hook names (``HOOK_CHOICES`` except ``state_norm``); one SAE per hook and layer."""
    layers: tuple[int, ...] | None = None
    """Layers to train SAEs at; None: the run's layers."""
    architecture: str = "topk"
    expansion: int = 4
    """d_sae = expansion · d (the hook's width)."""
    k: int = 16
    """Active latents per token (topk, batchtopk)."""
    l1_coefficient: float = 1.0
    """Sparsity coefficient (relu, jumprelu only)."""
    epochs: float = 8.0
    """Passes over the training tokens: steps = ceil(epochs · tokens / batch_size)."""
    batch_size: int = 256
    lr: float = 3e-3
    dead_window_tokens: int | None = None
    """AuxK: a latent is dead after this many training tokens without firing; None: one epoch (at most 200k)."""
    eval_fraction: float = 0.25
    """Fraction of the sequences held out for evaluation when step 1 provides no held-out sequences."""
    max_classes: int = 16
    """One-hot at most this many (most frequent) classes of a categorical variable."""
    min_count: int = 5
    """Drop indicator variables with fewer positives (or negatives) than this on the held-out tokens."""
    n_shuffles: int = 2
    """Shuffles of each variable for the chance baseline of the best |r|."""
    top_examples: int = 8
    """Top-activating held-out tokens kept per shown latent."""

    def __post_init__(self) -> None:
        hooks = _tuple_of(self.hooks, "hooks", str)
        if not hooks:
            raise ValueError("hooks is empty; name at least one hook, e.g. [resid_post]")
        bad = [h for h in hooks if h not in SAE_HOOKS]
        if bad:
            raise ValueError(f"hook {bad[0]!r} cannot take an SAE; choose from {', '.join(SAE_HOOKS)}")
        object.__setattr__(self, "hooks", tuple(dict.fromkeys(hooks)))
        if self.layers is not None:
            layers = _tuple_of(self.layers, "layers", int)
            if not layers or min(layers) < 0:
                raise ValueError(f"layers={self.layers!r} must be non-negative layer indices (or null for the run's)")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} is unknown; use one of {', '.join(ARCHITECTURES)}")
        for name in ("expansion", "k", "batch_size", "max_classes", "min_count", "top_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.n_shuffles, int) or self.n_shuffles < 0:
            raise ValueError(f"n_shuffles={self.n_shuffles!r} must be a non-negative integer")
        for name in ("epochs", "lr", "l1_coefficient"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive number")
        if self.dead_window_tokens is not None and (not isinstance(self.dead_window_tokens, int)
                                                    or self.dead_window_tokens < 1):
            raise ValueError(f"dead_window_tokens={self.dead_window_tokens!r} must be a positive integer or null")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction={self.eval_fraction!r} must be in (0, 1)")

    def sae_config(self, d_in: int, n_train: int, seed: int, device: str) -> SAEConfig:
        steps = max(1, math.ceil(self.epochs * n_train / self.batch_size))
        window = self.dead_window_tokens or min(200_000, max(n_train, self.batch_size))
        return SAEConfig(
            d_in=d_in, d_sae=self.expansion * d_in, architecture=self.architecture,  # type: ignore[arg-type]
            k=min(self.k, self.expansion * d_in) if self.architecture in ("topk", "batchtopk") else None,
            l1_coefficient=self.l1_coefficient if self.architecture in ("relu", "jumprelu") else 0.0,
            lr=self.lr, steps=steps, batch_size=min(self.batch_size, n_train), seed=seed,
            dead_window_tokens=window, log_every=max(1, steps // 100), device=device,
        )


@dataclass
class TrainedSAE:
    """One SAE of step 3 and where it sits in the model."""

    key: str
    """``"L<layer>_<hook>"``; also its folder ``sae_<key>``."""
    hook: str
    layer: int
    sae: SparseAutoencoder
    density: Tensor
    """[m] firing frequency of each latent on the held-out tokens."""

    @property
    def folder(self) -> str:
        return f"sae_{self.key}"

    @property
    def hook_name(self) -> str:
        return hook_name(self.hook, self.layer)


def sae_key(hook: str, layer: int) -> str:
    return f"L{layer}_{hook}"


# ---- activations: train / held-out split ---------------------------------------------------------
@dataclass
class SAEActivations:
    """Training activations, held-out activations and the held-out sequences (with their ground truth)."""

    train: ActivationSet
    eval: ActivationSet
    eval_batch: Any
    """The ``TaskBatch`` whose tokens produced ``eval``."""
    split: str
    """``"heldout"`` (step 1's fresh sequences) or ``"sequences"`` (the last part of the primary dataset)."""


def _subset(acts: ActivationSet, rows: slice) -> ActivationSet:
    return ActivationSet({k: v[rows] for k, v in acts.acts.items()}, dict(acts.shapes), acts.mask[rows],
                         acts.layers, acts.hooks)


def sae_activations(ctx: StepContext, hooks: tuple[str, ...], layers: tuple[int, ...],
                    eval_fraction: float) -> SAEActivations:
    """Step 2's activations of the primary dataset for training (collected afresh for hooks step 2 skipped),
    and held-out activations: step 1's ``heldout`` sequences, else (none, or a finite task whose held-out sample
    repeats the primary one) the last ``eval_fraction`` of the sequences."""
    ds = ctx.data(1)
    batch, heldout = ds["batch"], ds.get("heldout")
    acts = ctx.data(2)["activations"]

    def collect(b):
        return collect_activations(ctx.model, b.tokens, layers, hooks, ctx.batch_size,
                                   attention_mask=b.attention_mask,
                                   progress=lambda it: ctx.progress(it, desc="collecting"))

    if any((h, i) not in acts.acts for h in hooks for i in layers):
        acts = collect(batch)
    # a finite task's "held-out" sample is its fixed test split again, i.e. the same sequences: split those instead
    if heldout is not None and not getattr(ds.get("task"), "finite", False):
        return SAEActivations(acts, collect(heldout), heldout, "heldout")
    b = acts.mask.shape[0]
    n_eval = min(b - 1, max(1, round(eval_fraction * b)))
    if b < 2:
        raise ValueError("step 3 needs at least 2 sequences to hold some out; raise --samples")
    return SAEActivations(_subset(acts, slice(0, b - n_eval)), _subset(acts, slice(b - n_eval, b)),
                          batch.select(slice(b - n_eval, b)), "sequences")


# ---- loss recovered ----------------------------------------------------------------------------
@torch.no_grad()
def target_loss(model: Any, batch: Any, batch_size: int, fwd_hooks: list | None = None) -> float:
    """Mean cross-entropy over the batch's target positions (targets != -100), with optional hooks."""
    from mamba_interp.tasks.base import IGNORE

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(batch), batch_size):
        ids = batch.tokens[s:s + batch_size].to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask[s:s + batch_size].to(device)
        targets = batch.targets[s:s + batch_size].to(device)
        logits = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=fwd_hooks or [])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                 ignore_index=IGNORE, reduction="sum").item()
        count += int((targets != IGNORE).sum())
    if count == 0:
        raise ValueError("the held-out batch has no target positions to score the loss on")
    return total / count


def splice_hooks(sae: SparseAutoencoder, mean: Tensor) -> dict[str, Any]:
    """Hook functions replacing an activation [b, l, ...] (Mamba-2: [b, l, h, p]) by the SAE reconstruction, by
    zeros, or by ``mean`` [k] (k = the flattened width)."""

    def spliced(t: Tensor, hook: Any) -> Tensor:
        flat = t.reshape(*t.shape[:2], -1)  # (b, l, k)
        return sae(flat.to(sae.device, torch.float32)).to(t.device, t.dtype).reshape(t.shape)

    def zero(t: Tensor, hook: Any) -> Tensor:
        return torch.zeros_like(t)

    def mean_ablate(t: Tensor, hook: Any) -> Tensor:
        return mean.to(t.device, t.dtype).reshape(t.shape[2:]).expand(t.shape).clone()

    return {"spliced": spliced, "zero": zero, "mean": mean_ablate}


# ---- resume ------------------------------------------------------------------------------------
def load(ctx: StepContext) -> dict:
    """Rebuild every SAE from its folder and the held-out densities from ``latent_density.safetensors``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = str(ctx.out_dir / f"{DENSITY_FILE}.safetensors")
    density = load_file(path)
    with safe_open(path, framework="pt") as f:
        order = json.loads(f.metadata()["order"])  # the training order (layers, then hooks as in the options)
    saes: dict[str, TrainedSAE] = {}
    for key in order:
        folder = ctx.out_dir / f"sae_{key}"
        extra = json.loads((folder / "cfg.json").read_text())["mamba_interp"]["extra"]
        sae = load_sae(folder, device=ctx.device)
        saes[key] = TrainedSAE(key, extra["hook"], int(extra["layer"]), sae, density[key])
    return {"saes": saes, "options": ctx.options or Options()}


# ---- the step ----------------------------------------------------------------------------------
@register_step(3, "sae", requires=(1, 2), title="Sparse autoencoders: features and task variables", load=load,
               options=Options, version=1)
def run(ctx: StepContext) -> StepResult:
    from mamba_interp.pipeline.task_variables import expand_variables, task_variables

    opts: Options = ctx.options or Options()
    n_layer = ctx.model.cfg.n_layer
    layers = opts.layers if opts.layers is not None else tuple(ctx.layers)
    bad = [i for i in layers if i >= n_layer]
    if bad:
        raise ValueError(f"sae option layers={list(layers)}: layer {bad[0]} does not exist (the model has {n_layer})")
    if ctx.model.cfg.arch == "mamba2" and "dt_low" in opts.hooks:
        raise ValueError("hook 'dt_low' does not exist in Mamba-2; remove it from the sae hooks")
    data = sae_activations(ctx, opts.hooks, layers, opts.eval_fraction)
    ev = data.eval_batch
    variables, base_of = expand_variables(task_variables(ev, data.eval.mask), data.eval.mask, opts.max_classes,
                                          opts.min_count)
    clean = target_loss(ctx.model, ev, ctx.batch_size)

    trained: dict[str, TrainedSAE] = {}
    per_sae: dict[str, dict[str, Any]] = {}
    correlations: dict[str, list[dict]] = {}
    histories: dict[str, Any] = {}
    features_eval: dict[str, Tensor] = {}
    work = [(i, h) for i in layers for h in opts.hooks]
    for idx, (layer, hook) in enumerate(ctx.progress(work, desc="SAEs")):
        key = sae_key(hook, layer)
        x_train = data.train.tokens(hook, layer)  # (N_train, k)
        x_eval = data.eval.tokens(hook, layer)  # (N_eval, k)
        cfg = opts.sae_config(x_train.shape[1], x_train.shape[0], (ctx.seed + 7919 * idx) % 2**31, str(ctx.device))
        sae = _train(x_train, cfg)
        histories[key] = sae.training_history
        m_eval = sae_metrics(sae, x_eval)
        m_train = sae_metrics(sae, x_train)
        hooks_fn = splice_hooks(sae, x_train.double().mean(0).float())
        name = hook_name(hook, layer)
        losses = {kind: target_loss(ctx.model, ev, ctx.batch_size, [(name, fn)]) for kind, fn in hooks_fn.items()}
        lr_ = loss_recovered(clean, losses["spliced"], losses["zero"], losses["mean"])
        f = encode_activations(sae, x_eval)  # (N_eval, m)
        features_eval[key] = f
        corr = _correlate(f, variables, opts.n_shuffles, ctx.seed + idx) if variables else []
        correlations[key] = corr
        trained[key] = TrainedSAE(key, hook, layer, sae, m_eval.density)
        save_sae(sae, ctx.path(f"sae_{key}"), hook_name=name, model_name=ctx.source.name,
                 extra={"hook": hook, "layer": layer, "eval_fvu": m_eval.fvu, "eval_l0": m_eval.l0})
        per_sae[key] = {
            "hook": hook, "layer": layer, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "train_steps": cfg.steps,
            "l0": m_eval.l0, "fvu": m_eval.fvu, "fvu_train": m_train.fvu,
            "explained_variance": m_eval.explained_variance,
            "dead_fraction": m_eval.dead_fraction, "dense_fraction": m_eval.dense_fraction,
            "shrinkage": m_eval.shrinkage, "cossim": m_eval.cossim,
            "clean_loss": lr_.clean_loss, "spliced_loss": lr_.spliced_loss,
            "zero_ablation_loss": lr_.zero_ablation_loss, "mean_ablation_loss": lr_.mean_ablation_loss,
            "recovered_vs_zero": lr_.recovered_vs_zero, "recovered_vs_mean": lr_.recovered_vs_mean,
            "delta_loss": lr_.delta_loss, "ablation_effect": lr_.mean_ablation_loss - clean,
            "best_abs_r": max((c["abs_r"] for c in corr), default=float("nan")),
        }
    ctx.save_tensors(DENSITY_FILE, {k: t.density for k, t in trained.items()},
                     metadata={"order": json.dumps(list(trained))})
    best = _best_by_variable(correlations, base_of)
    ctx.save_json("correlations", {"variables": base_of, "by_sae": correlations})
    top = _top_examples(ctx, best, features_eval, data, opts.top_examples)
    ctx.save_json("top_examples", top)
    if ctx.config.figures:
        _figures(ctx, trained, per_sae, histories, best, correlations, base_of, features_eval, variables, top)
    # the SAE folders were written by save_sae: list their files
    artifacts = [f"sae_{k}/{f}" for k in trained for f in ("cfg.json", "sae.safetensors")]
    metrics: dict[str, Any] = {
        "split": data.split,
        "train_tokens": int(data.train.mask.sum()),
        "eval_tokens": int(data.eval.mask.sum()),
        "architecture": opts.architecture,
        "clean_loss": clean,
        "saes": per_sae,
        "best_by_variable": best,
        "n_variables": len(set(base_of.values())),
        "n_variables_above_0_8": sum(1 for b in best.values() if b["abs_r"] >= MATCH_THRESHOLD),
    }
    if best:
        top_var = max(best, key=lambda v: best[v]["abs_r"])
        metrics["best_match"] = {"base_variable": top_var, **best[top_var]}
    return StepResult(metrics=metrics, reading=_reading(opts, metrics), artifacts=artifacts,
                      data={"saes": trained, "options": opts})


def _train(x: Tensor, cfg: SAEConfig) -> SparseAutoencoder:
    """Train, then fold the activation scale into the weights: every measurement, and later steps, use exactly the
    weights ``save_sae`` writes (so a resumed run that loads them reproduces the same numbers)."""
    from mamba_interp.sparse_autoencoder import train_sae
    from mamba_interp.sparse_autoencoder.io import folded_copy

    trained = train_sae(x.to(cfg.device or "cpu"), cfg)
    sae = folded_copy(trained)
    sae.training_history = trained.training_history
    return sae


def _correlate(f: Tensor, variables: dict[str, Tensor], n_shuffles: int, seed: int) -> list[dict]:
    """Best live latent per variable (dead latents are constant and left out), as JSON-able records."""
    alive = (f != 0).any(0).nonzero().flatten()
    if alive.numel() == 0:
        return []
    corr = feature_variable_correlation(f[:, alive], variables, n_shuffles=n_shuffles, seed=seed % 2**31)
    out = []
    for rec in corr.matches():
        rec["latent"] = int(alive[rec["latent"]])
        out.append(rec)
    return out


def _best_by_variable(correlations: dict[str, list[dict]], base_of: dict[str, str]) -> dict[str, dict]:
    """For each base variable (``token``, ``answer``, ...), the (SAE, latent, class) with the largest |r|."""
    best: dict[str, dict] = {}
    for key, records in correlations.items():
        for rec in records:
            var = base_of[rec["variable"]]
            if var not in best or rec["abs_r"] > best[var]["abs_r"]:
                best[var] = {"sae": key, "latent": rec["latent"], "variable": rec["variable"], "r": rec["r"],
                             "abs_r": rec["abs_r"], "shuffled_best_abs_r": rec["shuffled_best_abs_r"],
                             "n_tokens": rec["n_tokens"]}
    return dict(sorted(best.items(), key=lambda kv: -kv[1]["abs_r"]))


def _token_text(ctx: StepContext, ids: list[int]) -> list[str]:
    tok = ctx.source.tokenizer() if ctx.source.task is None else None
    if tok is not None:
        return [str(t) for t in tok.convert_ids_to_tokens(ids)]
    return [str(i) for i in ids]


def _top_examples(ctx: StepContext, best: dict[str, dict], features: dict[str, Tensor], data: SAEActivations,
                  k: int, before: int = 6, after: int = 1) -> list[dict]:
    """Top-activating held-out tokens (with context) of the best latent of each variable."""
    coords = data.eval.coords()  # (N_eval, 2): (sequence, position)
    tokens = data.eval_batch.tokens
    out, seen = [], set()
    for var, b in best.items():
        pair = (b["sae"], b["latent"])
        if pair in seen:
            continue
        seen.add(pair)
        top = top_activating_examples(features[b["sae"]], [b["latent"]], k=k)
        examples = []
        for idx, value in zip(top.indices[0].tolist(), top.values[0].tolist()):
            if idx < 0:
                continue
            seq, pos = (int(c) for c in coords[idx])
            lo, hi = max(0, pos - before), min(tokens.shape[1], pos + after + 1)
            examples.append({"sequence": seq, "position": pos, "activation": value,
                             "context": _token_text(ctx, tokens[seq, lo:hi].tolist()), "focus": pos - lo})
        out.append({"sae": b["sae"], "latent": b["latent"], "variable": b["variable"], "r": b["r"],
                    "examples": examples})
    return out


def _fmt_pct(x: float, decimals: int | None = None) -> str:
    """A percentage; one decimal near 100% (where 99.4% and 100% differ), else none."""
    if x != x:
        return "n/a"
    if decimals is None:
        decimals = 1 if 0.99 <= x <= 1.01 else 0
    return f"{100 * x:.{decimals}f}%"


def _fmt_range(values: list[float]) -> str:
    decimals = 1 if any(0.99 <= v <= 1.01 for v in values) else 0
    lo, hi = _fmt_pct(min(values), decimals), _fmt_pct(max(values), decimals)
    return lo if lo == hi else f"{lo}–{hi}"


def _reading(opts: Options, m: dict[str, Any]) -> str:
    saes = m["saes"]
    fvu = [s["fvu"] for s in saes.values()]
    dead = [s["dead_fraction"] for s in saes.values()]
    informative = {k: s for k, s in saes.items() if s["ablation_effect"] >= MIN_ABLATION_EFFECT}
    rec = {k: s["recovered_vs_mean"] for k, s in informative.items()}
    arch = opts.architecture + (f" (k={opts.k})" if opts.architecture in ("topk", "batchtopk") else "")
    parts = [
        f"{len(saes)} {arch} SAEs ({opts.expansion}x width) trained on {m['train_tokens']} tokens; on "
        f"{m['eval_tokens']} held-out tokens their FVU is {min(fvu):.3f}–{max(fvu):.3f} with "
        f"{_fmt_range(dead)} dead latents."
    ]
    if rec:
        worst = min(rec, key=rec.get)
        parts.append(
            f"Spliced into the model they recover {_fmt_range(list(rec.values()))} of "
            f"the loss lost to mean ablation (worst: {worst}, loss {saes[worst]['spliced_loss']:.3f} vs clean "
            f"{m['clean_loss']:.3f} and mean-ablated {saes[worst]['mean_ablation_loss']:.3f})."
        )
    weak = [k for k in saes if k not in informative]
    if weak:
        parts.append(
            f"Mean-ablating {', '.join(weak)} changes the loss by less than {MIN_ABLATION_EFFECT} nats, so the "
            f"loss recovered there is not informative."
        )
    best = m.get("best_match")
    if best:
        parts.append(
            f"The best feature–variable match is latent {best['latent']} of {best['sae']} with {best['variable']} "
            f"(r = {best['r']:.2f}; the best |r| with the variable shuffled is {best['shuffled_best_abs_r']:.2f}); "
            f"{m['n_variables_above_0_8']} of {m['n_variables']} variables have a latent with "
            f"|r| ≥ {MATCH_THRESHOLD}."
        )
        if m["n_variables_above_0_8"] == 0:
            per_var = ", ".join(f"{v} {b['abs_r']:.2f} (shuffled {b['shuffled_best_abs_r']:.2f})"
                                for v, b in m["best_by_variable"].items())
            why = (f" The SAEs leave {min(fvu):.0%}–{max(fvu):.0%} of the variance unexplained, so their latents "
                   f"are unlikely to be clean features." if min(fvu) > 0.3 else "")
            parts.append(f"No latent reaches |r| {MATCH_THRESHOLD}; best |r| per variable: {per_var}.{why}")
    else:
        parts.append("No ground-truth variable varies on the held-out tokens, so no correlation was measured.")
    return " ".join(parts)


# ---- figures -----------------------------------------------------------------------------------
def _figures(ctx: StepContext, trained: dict[str, TrainedSAE], per_sae: dict, histories: dict, best: dict,
             correlations: dict, base_of: dict, features: dict, variables: dict, top: list[dict]) -> None:
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
    labels = [f"{k}\n{_fmt_pct(per_sae[k]['recovered_vs_mean'])} rec." if per_sae[k]["ablation_effect"]
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
