"""Direct logit attribution through the final RMSNorm (as TransformerLens' ``apply_ln_to_stack`` with the cached
scale).

Mamba's blocks are pre-norm, so the final residual is the embedding plus every mixer's output,
``r = e + Σ_ℓ o_ℓ``. Freezing the final norm's scale ``s = sqrt(mean_d(r²) + ε)`` at its clean-run value makes
the logit linear in the components: ``logit_t = Σ_c (γ ⊙ W_U[t]) · r_c / s`` plus the norm's and the unembedding's
biases when a model has them (Mamba checkpoints have neither). A logit difference replaces W_U[t] by
W_U[t] − W_U[t'], a centred logit by W_U[t] − mean_v W_U[v]. Inside a mixer ``o = W_out · gated + b_out`` splits
over the channels of out_proj's input (Mamba-1) or over heads (Mamba-2: ``hook_gated`` is already past the gated
RMSNorm, whose per-group normaliser is thereby frozen, so the split is exact).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mamba_interp.lens.logit_lens import _chunks


@dataclass
class DLAResult:
    """Direct logit attribution at N chosen (example, position) pairs, shaped like ``answer``.

    ``contributions``: component name (``embed``, ``blocks.i.mixer``) -> tensor; ``bias``: the final norm's and
    unembedding's bias terms (zero for Mamba checkpoints); ``total``: the model's logit (difference) from its
    forward, so ``sum(contributions) + bias == total``; ``scale``: the frozen RMS s of the final residual;
    ``units``: per-channel (Mamba-1) or per-head (Mamba-2) split of each mixer, ``blocks.i.mixer`` -> [..., k]
    (summing to that mixer's contribution minus out_proj's bias, absent in Mamba checkpoints)."""

    contributions: OrderedDict[str, Tensor]
    bias: Tensor
    total: Tensor
    scale: Tensor
    units: dict[str, Tensor] = field(default_factory=dict)
    unit_kind: str | None = None

    def stacked(self) -> tuple[Tensor, list[str]]:
        """[c, ...] contributions in order, and their names."""
        return torch.stack(list(self.contributions.values())), list(self.contributions)


def _direction(model: Any, answer: Tensor, wrong: Tensor | str | None) -> Tensor:
    """Rows of W_U (float64) whose dot product with the normalised residual is the metric: [N, d]."""
    w_u = model.lm_head.weight.detach().double()
    u = w_u[answer]
    if isinstance(wrong, str):
        if wrong != "mean":
            raise ValueError(f"wrong={wrong!r} is unknown; pass token ids, 'mean' (centred logit) or None")
        return u - w_u[: model.cfg.vocab_size].mean(0)
    return u if wrong is None else u - w_u[wrong]


def _metric_of_logits(model: Any, logits: Tensor, answer: Tensor, wrong: Tensor | str | None) -> Tensor:
    lg = logits.double()
    out = lg.gather(-1, answer[:, None])[:, 0]
    if isinstance(wrong, str):
        return out - lg[:, : model.cfg.vocab_size].mean(-1)
    return out if wrong is None else out - lg.gather(-1, wrong[:, None])[:, 0]


@torch.no_grad()
def direct_logit_attribution(model: Any, input_ids: Tensor, answer: Tensor, wrong: Tensor | str | None = None,
                             position: int | Tensor = -1, units: bool = False,
                             attention_mask: Tensor | None = None) -> DLAResult:
    """Each component's direct contribution to the logit of ``answer`` at ``position`` (minus ``wrong``'s logit
    when given as token ids, or minus the mean logit over the vocabulary with ``wrong="mean"``).

    ``answer`` [b] with ``position`` an int or [b]; or ``answer`` [b, k] with ``position`` [b, k] (several
    positions per example). ``wrong`` has ``answer``'s shape. ``units=True`` also splits every mixer over the
    channels (Mamba-1) or heads (Mamba-2) of out_proj's input. Every tensor of the result has ``answer``'s shape.
    """
    input_ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    b, l = input_ids.shape
    answer = torch.as_tensor(answer).long()
    shape = answer.shape
    position = torch.full(shape, position, dtype=torch.long) if isinstance(position, int) else position
    position = torch.as_tensor(position).long()
    if position.shape != shape or shape[0] != b or answer.dim() > 2:
        raise ValueError(f"answer {tuple(shape)} and position {tuple(position.shape)} must both be [b] or [b, k] "
                         f"with b = {b} examples")
    rows = torch.arange(b).reshape(b, *([1] * (answer.dim() - 1))).expand(shape)
    wrong = wrong.reshape(-1) if isinstance(wrong, Tensor) else wrong
    flat = dla_at(model, input_ids, rows.reshape(-1), position.reshape(-1) % l, answer.reshape(-1), wrong, units,
                  attention_mask)
    reshape = lambda t: t.reshape(*shape, *t.shape[1:])  # noqa: E731
    return DLAResult(OrderedDict((k, reshape(v)) for k, v in flat.contributions.items()), reshape(flat.bias),
                     reshape(flat.total), reshape(flat.scale), {k: reshape(v) for k, v in flat.units.items()},
                     flat.unit_kind)


@torch.no_grad()
def dla_at(model: Any, input_ids: Tensor, rows: Tensor, positions: Tensor, answer: Tensor,
           wrong: Tensor | str | None = None, units: bool = False, attention_mask: Tensor | None = None,
           batch_size: int | None = None) -> DLAResult:
    """:func:`direct_logit_attribution` at N arbitrary (example ``rows``, ``positions``) pairs, each with its
    ``answer`` (and ``wrong``) token: every tensor of the result is [N] (units [N, k]). ``batch_size`` bounds the
    examples per forward pass."""
    rows, positions, answer = (torch.as_tensor(t).long().reshape(-1) for t in (rows, positions, answer))
    if not rows.numel() == positions.numel() == answer.numel():
        raise ValueError(f"rows, positions and answer must have one entry per pair, got {rows.numel()}, "
                         f"{positions.numel()} and {answer.numel()}")
    if isinstance(wrong, Tensor) and wrong.numel() != answer.numel():
        raise ValueError(f"wrong must have one token per pair ({answer.numel()}), got {wrong.numel()}")
    parts, order = [], []
    for sl in _chunks(input_ids.shape[0], batch_size):
        sel = torch.nonzero((rows >= sl.start) & (rows < sl.start + input_ids[sl].shape[0]))[:, 0]
        if sel.numel() == 0:
            continue
        mask = None if attention_mask is None else attention_mask[sl]
        wr = wrong[sel] if isinstance(wrong, Tensor) else wrong
        parts.append(_dla_chunk(model, input_ids[sl], rows[sel] - sl.start, positions[sel], answer[sel], wr, units,
                                mask))
        order.append(sel)
    if not parts:
        raise ValueError("no (row, position) pair to attribute; pass at least one")
    inverse = torch.argsort(torch.cat(order))
    cat = lambda ts: torch.cat(ts)[inverse]  # noqa: E731
    first = parts[0]
    return DLAResult(OrderedDict((k, cat([p.contributions[k] for p in parts])) for k in first.contributions),
                     cat([p.bias for p in parts]), cat([p.total for p in parts]), cat([p.scale for p in parts]),
                     {k: cat([p.units[k] for p in parts]) for k in first.units}, first.unit_kind)


def _dla_chunk(model: Any, ids: Tensor, rows: Tensor, pos: Tensor, ans: Tensor, wrong: Tensor | str | None,
               units: bool, mask: Tensor | None) -> DLAResult:
    cfg = model.cfg
    n_layer = cfg.n_layer
    names = ["hook_embed", f"blocks.{n_layer - 1}.hook_resid_post"]
    names += [f"blocks.{i}.mixer.hook_out" for i in range(n_layer)]
    if units:
        names += [f"blocks.{i}.mixer.hook_gated" for i in range(n_layer)]
    logits, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=names)
    dev = logits.device
    rows, pos, ans = rows.to(dev), pos.to(dev), ans.to(dev)
    wrong = wrong.to(dev).long() if isinstance(wrong, Tensor) else wrong
    pick = lambda t: t[rows, pos].double()  # noqa: E731  (N, ...)
    resid = pick(cache[names[1]])
    scale = torch.sqrt(resid.pow(2).mean(-1) + model.norm_f.eps)  # (N,) the frozen RMS
    direction = _direction(model, ans, wrong)  # (N, d)
    u = direction * model.norm_f.weight.detach().double()
    attribute = lambda r: (u * r).sum(-1) / scale  # noqa: E731
    contributions: OrderedDict[str, Tensor] = OrderedDict(embed=attribute(pick(cache["hook_embed"])))
    unit_split: dict[str, Tensor] = {}
    for i in range(n_layer):
        contributions[f"blocks.{i}.mixer"] = attribute(pick(cache[f"blocks.{i}.mixer.hook_out"]))
        if units:
            w_out = model.blocks[i].mixer.out_proj.weight.detach().double()  # (d, e)
            per_channel = pick(cache[f"blocks.{i}.mixer.hook_gated"]) * (u @ w_out) / scale[:, None]  # (N, e)
            if cfg.arch == "mamba2":
                per_channel = per_channel.unflatten(-1, (cfg.nheads, cfg.headdim)).sum(-1)  # (N, h)
            unit_split[f"blocks.{i}.mixer"] = per_channel
    bias = torch.zeros_like(scale)
    norm_bias = getattr(model.norm_f, "bias", None)
    if norm_bias is not None:
        bias = bias + (direction * norm_bias.detach().double()).sum(-1)
    if model.lm_head.bias is not None:
        bias = bias + _metric_of_logits(model, model.lm_head.bias.detach()[None].expand(len(ans), -1), ans, wrong)
    total = _metric_of_logits(model, logits[rows, pos], ans, wrong)
    return DLAResult(OrderedDict((k, v.cpu()) for k, v in contributions.items()), bias.cpu(), total.cpu(),
                     scale.cpu(), {k: v.cpu() for k, v in unit_split.items()},
                     ("head" if cfg.arch == "mamba2" else "channel") if units else None)
