"""Ablations for necessity tests: replace activations by their mean, by zeros, or by another input's (resample).

Mean and resample ablation remove only the information that varies across the distribution (keeping constant
signal such as position), zero ablation can push the model off-distribution (Miller, Chughtai & Saunders 2024,
arXiv 2407.08734). The mean here is taken over the reference examples *and* the positions an
ablated site covers (for one absolute position: the batch mean at that position, auto-circuit's TOKENWISE_MEAN;
for a position class such as "the token after the trigger": the mean over those tokens).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mamba_interp.activation_patching.engine import Patch, forward_from, hook_shapes, patch_hooks
from mamba_interp.activation_patching.sites import flat_features, resolve_hooks, resolve_positions

KINDS = ("mean", "zero", "resample")


def class_mean(activation: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``activation`` [b, l, *feat] over the entries of ``mask`` [b, l] -> [*feat] (float32)."""
    if not bool(mask.any()):
        raise ValueError("cannot take a mean over an empty set of positions")
    m = mask.to(activation.device)
    return activation[m].double().mean(0).float()


def derangement(b: int, seed: int) -> Tensor:
    """A seeded permutation of 0..b−1 with no fixed point (b ≥ 2): each example gets another's activations."""
    if b < 2:
        raise ValueError("resample ablation without a reference needs at least 2 examples")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(b, generator=g)
    return torch.roll(perm, 1)[torch.argsort(perm)]


def _sites(model: Any, sites: Any, b: int, length: int) -> list[tuple[str, Tensor, Tensor | None]]:
    """(hook name, mask [b, l], flat features) for each site spec: a hook name / glob / short name (every position
    and feature), or a tuple ``(hook, positions=None, channels=None)`` (positions as in ``sites``)."""
    items = [sites] if isinstance(sites, (str, tuple)) else list(sites)
    shapes = hook_shapes(model)
    out = []
    for item in items:
        hook, positions, channels = (item, None, None) if isinstance(item, str) else (tuple(item) + (None, None))[:3]
        for name in resolve_hooks(model, [hook]):
            if positions is None:
                mask = torch.ones(b, length, dtype=torch.bool)
            else:
                spec = {"site": positions} if isinstance(positions, Tensor) else positions
                mask = resolve_positions(spec, b, length)[1].any(0)
            out.append((name, mask, flat_features(shapes[name], channels)))
    return out


@torch.no_grad()
def ablate(
    model: Any,
    input_ids: Tensor,
    sites: Any,
    kind: str = "mean",
    reference: Tensor | None = None,
    attention_mask: Tensor | None = None,
    reference_attention_mask: Tensor | None = None,
    state_mode: str = "propagate",
    seed: int = 0,
) -> Tensor:
    """Logits [b, l, v] of ``input_ids`` with ``sites`` ablated.

    ``kind``: ``"mean"`` (mean of the ``reference`` run's activations over examples and the site's positions;
    reference defaults to ``input_ids``), ``"zero"``, or ``"resample"`` (the ``reference`` run's activations at the
    same positions, e.g. a corrupted partner; without a reference, another example of the batch, by a seeded
    derangement). ``sites``: see :func:`_sites`; ``state_mode`` for ``hook_ssm_state`` sites.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is unknown; use one of {KINDS}")
    device = next(model.parameters()).device
    b, length = input_ids.shape
    resolved = _sites(model, sites, b, length)
    shapes = hook_shapes(model)
    ref_cache = None
    if kind != "zero":
        if reference is None:
            ref_ids, ref_am = input_ids, attention_mask
            if kind == "resample":
                perm = derangement(b, seed)
                ref_ids, ref_am = input_ids[perm], None if attention_mask is None else attention_mask[perm]
        else:
            ref_ids, ref_am = reference, reference_attention_mask
        if kind == "resample" and tuple(ref_ids.shape) != (b, length):
            raise ValueError(f"resample reference must have the inputs' shape {(b, length)}, got {tuple(ref_ids.shape)}")
        _, ref_cache = model.run_with_cache(ref_ids.to(device), attention_mask=None if ref_am is None else
                                            ref_am.to(device), names_filter=sorted({n for n, _, _ in resolved}))
    patches = []
    for name, mask, feats in resolved:
        if kind == "zero":
            src = torch.zeros(shapes[name])
        elif kind == "mean":
            ref_mask = mask if reference is None or tuple(reference.shape) == (b, length) else \
                torch.ones(reference.shape, dtype=torch.bool)
            src = class_mean(ref_cache[name], ref_mask)
        else:
            src = ref_cache[name]
        patches.append(Patch(name, mask, src, features=feats, state_mode=state_mode))
    am = None if attention_mask is None else attention_mask.to(device)
    with model.hooks(fwd_hooks=patch_hooks(model, patches)):
        return forward_from(model, -1, input_ids.to(device), am)
