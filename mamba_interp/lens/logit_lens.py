"""The logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens"): the residual stream before every
block, and after the last, read through the model's own final RMSNorm and unembedding, and compared with the
model's output distribution by KL(final ‖ lens).

Mamba's blocks are pre-norm with an fp32 residual, so ``blocks.i.hook_resid_pre`` is the residual itself
(``ActivationCache.accumulated_resid``); its last entry is the final residual, whose lens is the model's output.
Index letters as in ``models/config.py``; k = entries of the stack (n_layer + 1: ``resid_pre 0`` = the
embedding, ..., ``resid_pre L-1``, ``final_post``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mamba_interp.tasks.base import IGNORE


def unembed(model: Any, resid: Tensor) -> Tensor:
    """The model's own read-out of a residual [..., d]: ``lm_head(norm_f(resid))`` -> float32 logits [..., v]."""
    normed = model.norm_f(resid.to(model.norm_f.weight.dtype))
    return model.lm_head(normed.to(model.lm_head.weight.dtype)).float()


def _resid_names(model: Any) -> list[str]:
    n = model.cfg.n_layer
    return [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    size = n if batch_size is None else max(1, int(batch_size))
    return [slice(s, s + size) for s in range(0, n, size)]


@dataclass
class LensResult:
    """A lens over a batch: ``labels`` [k]; ``kl`` [k, b, l] = KL(final ‖ lens) in nats (float64); ``mask`` [b, l]
    real tokens; with targets, ``target_logprob`` and ``target_rank`` [k, b, l] (rank 0 = top-1; NaN / -1 where
    there is no target); ``logits`` [k, b, l, v] when asked for. Softmax metrics use the real vocabulary only."""

    labels: list[str]
    kl: Tensor
    mask: Tensor
    target_logprob: Tensor | None = None
    target_rank: Tensor | None = None
    logits: Tensor | None = None

    def kl_by_layer(self, where: Tensor | None = None) -> Tensor:
        """Mean KL per entry [k] over real tokens (and ``where`` [b, l], e.g. the scored positions)."""
        sel = self.mask if where is None else self.mask & where.bool()
        return self.kl[:, sel].mean(-1)

    def accuracy_by_layer(self, where: Tensor | None = None) -> Tensor:
        """Fraction of target positions (and ``where``) whose target is the lens' top-1, per entry [k]."""
        if self.target_rank is None:
            raise ValueError("accuracy needs targets; pass targets= to the lens")
        sel = self.target_rank[-1] >= 0
        sel = sel if where is None else sel & where.bool()
        return (self.target_rank[:, sel] == 0).double().mean(-1)


def _lens_from_stack(model: Any, decode: Callable[[int], Tensor], labels: list[str], targets: Tensor | None,
                     mask: Tensor, return_logits: bool) -> LensResult:
    """``decode(i)`` -> logits [b, l, v] of stack entry i (the last entry is the model's own output). One entry's
    log-probabilities exist at a time unless ``return_logits``."""
    v = model.cfg.vocab_size
    logp = lambda i: torch.log_softmax(decode(i)[..., :v].double(), -1).cpu()  # noqa: E731
    final = logp(len(labels) - 1)
    p_final = final.exp()
    has = None if targets is None else (targets != IGNORE) & mask.bool()
    tgt = None if targets is None else targets.clamp(min=0)[..., None]
    kl, lp_t, rank, logits = [], [], [], []
    for i in range(len(labels)):
        lp = final if i == len(labels) - 1 else logp(i)
        kl.append((p_final * (final - lp)).sum(-1).clamp(min=0.0))  # (b, l)
        if tgt is not None:
            at = lp.gather(-1, tgt)  # (b, l, 1)
            lp_t.append(at[..., 0].masked_fill(~has, float("nan")))
            rank.append((lp > at).sum(-1).masked_fill(~has, -1))
        if return_logits:
            logits.append(lp.float())
    return LensResult(labels, torch.stack(kl), mask.bool(), torch.stack(lp_t) if lp_t else None,
                      torch.stack(rank) if rank else None, torch.stack(logits) if logits else None)


def _cat(parts: list[LensResult]) -> LensResult:
    if len(parts) == 1:
        return parts[0]
    cat = lambda name, dim: (None if getattr(parts[0], name) is None  # noqa: E731
                             else torch.cat([getattr(p, name) for p in parts], dim))
    return LensResult(parts[0].labels, cat("kl", 1), cat("mask", 0), cat("target_logprob", 1),
                      cat("target_rank", 1), cat("logits", 1))


def _residual_stack(model: Any, ids: Tensor, mask: Tensor | None) -> tuple[Tensor, list[str]]:
    """[k, b, l, d] residual stack (``accumulated_resid`` of the cache) and its labels."""
    _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=_resid_names(model))
    return cache.accumulated_resid(return_labels=True)


def _valid(ids: Tensor, mask: Tensor | None) -> Tensor:
    return torch.ones(ids.shape, dtype=torch.bool) if mask is None else mask.bool().cpu()


@torch.no_grad()
def logit_lens(model: Any, input_ids: Tensor, targets: Tensor | None = None, attention_mask: Tensor | None = None,
               batch_size: int | None = None, return_logits: bool = True) -> LensResult:
    """The logit lens of ``input_ids`` [b, l]: every residual of the stack through ``norm_f`` and ``lm_head``.

    ``targets`` [b, l] (``IGNORE`` where none) adds the target's rank and log-probability. The last entry
    (``final_post``) is the model's own output (KL 0 up to rounding). ``return_logits=False`` keeps only the
    per-token metrics (for large vocabularies).
    """
    input_ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    parts = []
    for sl in _chunks(input_ids.shape[0], batch_size):
        mask = None if attention_mask is None else attention_mask[sl]
        _, cache = model.run_with_cache(input_ids[sl], attention_mask=mask, names_filter=_resid_names(model))
        normed, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)  # (k, b, l, d)
        decode = lambda i: model.lm_head(normed[i].to(model.lm_head.weight.dtype)).float()  # noqa: E731
        parts.append(_lens_from_stack(model, decode, labels, None if targets is None else targets[sl].cpu(),
                                      _valid(input_ids[sl], mask), return_logits))
    return _cat(parts)


