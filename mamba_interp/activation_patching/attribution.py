"""Attribution patching: first-order estimates of every patching effect from one forward and one backward.

AtP (Nanda 2023; Kramár et al. 2024, arXiv 2403.00745, Eq. 4): the effect of writing the source activation a_src
into the run being patched (corrupted for denoising) is approximated by (a_src − a_dst) · ∂m/∂a evaluated on that
run, summed over the patched positions and features. The integrated-gradients variant (EAP-IG-inputs; Hanna et
al. 2024, arXiv 2403.17806) averages the gradient over runs whose input embeddings are interpolated,
e_dst + (i/m)(e_src − e_dst) for i = 0..m−1 (so ``steps=1`` is AtP).

States. The gradient of the cached ``hook_ssm_state`` is that of the readout only (the recurrence is inside the
scan), which is the first-order term of a ``"readout"`` patch. For ``"propagate"`` the substituted state also
feeds h_{t+1} = Ā_{t+1} h_t + ..., so the gradient is carried back through the recurrence until the next patched
position: G_t = g_t + [t+1 not patched] · Ā_{t+1} ⊙ G_{t+1} (one reverse linear recurrence; Ā from ``hook_dA``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mamba_interp.activation_patching.metrics import as_metric
from mamba_interp.activation_patching.result import PatchResult, normalise
from mamba_interp.activation_patching.sites import resolve_hooks, resolve_positions
from mamba_interp.activation_patching.sweep import check_pair

METHODS = ("atp", "ig")


def _propagated(g: Tensor, dA: Tensor, patched: Tensor | None) -> Tensor:
    """G_t = g_t + keep_{t+1} Ā_{t+1} G_{t+1} over positions (dim 1); ``patched`` [b, l] stops the carry
    at patched positions (None: never). g [b, l, ...], dA broadcastable to g."""
    dA = dA.expand_as(g)
    out = g.clone()
    shape = (g.shape[0],) + (1,) * (g.dim() - 2)
    for t in range(g.shape[1] - 2, -1, -1):
        carry = dA[:, t + 1] * out[:, t + 1]
        if patched is not None:
            carry = carry * (~patched[:, t + 1]).to(g.dtype).view(shape)
        out[:, t] += carry
    return out


def _dA_name(state_hook: str) -> str:
    return state_hook[: -len("hook_ssm_state")] + "hook_dA"


def _contributions(delta: Tensor, grad: Tensor, masks: Tensor, per_channel: bool, dA: Tensor | None) -> Tensor:
    """Σ over each position class's entries (and features) of delta·G: [b, P] or [b, P, C]."""
    b, length = delta.shape[:2]
    d = delta.reshape(b, length, -1).double()
    c = delta.shape[2] if delta.dim() > 2 else 1
    singleton = bool((masks.sum(-1) <= 1).all())
    if dA is None or singleton:  # one gradient for every class
        g = grad if dA is None else _propagated(grad, dA, None)
        prod = d * g.reshape(b, length, -1).double()  # (b, l, F)
        per_pos = prod.reshape(b, length, c, -1).sum(-1) if per_channel else prod.sum(-1)  # (b, l[, C])
        eq = "bl...,pbl->bp..."
        return torch.einsum(eq, per_pos, masks.double())
    out = []
    changed_any = (d != 0).any(-1)
    for mask in masks:
        g = _propagated(grad, dA, mask & changed_any)
        prod = d * g.reshape(b, length, -1).double() * mask[..., None].double()
        out.append(prod.sum(1).reshape(b, c, -1).sum(-1) if per_channel else prod.sum((1, 2)))
    return torch.stack(out, 1)


def attribution_patch(
    model: Any,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Callable[..., Tensor],
    hooks: str | Sequence[str] | None = None,
    method: str = "atp",
    steps: int = 10,
    positions: Any = "all",
    direction: str = "denoise",
    per_channel: bool = False,
    state_mode: str = "propagate",
    layers: Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    batch_size: int | None = None,
) -> PatchResult:
    """First-order estimates of :func:`patch_sweep`'s effects (same arguments, same normalisation, same result
    type), for every site at once. ``method="atp"``: one forward and one backward on the run being patched (plus
    the source run's forward); ``"ig"``: ``steps`` forward/backward passes on interpolated input embeddings.
    Backward passes are linear in the sequence length."""
    check_pair(clean_ids, corrupt_ids, direction, state_mode)
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use 'atp' or 'ig'")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    fn, flexible = as_metric(metric)
    names = resolve_hooks(model, hooks, layers)
    b, length = clean_ids.shape
    labels, masks = resolve_positions(positions, b, length)
    src_ids, dst_ids = (clean_ids, corrupt_ids) if direction == "denoise" else (corrupt_ids, clean_ids)
    states = [h for h in names if h.endswith("hook_ssm_state")] if state_mode == "propagate" else []
    cached = list(dict.fromkeys(names + [_dA_name(h) for h in states]))
    device = next(model.parameters()).device
    n_steps = steps if method == "ig" else 1
    chunks = torch.arange(b).split(batch_size or b) if flexible else [torch.arange(b)]

    est = {h: [] for h in names}
    src_vals, dst_vals = [], []
    for idx in chunks:
        m = fn.subset(idx) if flexible else fn
        am = None if attention_mask is None else attention_mask[idx].to(device)
        with torch.no_grad():
            src_logits, src_cache = model.run_with_cache(src_ids[idx].to(device), attention_mask=am, names_filter=names)
            e_src = model.embed(src_ids[idx].to(device))
        src_vals.append(m(src_logits).float().cpu())
        acc: dict[str, Tensor] = {}
        dst_cache = None
        for i in range(n_steps):
            alpha = i / n_steps
            interp = [] if i == 0 else [("hook_embed", lambda e, hook, a=alpha: e + a * (e_src.to(e.dtype) - e))]
            logits, cache = model.run_with_cache(dst_ids[idx].to(device), attention_mask=am, names_filter=cached,
                                                 fwd_hooks=interp, incl_bwd=True,
                                                 backward_fn=lambda lg, m=m: m(lg).sum())
            if i == 0:
                dst_cache = cache
                dst_vals.append(m(logits.detach()).float().cpu())
            for h in names:
                delta = (src_cache[h] - dst_cache[h]).float()
                dA = cache[_dA_name(h)].float() if h in states else None
                if dA is not None and dA.dim() == 3 and delta.dim() == 5:  # Mamba-2: one decay per head
                    dA = dA[..., None, None]
                c = _contributions(delta, cache[h + "_grad"].float(), masks[:, idx], per_channel, dA)
                acc[h] = acc.get(h, 0) + c / n_steps
            del cache
        for h in names:
            est[h].append(acc[h])
    src_m, dst_m = torch.cat(src_vals), torch.cat(dst_vals)
    clean_m, corrupt_m = (src_m, dst_m) if direction == "denoise" else (dst_m, src_m)
    effect, per_example = {}, {}
    for h in names:
        first = torch.cat(est[h]).cpu()  # (b, P[, C]) first-order change of the metric
        base = dst_m.double().view(-1, *([1] * (first.dim() - 1)))
        per_example[h] = normalise(base + first, clean_m, corrupt_m, direction).float()
        effect[h] = per_example[h].mean(0)
    meta = {"steps": n_steps, "backward_passes": n_steps * len(chunks)}
    return PatchResult(effect, per_example, labels, direction, method, state_mode, float(clean_m.double().mean()),
                       float(corrupt_m.double().mean()), model.cfg.n_layer, meta)
