"""Step 3's machinery around its SAEs: the train / held-out activations, the loss at the task's target positions
with SAEs spliced in (``model.run_with_saes``) or an activation ablated, and the tables of latents against
ground-truth variables.

Functions here take a model and tensors (or a :class:`StepContext` where they read the run's data), so later
steps and notebooks reuse them; the step itself is ``pipeline/steps/s03_sae.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_interp.pipeline.activation_stats import STATE_NORM, ActivationSet, collect_activations, hook_name
from mamba_interp.pipeline.config import HOOK_CHOICES
from mamba_interp.pipeline.context import StepContext
from mamba_interp.sparse_autoencoder import (
    SAEConfig,
    SparseAutoencoder,
    feature_variable_correlation,
    top_activating_examples,
)

SAE_HOOKS = tuple(h for h in HOOK_CHOICES if h != STATE_NORM)
"""Hooks an SAE can be trained on and spliced into (``state_norm`` is a derived statistic, not an activation)."""
MIN_ABLATION_EFFECT = 0.01
"""Nats: below this change of the loss under mean ablation, "loss recovered" divides noise by noise."""


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
def target_ce(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence: the summed cross-entropy over its target positions (targets != -100) and their count, [b]."""
    from mamba_interp.tasks.base import IGNORE

    b, l, v = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, v).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="none")
    return ce.view(b, l).sum(1), (targets != IGNORE).sum(1)


@torch.no_grad()
def _ce_sums(model: Any, batch: Any, batch_size: int, **run_kwargs: Any) -> tuple[Tensor, Tensor]:
    device = next(model.parameters()).device
    sums, counts = [], []
    for s in range(0, len(batch), batch_size):
        ids = batch.tokens[s:s + batch_size].to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask[s:s + batch_size].to(device)
        logits = model.run_with_saes(ids, attention_mask=mask, **run_kwargs)
        total, count = target_ce(logits, batch.targets[s:s + batch_size].to(device))
        sums.append(total.double().cpu())
        counts.append(count.cpu())
    return torch.cat(sums), torch.cat(counts)


def _splice_kwargs(fwd_hooks: list | None, saes: dict | None, use_error_term: bool,
                   latent_edits: dict | None) -> dict[str, Any]:
    return {"fwd_hooks": fwd_hooks or [], "saes": saes or {}, "use_error_term": use_error_term,
            "latent_edits": latent_edits}


def target_loss(model: Any, batch: Any, batch_size: int, fwd_hooks: list | None = None, saes: dict | None = None,
                use_error_term: bool = False, latent_edits: dict | None = None) -> float:
    """Mean cross-entropy over the batch's target positions (targets != -100), with optional hooks and SAEs
    spliced in at hook points (``model.run_with_saes``: ``saes={hook_name: sae}``, ``use_error_term``,
    ``latent_edits``)."""
    sums, counts = _ce_sums(model, batch, batch_size, **_splice_kwargs(fwd_hooks, saes, use_error_term, latent_edits))
    if int(counts.sum()) == 0:
        raise ValueError("the held-out batch has no target positions to score the loss on")
    return float(sums.sum() / counts.sum())


def sequence_losses(model: Any, batch: Any, batch_size: int, fwd_hooks: list | None = None, saes: dict | None = None,
                    use_error_term: bool = False, latent_edits: dict | None = None) -> Tensor:
    """[b] mean cross-entropy over each sequence's target positions (NaN for a sequence without one)."""
    sums, counts = _ce_sums(model, batch, batch_size, **_splice_kwargs(fwd_hooks, saes, use_error_term, latent_edits))
    return sums / counts.double().where(counts > 0, torch.tensor(float("nan"), dtype=torch.float64))


def ablation_hooks(mean: Tensor) -> dict[str, Any]:
    """Hook functions replacing an activation [b, l, ...] (Mamba-2: [b, l, h, p]) by zeros or by ``mean`` [k]
    (k = the flattened width): the baselines of loss recovered. The SAE itself is spliced by ``run_with_saes``."""

    def zero(t: Tensor, hook: Any) -> Tensor:
        return torch.zeros_like(t)

    def mean_ablate(t: Tensor, hook: Any) -> Tensor:
        return mean.to(t.device, t.dtype).reshape(t.shape[2:]).expand(t.shape).clone()

    return {"zero": zero, "mean": mean_ablate}


# ---- training and the latent tables ---------------------------------------------------------------
def train_folded(x: Tensor, cfg: SAEConfig) -> SparseAutoencoder:
    """Train, then fold the activation scale into the weights: every measurement, and later steps, use exactly the
    weights ``save_sae`` writes (so a resumed run that loads them reproduces the same numbers)."""
    from mamba_interp.sparse_autoencoder import train_sae
    from mamba_interp.sparse_autoencoder.io import folded_copy

    trained = train_sae(x.to(cfg.device or "cpu"), cfg)
    sae = folded_copy(trained)
    sae.training_history = trained.training_history
    return sae


def correlate_latents(f: Tensor, variables: dict[str, Tensor], n_shuffles: int, seed: int) -> list[dict]:
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


def best_by_variable(correlations: dict[str, list[dict]], base_of: dict[str, str]) -> dict[str, dict]:
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


def token_renderer(ctx: StepContext) -> Any:
    """``render(id) -> str`` for the run's model: the decoded token (control characters escaped) when the model
    has a tokenizer, else the id itself (synthetic tasks)."""
    tok = ctx.source.tokenizer() if ctx.source.task is None else None
    if tok is None:
        return str
    try:  # the models package's renderer, where it exists
        from mamba_interp.models.tokens import render_token
    except ImportError:
        render_token = _render_token
    return lambda i: render_token(tok, int(i))


def _render_token(tokenizer: Any, token_id: int) -> str:
    """The text a token stands for (``"ĠDisclaim"`` -> ``" Disclaim"``), control characters escaped."""
    text = tokenizer.decode([token_id])
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def top_examples(ctx: StepContext, best: dict[str, dict], features: dict[str, Tensor], data: SAEActivations,
                  k: int, before: int = 6, after: int = 1) -> list[dict]:
    """Top-activating held-out tokens (with context) of the best latent of each variable."""
    coords = data.eval.coords()  # (N_eval, 2): (sequence, position)
    tokens = data.eval_batch.tokens
    render = token_renderer(ctx)
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
                             "context": [render(t) for t in tokens[seq, lo:hi].tolist()], "focus": pos - lo})
        out.append({"sae": b["sae"], "latent": b["latent"], "variable": b["variable"], "r": b["r"],
                    "examples": examples})
    return out


def fmt_pct(x: float, decimals: int | None = None) -> str:
    """A percentage; one decimal near 100% (where 99.4% and 100% differ), else none."""
    if x != x:
        return "n/a"
    if decimals is None:
        decimals = 1 if 0.99 <= x <= 1.01 else 0
    return f"{100 * x:.{decimals}f}%"


def fmt_range(values: list[float]) -> str:
    decimals = 1 if any(0.99 <= v <= 1.01 for v in values) else 0
    lo, hi = fmt_pct(min(values), decimals), fmt_pct(max(values), decimals)
    return lo if lo == hi else f"{lo}–{hi}"
