"""Layer and mixer-component ablation with bootstrap CIs over examples.

A block's mixer output, or one of its components (the conv output before SiLU, the SSM output y = C·h + D·x, the
gate silu(z)), is replaced by zeros, by its per-position mean over a reference set (SSM statistics depend on the
position, because the state starts at zero), or by its value on another input (resampling, the in-distribution
corruption Zhang & Nanda 2023, arXiv 2309.16042, recommend). Ablating every mixer at once gives the
fully-ablated baseline each effect is normalised by.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from mamba_interp.models.cache import get_act_name


ABLATION_KINDS = ("zero", "mean", "resample")
COMPONENT_HOOKS = {"mixer": "out", "conv": "conv", "ssm": "y", "gate": "gate"}
"""Ablation targets inside a block -> the short hook replaced: the whole mixer output, the conv output (before
SiLU), the SSM output y = C·h + D·x, the gate silu(z)."""


@dataclass
class AblationEffect:
    """One ablation: loss/accuracy with the target replaced, and the paired change against the clean run."""

    target: str  # "blocks.i.<component>" or "all mixers"
    kind: str
    loss: float
    accuracy: float
    delta_loss: dict[str, Any]  # Estimate.to_dict() over examples
    delta_accuracy: dict[str, Any]
    normalised: float | None = None  # delta_loss / delta_loss of ablating every mixer (same kind)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _replacement(kind: str, ref: Tensor | None, ref_mask: Tensor | None, b: int, seed: int,
                 own_batch: bool) -> Callable[[Tensor, Any], Tensor]:
    """A hook replacing [b, l, ...] activations. The batch may be evaluated in chunks: the hook sees consecutive
    slices of it, so it keeps an offset."""
    offset = [0]
    if kind == "mean":
        w = ref_mask.to(ref.dtype).reshape(*ref_mask.shape, *([1] * (ref.dim() - 2)))
        mean = (ref * w).sum(0) / w.sum(0).clamp(min=1)  # (l, ...) per-position mean
    elif kind == "resample":
        gen = torch.Generator().manual_seed(seed)
        if own_batch:  # a random derangement: every example takes another example's activation
            perm = torch.randperm(b, generator=gen)
            order = torch.empty(b, dtype=torch.long)
            order[perm] = perm.roll(-1)
        else:
            order = torch.randint(0, ref.shape[0], (b,), generator=gen)

    def fn(t: Tensor, hook: Any) -> Tensor:
        sl = slice(offset[0], offset[0] + t.shape[0])
        offset[0] += t.shape[0]
        if kind == "zero":
            return torch.zeros_like(t)
        if kind == "mean":
            return mean.to(t.device, t.dtype).reshape(t.shape[1:]).expand(t.shape).clone()
        return ref[order[sl]].to(t.device, t.dtype).reshape(t.shape)

    return fn


def layer_ablation(model: Any, batch: Any, kind: str = "zero", layers: Sequence[int] | None = None,
                   components: Sequence[str] = tuple(COMPONENT_HOOKS), reference: Any = None,
                   batch_size: int = 64, seed: int = 0, n_resamples: int = 1000) -> dict[str, Any]:
    """Ablate, one at a time, every block's mixer output and each of its ``components`` (see
    :data:`COMPONENT_HOOKS`) on ``batch`` (a ``TaskBatch``), and every mixer at once (the fully-ablated baseline).

    ``kind``: "zero", "mean" (per-position mean over ``reference``, a ``TaskBatch`` of the same length; default
    the batch itself) or "resample" (each example takes a random reference example's activation; with no
    reference, another example of the batch). Returns ``{"clean": {loss, accuracy}, "effects": [AblationEffect]}``
    with bootstrap CIs of the paired change over examples.
    """
    from mamba_interp.pipeline.activation_stats import collect_activations
    from mamba_interp.pipeline.datasets import evaluate
    from mamba_interp.stats import paired_diff_ci

    if kind not in ABLATION_KINDS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {ABLATION_KINDS}")
    unknown = [c for c in components if c not in COMPONENT_HOOKS]
    if unknown:
        raise ValueError(f"component {unknown[0]!r} is unknown; use some of {tuple(COMPONENT_HOOKS)}")
    layers = list(range(model.cfg.n_layer) if layers is None else layers)
    ref_batch = batch if reference is None else reference
    if ref_batch.seq_len != batch.seq_len:
        raise ValueError(f"the reference has length {ref_batch.seq_len}, the batch {batch.seq_len}; they must match")
    clean = evaluate(model, batch, batch_size)

    def references(targets: list[tuple[int, str]]) -> dict[tuple[int, str], tuple[Tensor, Tensor]]:
        """Reference activations [b_ref, l, ...] and mask of just these targets (one layer's at a time, so a
        large model never holds every layer's)."""
        if kind == "zero":
            return {}
        out = {}
        for i in sorted({i for i, _ in targets}):
            shorts = sorted({COMPONENT_HOOKS[c] for j, c in targets if j == i})
            acts = collect_activations(model, ref_batch.tokens, [i], shorts, batch_size,
                                       attention_mask=ref_batch.attention_mask)
            for j, c in targets:
                if j == i:
                    short = COMPONENT_HOOKS[c]
                    out[(i, c)] = (acts[(short, i)].reshape(len(ref_batch), ref_batch.seq_len,
                                                            *acts.shapes[(short, i)]), acts.mask)
        return out

    def run(targets: list[tuple[int, str]], name: str) -> AblationEffect:
        refs = references(targets)
        fwd = []
        for i, comp in targets:
            ref, mask = refs.get((i, comp), (None, None))
            fwd.append((get_act_name(COMPONENT_HOOKS[comp], i),
                        _replacement(kind, ref, mask, len(batch), seed, reference is None)))
        with model.hooks(fwd):
            ev = evaluate(model, batch, batch_size)
        d_loss = paired_diff_ci(ev["example_loss"], clean["example_loss"], n_resamples=n_resamples, seed=seed)
        d_acc = paired_diff_ci(ev["example_accuracy"], clean["example_accuracy"], n_resamples=n_resamples, seed=seed)
        return AblationEffect(name, kind, ev["loss"], ev["accuracy"], d_loss.to_dict(), d_acc.to_dict())

    effects = [run([(i, c)], f"blocks.{i}.{c}") for i in layers for c in components]
    everything = run([(i, "mixer") for i in layers], "all mixers")
    base = everything.delta_loss["value"]
    for eff in effects:
        eff.normalised = eff.delta_loss["value"] / base if abs(base) > 1e-12 else None
    return {"clean": {"loss": clean["loss"], "accuracy": clean["accuracy"]}, "kind": kind,
            "effects": effects + [everything]}

