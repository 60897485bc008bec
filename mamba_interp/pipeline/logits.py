"""Scoring a model at chosen positions without full-vocabulary logits of whole batches.

A forward pass's logits are [b, l, v]: at 64 × 256 tokens and mamba-130m's 50280-token vocabulary that is 3.3 GB
(and the log-softmax another 3.3 GB). Metrics read them only at scored positions, so :func:`score_positions` runs
the blocks, applies the final norm (with its hook) to the residual stream [b, l, d], and unembeds only the selected
positions, ``LOGIT_CHUNK`` at a time. :func:`layer_input` and ``HookedMamba.run_blocks`` let passes that differ
only from one layer on (an SAE spliced into layer i, its ablations) reuse the residual stream entering that layer.
"""

from __future__ import annotations

from typing import Any

import torch

from mamba_interp.pipeline.memory_plan import LOGIT_CHUNK


def final_normed(model: Any, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 start: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The final-normed residual stream [b, l, d] (``hook_norm_final``, what ``lm_head`` reads) of ``ids`` [b, l],
    from the embedding or, with ``start=(layer, resid)``, from the cached residual stream entering ``layer``."""
    device = next(model.parameters()).device
    if start is None:
        resid = model(ids.to(device), attention_mask=attention_mask, stop_at_layer=model.cfg.n_layer)
    else:
        resid = model.run_blocks(start[1].to(device), start[0], attention_mask)
    return model.hook_norm_final(model.norm_f(resid))


def unembed(model: Any, normed: torch.Tensor) -> torch.Tensor:
    """Float32 logits [..., v] of final-normed rows [..., d] (``HookedMamba.forward``'s last step)."""
    return model.lm_head(normed.to(model.lm_head.weight.dtype)).float()


@torch.no_grad()
def layer_input(model: Any, ids: torch.Tensor, attention_mask: torch.Tensor | None, layer: int) -> torch.Tensor:
    """The residual stream entering block ``layer`` [b, l, d] (``blocks.<layer>.hook_resid_pre``)."""
    return model(ids, attention_mask=attention_mask, stop_at_layer=layer)


@torch.no_grad()
def score_positions(model: Any, ids: torch.Tensor, targets: torch.Tensor, select: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, fwd_hooks: list | None = None,
                    start: tuple[int, torch.Tensor] | None = None, chunk: int = LOGIT_CHUNK,
                    predict: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``targets`` [b, l] and the argmax token at the positions ``select`` [b, l] (bool).

    Returns (log_prob [P], prediction [P]) in the row-major order of ``select.nonzero()``; targets < 0 (ignored
    positions) score the log-probability of token 0. ``start=(layer, resid)`` begins at block ``layer`` from a
    cached residual stream [b, l, d] (``layer_input``); then ``fwd_hooks`` must be at that layer or later.
    ``predict=False``: no argmax (prediction None), one pass less over each chunk's logits, for losses alone.
    """
    device = next(model.parameters()).device
    with model.hooks(fwd_hooks=fwd_hooks or []):
        normed = final_normed(model, ids, attention_mask, start)  # (b, l, d)
    rows = normed[select.to(device)]  # (P, d)
    tgt = targets.to(device)[select.to(device)].clamp(min=0)
    log_prob = torch.empty(rows.shape[0], dtype=torch.float32, device=device)
    pred = torch.empty(rows.shape[0], dtype=torch.long, device=device) if predict else None
    for s in range(0, rows.shape[0], chunk):
        logits = unembed(model, rows[s:s + chunk])  # (c, v)
        if pred is not None:
            pred[s:s + chunk] = logits.argmax(-1)
        lp = torch.log_softmax(logits, -1)
        log_prob[s:s + chunk] = lp.gather(-1, tgt[s:s + chunk, None])[:, 0]
    return log_prob, pred
