"""Step 3's machinery around its SAEs: the train / held-out activations, the loss at the task's target positions
with SAEs spliced in (``model.run_with_saes``) or an activation ablated, and the tables of latents against
ground-truth variables.

Functions here take a model and tensors (or a :class:`StepContext` where they read the run's data), so later
steps and notebooks reuse them; the step itself is ``pipeline/steps/s03_sae.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mamba_interp.pipeline.activation_stats import STATE_NORM, ActivationSet, hook_name
from mamba_interp.pipeline.activation_store import collect_for_run
from mamba_interp.pipeline.config import HOOK_CHOICES
from mamba_interp.pipeline.context import StepContext
from mamba_interp.sparse_autoencoder import (
    ActivationChunks,
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
    eval_inputs: dict[int, Tensor] | None = None
    """The residual stream entering the first SAE layer of ``eval_batch`` [b, l, d], when the held-out collection
    pass recorded it on the way (``LayerStarts(cached=...)``)."""


def sae_activations(ctx: StepContext, hooks: tuple[str, ...], layers: tuple[int, ...],
                    eval_fraction: float) -> SAEActivations:
    """Step 2's activations of the primary dataset for training (collected afresh for hooks step 2 skipped),
    and held-out activations: step 1's ``heldout`` sequences, else (none, or a finite task whose held-out sample
    repeats the primary one) the last ``eval_fraction`` of the sequences."""
    ds = ctx.data(1)
    batch, heldout = ds["batch"], ds.get("heldout")
    acts = ctx.data(2)["activations"]

    def collect(b, folder, extra_hooks=()):
        return collect_for_run(ctx, b, layers, hooks, folder, extra_hooks=extra_hooks)

    if any((h, i) not in acts.acts for h in hooks for i in layers):
        acts = collect(batch, "train_activations")
    # a finite task's "held-out" sample is its fixed test split again, i.e. the same sequences: split those instead
    if heldout is not None and not getattr(ds.get("task"), "finite", False):
        # the pass that collects the held-out activations also passes the first SAE layer's input: keep it for
        # the loss passes, which start there (instead of a second pass over the blocks before)
        first, parts = min(layers), []
        keep = (f"blocks.{first}.hook_resid_pre", lambda t, hook: parts.append(t.detach().cpu()))
        ev = collect(heldout, "heldout_activations", [keep])
        return SAEActivations(acts, ev, heldout, "heldout", {first: torch.cat(parts)})
    b = acts.mask.shape[0]
    n_eval = min(b - 1, max(1, round(eval_fraction * b)))
    if b < 2:
        raise ValueError("step 3 needs at least 2 sequences to hold some out; raise --samples")
    return SAEActivations(acts.subset(slice(0, b - n_eval)), acts.subset(slice(b - n_eval, b)),
                          batch.select(slice(b - n_eval, b)), "sequences")


# ---- loss recovered ----------------------------------------------------------------------------
@torch.no_grad()
def _ce_sums(model: Any, batch: Any, batch_size: int, start: tuple[int, Tensor] | None = None,
             **splice: Any) -> tuple[Tensor, Tensor]:
    """Per sequence [b]: the summed cross-entropy over its target positions (targets != -100) and their count.

    Full-vocabulary logits only at the target positions (``pipeline/logits.score_positions``); ``start=(layer,
    resid)`` runs from block ``layer`` on the cached residual stream entering it [b, l, d] of the whole batch
    (``layer_inputs``), for passes whose hooks and SAEs are all at that layer or later."""
    from mamba_interp.pipeline.logits import score_positions
    from mamba_interp.sparse_autoencoder import saes_spliced
    from mamba_interp.tasks.base import IGNORE

    sums, counts = [], []
    for s in range(0, len(batch), batch_size):
        ids = batch.tokens[s:s + batch_size]
        mask = None if batch.attention_mask is None else batch.attention_mask[s:s + batch_size]
        targets = batch.targets[s:s + batch_size]
        scored = targets != IGNORE  # (b, l)
        part = None if start is None else (start[0], start[1][s:s + batch_size])
        with saes_spliced(model, splice["saes"], splice["use_error_term"], splice["latent_edits"],
                          splice["fwd_hooks"]):
            lp, _ = score_positions(model, ids, targets, scored, attention_mask=mask, start=part, predict=False)
        ce = torch.zeros(scored.shape, dtype=torch.float64).masked_scatter_(scored, -lp.double().cpu())
        sums.append(ce.sum(1))
        counts.append(scored.sum(1))
    return torch.cat(sums), torch.cat(counts)


def _splice_kwargs(fwd_hooks: list | None, saes: dict | None, use_error_term: bool,
                   latent_edits: dict | None) -> dict[str, Any]:
    return {"fwd_hooks": fwd_hooks or [], "saes": saes or {}, "use_error_term": use_error_term,
            "latent_edits": latent_edits}


@dataclass(frozen=True)
class SequenceCE:
    """Per sequence [b]: the summed cross-entropy over its target positions and their count (``_ce_sums``)."""

    sums: Tensor
    counts: Tensor

    @property
    def mean(self) -> float:
        """Mean cross-entropy over every target position of the batch."""
        if int(self.counts.sum()) == 0:
            raise ValueError("the held-out batch has no target positions to score the loss on")
        return float(self.sums.sum() / self.counts.sum())

    def per_sequence(self, n: int | None = None) -> Tensor:
        """[n] mean cross-entropy of each of the first ``n`` sequences (NaN for a sequence without a target)."""
        sums, counts = self.sums[:n], self.counts[:n]
        return sums / counts.double().where(counts > 0, torch.tensor(float("nan"), dtype=torch.float64))


def sequence_ce(model: Any, batch: Any, batch_size: int, fwd_hooks: list | None = None, saes: dict | None = None,
                use_error_term: bool = False, latent_edits: dict | None = None,
                start: tuple[int, Tensor] | None = None) -> SequenceCE:
    """The batch's cross-entropy at its target positions (targets != -100) per sequence, with optional hooks and
    SAEs spliced in at hook points (as ``model.run_with_saes``: ``saes={hook_name: sae}``, ``use_error_term``,
    ``latent_edits``); ``start`` as in ``_ce_sums``. One pass gives both :func:`target_loss` and
    :func:`sequence_losses`."""
    return SequenceCE(*_ce_sums(model, batch, batch_size, start,
                                **_splice_kwargs(fwd_hooks, saes, use_error_term, latent_edits)))


def target_loss(model: Any, batch: Any, batch_size: int, fwd_hooks: list | None = None, saes: dict | None = None,
                use_error_term: bool = False, latent_edits: dict | None = None,
                start: tuple[int, Tensor] | None = None) -> float:
    """Mean cross-entropy over the batch's target positions (:func:`sequence_ce`)."""
    return sequence_ce(model, batch, batch_size, fwd_hooks, saes, use_error_term, latent_edits, start).mean


def unpadded(batch: Any) -> bool:
    """No padding in ``batch`` (no mask, or an all-ones one, which the model treats as none)."""
    return batch.attention_mask is None or bool(batch.attention_mask.bool().all())


CONSTANT_ABLATION_HOOKS = ("resid_pre", "resid_post")
"""Hooks whose zero or mean ablation leaves nothing of the input downstream: the residual stream is the only thing
a block passes on, so replacing all of it by one vector at every position makes every later activation (and the
logits at position t) the same in every sequence (without padding, whose mask enters each mixer)."""


@torch.no_grad()
def constant_ablation_loss(model: Any, batch: Any, name: str, fn: Callable,
                           start: tuple[int, Tensor] | None = None) -> float:
    """``target_loss(model, batch, _, [(name, fn)], start=start)`` for an ablation ``fn`` that replaces a
    residual-stream hook (``CONSTANT_ABLATION_HOOKS``) by one vector at every position, e.g. the zero and mean
    ablations of :func:`ablation_hooks`, in a batch without padding: one sequence's ablated pass gives the
    log-probabilities [l, v] every sequence would get, read at each sequence's targets (a 1/b share of the
    pass)."""
    from mamba_interp.pipeline.logits import final_normed, unembed
    from mamba_interp.pipeline.memory_plan import LOGIT_CHUNK
    from mamba_interp.tasks.base import IGNORE

    if not name.endswith(tuple(f"hook_{h}" for h in CONSTANT_ABLATION_HOOKS)):
        raise ValueError(f"{name} is not a residual-stream hook ({', '.join(CONSTANT_ABLATION_HOOKS)}): its "
                         f"ablated pass depends on the input; use target_loss")
    if not unpadded(batch):
        raise ValueError("the batch is padded (its mask enters every mixer): use target_loss")
    device = next(model.parameters()).device
    targets = batch.targets.to(device)  # (b, l)
    scored = targets != IGNORE
    if int(scored.sum()) == 0:
        raise ValueError("the held-out batch has no target positions to score the loss on")
    part = None if start is None else (start[0], start[1][:1])
    with model.hooks(fwd_hooks=[(name, fn)]):
        normed = final_normed(model, batch.tokens[:1].to(device), None, part)[0]  # (l, d)
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, normed.shape[0], LOGIT_CHUNK):
        lp = torch.log_softmax(unembed(model, normed[s:s + LOGIT_CHUNK]), -1)  # (c, v)
        tgt = targets[:, s:s + LOGIT_CHUNK].clamp(min=0)  # (b, c)
        picked = lp.gather(-1, tgt.T).T  # (b, c): lp[t, target[b, t]]
        total -= (picked.double() * scored[:, s:s + LOGIT_CHUNK]).sum().cpu()
    return float(total / int(scored.sum()))


def sequence_losses(model: Any, batch: Any, batch_size: int, fwd_hooks: list | None = None, saes: dict | None = None,
                    use_error_term: bool = False, latent_edits: dict | None = None,
                    start: tuple[int, Tensor] | None = None) -> Tensor:
    """[b] mean cross-entropy over each sequence's target positions (NaN for a sequence without one)."""
    return sequence_ce(model, batch, batch_size, fwd_hooks, saes, use_error_term, latent_edits, start).per_sequence()


def layer_inputs(model: Any, batch: Any, layer: int, batch_size: int) -> Tensor:
    """The residual stream entering block ``layer`` [b, l, d] for the whole batch, on the CPU (what
    ``target_loss(start=...)`` reuses across the passes that splice or ablate an activation of that layer)."""
    from mamba_interp.pipeline.logits import layer_input

    parts = []
    for s in range(0, len(batch), batch_size):
        mask = None if batch.attention_mask is None else batch.attention_mask[s:s + batch_size]
        parts.append(layer_input(model, batch.tokens[s:s + batch_size], mask, layer).cpu())
    return torch.cat(parts)


class LayerStarts:
    """The residual stream entering each asked-for layer [b, l, d] of one batch, computed once per layer
    (:func:`layer_inputs`): step 3's loss passes, attributions and dashboard ablations all start there, since the
    blocks before an SAE's layer are the clean model's. ``starts(layer)`` gives ``(layer, resid)`` for ``start=``."""

    def __init__(self, model: Any, batch: Any, batch_size: int, cached: Mapping[int, Tensor] | None = None) -> None:
        self.model, self.batch, self.batch_size = model, batch, batch_size
        self._cache: dict[int, Tensor] = dict(cached or {})  # layer -> [b, l, d] already computed by the caller

    def __call__(self, layer: int, rows: int | None = None) -> tuple[int, Tensor]:
        """``(layer, resid)``; ``rows``: only the first ``rows`` sequences (a prefix of the batch)."""
        if layer not in self._cache:
            self._cache[layer] = layer_inputs(self.model, self.batch, layer, self.batch_size)
        return layer, self._cache[layer][:rows]


def ablation_hooks(mean: Tensor) -> dict[str, Any]:
    """Hook functions replacing an activation [b, l, ...] (Mamba-2: [b, l, h, p]) by zeros or by ``mean`` [k]
    (k = the flattened width): the baselines of loss recovered. The SAE itself is spliced by ``run_with_saes``."""

    def zero(t: Tensor, hook: Any) -> Tensor:
        return torch.zeros_like(t)

    def mean_ablate(t: Tensor, hook: Any) -> Tensor:
        return mean.to(t.device, t.dtype).reshape(t.shape[2:]).expand(t.shape).clone()

    return {"zero": zero, "mean": mean_ablate}


# ---- training and the latent tables ---------------------------------------------------------------
def train_folded(x: Tensor | ActivationChunks, cfg: SAEConfig, buffer_tokens: int | None = None,
                 progress: Any = None) -> SparseAutoencoder:
    """Train, then fold the activation scale into the weights: every measurement, and later steps, use exactly the
    weights ``save_sae`` writes (so a resumed run that loads them reproduces the same numbers). ``x`` may be
    chunks streamed from the activation store (``buffer_tokens``: see ``train_sae``)."""
    from mamba_interp.sparse_autoencoder import train_sae
    from mamba_interp.sparse_autoencoder.io import folded_copy

    if isinstance(x, Tensor):
        x = x.to(cfg.device or "cpu")
    trained = train_sae(x, cfg, buffer_tokens=buffer_tokens, progress=progress)
    sae = folded_copy(trained)
    sae.training_history = trained.training_history
    return sae


@dataclass
class SAETrainUnit:
    """One SAE to train (a unit of ``ctx.executor.map``): its training activations and recipe."""

    key: str
    hook: str
    layer: int
    acts: ActivationSet
    """The training activations of this (hook, layer) only (``ActivationSet.only``; small to ship to a worker)."""
    cfg: SAEConfig
    buffer_tokens: int


def train_unit(worker: Any, unit: SAETrainUnit) -> SparseAutoencoder:
    """Train one unit's SAE (``train_folded`` on its token chunks), on whichever worker runs it."""
    def progress(it: Any) -> Any:
        return worker.progress(it, total=unit.cfg.steps, desc=f"training {unit.key}")

    return train_folded(unit.acts.token_source(unit.hook, unit.layer), unit.cfg, unit.buffer_tokens,
                        progress if worker.progress is not None else None)


class HeldOutLatents(Mapping[str, Tensor]):
    """Each SAE's latents on the held-out tokens [N_eval, m], encoded when asked for.

    Only the most recently asked SAE's latents stay in memory, so step 3 holds one SAE's [N_eval, m] at a time
    rather than every SAE's at once (at mamba-130m scale each is ~400 MB, the largest item of the step). Reading
    them again costs one encoder pass over the held-out tokens; every reader in step 3 goes through the SAEs in
    order, so that is rare.
    """

    def __init__(self) -> None:
        self._encode: dict[str, Callable[[], Tensor]] = {}
        self._last: tuple[str, Tensor] | None = None

    def add(self, key: str, encode: Callable[[], Tensor], latents: Tensor | None = None) -> None:
        """Register ``key``'s encoder; ``latents``: its output, already computed (kept as the current one)."""
        self._encode[key] = encode
        if latents is not None:
            self._last = (key, latents)

    def forget(self) -> None:
        """Drop the latents in memory (before encoding another SAE's outside this mapping)."""
        self._last = None

    def __getitem__(self, key: str) -> Tensor:
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        encode = self._encode[key]  # KeyError for an unknown SAE, as a dict
        self._last = None  # free the previous SAE's latents before encoding the next
        f = encode()
        self._last = (key, f)
        return f

    def __iter__(self) -> Iterator[str]:
        return iter(self._encode)

    def __len__(self) -> int:
        return len(self._encode)


def correlate_latents(f: Tensor, variables: dict[str, Tensor], n_shuffles: int, seed: int) -> list[dict]:
    """Best live latent per variable (dead latents are constant and left out), as JSON-able records."""
    alive = (f != 0).any(0).nonzero().flatten()
    if alive.numel() == 0:
        return []
    corr = feature_variable_correlation(f, variables, n_shuffles=n_shuffles, seed=seed % 2**31, latents=alive)
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


def top_examples(ctx: StepContext, best: dict[str, dict], features: Mapping[str, Tensor], data: SAEActivations,
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
