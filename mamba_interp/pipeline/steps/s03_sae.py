"""Step 3 (sae): sparse autoencoders on chosen hooks, their quality, and what their latents mean.

For every (hook, layer) in the options (default: the residual stream ``resid_post`` and the SSM input ``x`` and
output ``y`` at every analysed layer) one SAE (``mamba_interp.sparse_autoencoder.train_sae``; TopK by default,
d_sae = ``expansion`` · d) is trained on step 2's activations of the primary dataset
(``ActivationSet.tokens``; Mamba-2's [b, l, h, p] hooks are flattened to h·p). Everything else is measured on
held-out tokens: step 1's ``heldout`` sequences (fresh samples of the task), or the last ``eval_fraction`` of the
sequences when there are none (or the task is finite, e.g. modular addition, whose held-out sample is the same
fixed test split).

Per SAE (Gao et al. 2024; SAELens' evals): L0, FVU, dead/dense fractions, shrinkage (``sae_metrics``) on the
held-out tokens (FVU on the training tokens too, to show over-fitting); loss recovered when the SAE's
reconstruction replaces the activation in the model at every position (``model.run_with_saes`` without the error
term, the SAE-in-the-loop path users call), scored by the mean cross-entropy at the task's target positions,
against zero ablation and mean ablation (the training mean) of the same activation (``loss_recovered``; for a
residual-stream hook from one sequence's pass, ``sae_support.constant_ablation_loss``); the
Pearson correlation of every live latent with every ground-truth variable (``pipeline/task_variables.py``:
token, previous token, position, the answer, and task-specific ones such as induction's ``after_trigger`` and
``stored_value``; categorical variables one-hot per class), with a shuffled-variable baseline
(``feature_variable_correlation``); the top-activating held-out tokens of the best latent per variable; and
feature dashboards for the top latents of each SAE (``pipeline/sae_dashboards.py``: variable matches, the densest
and the most ablation-relevant latents, with contexts, histograms and logit effects), which the report shows.
``metrics["warnings"]`` names what a reader must notice (≥ 50 % dead latents, FVU above 0.3, a splice that
recovers less than 80 % of the loss); the report lists them at the top.
Loss recovered is reported for every SAE, but the reading skips hooks whose mean ablation moves the loss by less
than ``MIN_ABLATION_EFFECT`` nats (a ratio of two tiny differences). Each SAE is measured, saved and handed on with
its activation scale folded into the weights, so a resumed run that loads it reproduces the same numbers.
The helpers (activation split, target loss, ablation baselines, latent tables) are in ``pipeline/sae_support.py``,
the dashboards in ``pipeline/sae_dashboards.py``, the figures in ``pipeline/sae_figures.py``.

Outputs: one folder per SAE, ``sae_L<layer>_<hook>/`` (``cfg.json`` + ``sae_weights.safetensors``, which
``sae_lens.SAE.load_from_disk`` reads; ``save_sae``), ``latent_density.safetensors`` (firing frequency of every
latent on the held-out tokens, by SAE), ``correlations.json`` (best latent per variable class, per SAE),
``top_examples.json``, ``feature_dashboards.json`` (the cards); figures ``feature_density.png``,
``loss_recovered.png``, ``feature_variable_matches.png``, ``correlation_heatmap.png``, ``training_curves.png``.

Data for later steps (``ctx.data(3)``): ``saes`` (key ``"L<layer>_<hook>"`` -> :class:`TrainedSAE`) and
``options``; the loader rebuilds both from the folders on ``--resume``. :func:`sae_activations` gives later
steps the same train/held-out activations.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mamba_interp.pipeline import sae_dashboards
from mamba_interp.pipeline.activation_stats import hook_name
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.datasets import budget_sequences
from mamba_interp.pipeline.memory_plan import shuffle_rows
from mamba_interp.pipeline.registry import register_step
from mamba_interp.pipeline.sae_figures import draw_figures
from mamba_interp.pipeline.sae_support import (
    CONSTANT_ABLATION_HOOKS,
    MIN_ABLATION_EFFECT,
    SAE_HOOKS,
    HeldOutLatents,
    LayerStarts,
    SAEActivations,
    SAETrainUnit,
    TrainedSAE,
    ablation_hooks,
    best_by_variable,
    constant_ablation_loss,
    correlate_latents,
    fmt_pct,
    fmt_range,
    sae_activations,
    sae_key,
    sequence_ce,
    target_loss,
    top_examples,
    train_unit,
    unpadded,
)
from mamba_interp.sparse_autoencoder import (
    ARCHITECTURES,
    SAEConfig,
    encode_activations,
    load_sae,
    loss_recovered,
    sae_metrics,
    save_sae,
)
from mamba_interp.sparse_autoencoder.io import WEIGHTS_FILENAME

__all__ = [
    "DENSITY_FILE", "MATCH_THRESHOLD", "MIN_ABLATION_EFFECT", "SAE_HOOKS", "Options", "SAEActivations", "TrainedSAE",
    "ablation_hooks", "load", "run", "sae_activations", "sae_key", "target_loss",
]

DENSITY_FILE = "latent_density"
MATCH_THRESHOLD = 0.8  # the bar for "a latent tracks a ground-truth variable"
# what the reading and the report's notices flag
DEAD_WARNING = 0.5  # fraction of latents that never fire on the held-out tokens
FVU_WARNING = 0.3
RECOVERED_WARNING = 0.8  # loss recovered vs mean ablation, where the ablation matters


def _tuple_of(value: Any, name: str, kind: type) -> tuple:
    if isinstance(value, str) and kind is str:
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                       for v in value):
        raise ValueError(f"{name}={value!r} must be a list of {kind.__name__}s")
    return tuple(value)


def _check_optional_positive_int(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name}={value!r} must be a positive integer or null")


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
    """Top-activating held-out tokens kept per shown latent (and per dashboard card)."""
    dashboards: int = 6
    """Feature dashboard cards per SAE in the report (0: none)."""
    dashboard_sequences: int = 64
    """Held-out sequences used to rank latents by their ablation effect (one forward and backward pass) and to
    measure the top latent's ablation."""
    dashboard_tokens: int | None = 4096
    """...and at most this many tokens of them (``pipeline.datasets.budget_sequences``: never fewer than 16
    sequences; None: no token cap). The default model's 64-token sequences are capped by the count (64 sequences),
    256-token corpus windows by the tokens (16 sequences)."""
    shuffle_buffer_mb: float = 512.0
    """SAE training reads all training tokens into memory up to this size; beyond it they stream from the
    activation store through a shuffle buffer of this size (``train_sae``)."""

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
        for name in ("expansion", "k", "batch_size", "max_classes", "min_count", "top_examples",
                     "dashboard_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("n_shuffles", "dashboards"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        for name in ("epochs", "lr", "l1_coefficient", "shuffle_buffer_mb"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name}={value!r} must be a positive number")
        _check_optional_positive_int("dashboard_tokens", self.dashboard_tokens)
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
               options=Options, version=2)
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
    # the residual stream entering each SAE layer, cached once: every loss pass (and the dashboards' passes) starts
    # there, since the blocks before are the clean model's
    starts = LayerStarts(ctx.model, ev, ctx.batch_size, cached=data.eval_inputs)
    finals: list[Tensor] = []  # the clean final-normed residual stream: the dashboards' clean logits come from it

    def keep_final(t: Tensor, hook: Any) -> None:
        finals.append(t.detach().cpu())

    clean_ce = sequence_ce(ctx.model, ev, ctx.batch_size, [("hook_norm_final", keep_final)],
                           start=starts(min(layers)))
    clean, clean_final = clean_ce.mean, torch.cat(finals)  # (b, l, d)
    finals.clear()

    trained: dict[str, TrainedSAE] = {}
    per_sae: dict[str, dict[str, Any]] = {}
    correlations: dict[str, list[dict]] = {}
    histories: dict[str, Any] = {}
    features_eval = HeldOutLatents()  # one SAE's held-out latents in memory at a time
    work = [(i, h) for i in layers for h in opts.hooks]
    units = []
    for idx, (layer, hook) in enumerate(work):
        width, n_train = data.train.width(hook, layer), int(data.train.mask.sum())
        cfg = opts.sae_config(width, n_train, (ctx.seed + 7919 * idx) % 2**31, str(ctx.device))
        units.append(SAETrainUnit(sae_key(hook, layer), hook, layer, data.train.only(hook, layer), cfg,
                                  shuffle_rows(opts, width)))
    saes = ctx.executor.map(train_unit, units, desc="training SAEs")  # independent units: local or on Ray
    for idx, ((layer, hook), unit, sae) in enumerate(zip(work, units, ctx.progress(saes, desc="SAEs"))):
        key, cfg = unit.key, unit.cfg
        features_eval.forget()  # the previous SAE's latents are not alive beside this one's evaluation
        x_train = data.train.token_source(hook, layer)  # (N_train, k), streamed from the store
        x_eval = data.eval.tokens(hook, layer)  # (N_eval, k)
        histories[key] = sae.training_history
        m_eval = sae_metrics(sae, x_eval)
        m_train = sae_metrics(sae, x_train)
        name = hook_name(hook, layer)
        start = starts(layer)
        # a residual-stream hook's zero / mean ablation is the same in every sequence: one sequence's pass
        constant = hook in CONSTANT_ABLATION_HOOKS and unpadded(ev)
        losses = {kind: constant_ablation_loss(ctx.model, ev, name, fn, start) if constant
                  else target_loss(ctx.model, ev, ctx.batch_size, [(name, fn)], start=start)
                  for kind, fn in ablation_hooks(x_train.mean().float()).items()}
        losses["spliced"] = target_loss(ctx.model, ev, ctx.batch_size, saes={name: sae}, start=start)
        lr_ = loss_recovered(clean, losses["spliced"], losses["zero"], losses["mean"])
        f = encode_activations(sae, x_eval)  # (N_eval, m)
        features_eval.add(key, lambda sae=sae, hook=hook, layer=layer: encode_activations(
            sae, data.eval.tokens(hook, layer)), f)
        corr = correlate_latents(f, variables, opts.n_shuffles, ctx.seed + idx) if variables else []
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
        del f, x_eval  # the next SAE's are built without these alive
    ctx.save_tensors(DENSITY_FILE, {k: t.density for k, t in trained.items()},
                     metadata={"order": json.dumps(list(trained))})
    best = best_by_variable(correlations, base_of)
    ctx.save_json("correlations", {"variables": base_of, "by_sae": correlations})
    ctx.save_json("top_examples", top_examples(ctx, best, features_eval, data, opts.top_examples))
    n_dash = budget_sequences(opts.dashboard_sequences, opts.dashboard_tokens, ev.tokens.shape[1], len(ev))
    if opts.dashboards:
        features_eval.forget()  # no SAE's held-out latents beside the attribution pass's graph
        started = time.process_time()
        cards = sae_dashboards.build_dashboards(ctx, trained, features_eval, data, correlations, variables,
                                                opts.dashboards, n_dash, opts.top_examples,
                                                starts=starts, clean=clean_ce, clean_final=clean_final)
        ctx.save_json(sae_dashboards.FILE, cards)
        ctx.log.info("feature dashboards: %d cards in %.1f s of CPU time", len(cards), time.process_time() - started)
    if ctx.config.figures:
        draw_figures(ctx, trained, per_sae, histories, best, correlations, base_of, features_eval, variables,
                     opts.architecture)
    # the SAE folders were written by save_sae: list their files
    artifacts = [f"sae_{k}/{f}" for k in trained for f in ("cfg.json", WEIGHTS_FILENAME)]
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
        "dashboard_sequences": n_dash if opts.dashboards else 0,
    }
    if best:
        top_var = max(best, key=lambda v: best[v]["abs_r"])
        metrics["best_match"] = {"base_variable": top_var, **best[top_var]}
    metrics["warnings"] = _warnings(per_sae, metrics["eval_tokens"])
    return StepResult(metrics=metrics, reading=_reading(opts, metrics), artifacts=artifacts,
                      data={"saes": trained, "options": opts})


def _warnings(saes: dict[str, dict], eval_tokens: int) -> list[str]:
    """What a reader must notice about the SAEs, one sentence each."""
    out = []
    dead = {k: s for k, s in saes.items() if s["dead_fraction"] >= DEAD_WARNING}
    for key, s in dead.items():
        out.append(f"{key}: {fmt_pct(s['dead_fraction'])} of its {s['d_sae']} latents never fire on the {eval_tokens} "
                   f"held-out tokens (a narrower SAE or more training tokens would use them).")
    for key, s in saes.items():
        if s["fvu"] > FVU_WARNING:
            out.append(f"{key}: the SAE leaves {fmt_pct(s['fvu'])} of the variance unexplained (FVU {s['fvu']:.3f}), "
                       "so its latents are not a faithful description of the activation.")
        if s["ablation_effect"] >= MIN_ABLATION_EFFECT and s["recovered_vs_mean"] < RECOVERED_WARNING:
            out.append(f"{key}: spliced in, it recovers only {fmt_pct(s['recovered_vs_mean'])} of the loss lost to "
                       f"mean ablation (loss {s['spliced_loss']:.3f} vs clean {s['clean_loss']:.3f}).")
    return out


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
        f"{fmt_range(dead)} dead latents."
    ]
    mostly_dead = {k: s["dead_fraction"] for k, s in saes.items() if s["dead_fraction"] >= DEAD_WARNING}
    if mostly_dead:
        parts.append(f"At least {fmt_pct(DEAD_WARNING)} of the latents are dead in "
                     + ", ".join(f"{k} ({fmt_pct(v)})" for k, v in mostly_dead.items()) + ".")
    if rec:
        worst = min(rec, key=rec.get)
        parts.append(
            f"Spliced into the model they recover {fmt_range(list(rec.values()))} of "
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
