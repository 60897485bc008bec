"""Feature dashboards: one card per SAE latent with what SAELens / Neuronpedia users look at first.

After Bricken et al. 2023 ("Towards Monosemanticity", the feature browser) and Neuronpedia's feature pages: the
top-activating token contexts with every token coloured by the latent's activation, the histogram of its
non-zero activations, the logit effect of its decoder direction (the tokens it promotes and suppresses), and the
ground-truth variable it matches.

* :func:`latent_cards` — contexts, histogram and density of chosen latents from latent activations F [b, l, c].
* :func:`direct_logit_effect` — W_U (γ ⊙ w) for decoder rows w written into the residual stream (Neuronpedia's
  "logit lens" of a feature): the direct path only, later layers skipped and the final RMSNorm's scale frozen.
  :func:`residual_directions` maps decoder rows of ``hook_resid_pre/post``, ``hook_out`` and ``hook_gated``
  (through ``out_proj``) into the residual stream; other hooks (the SSM's x, Δ, y, ...) have no linear path.
* :func:`ablation_logit_effect` — for those: the measured mean change of the logits at the latent's top positions
  when it is zero-ablated in those sequences (SAE spliced in with its error term, so nothing else changes).
A card is a JSON-able dict (pipeline step 3 writes them to ``feature_dashboards.json``);
``mamba_interp.pipeline.report_dashboards.dashboards_html(cards)`` renders cards as self-contained HTML.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mamba_interp.sparse_autoencoder.model import SparseAutoencoder
from mamba_interp.sparse_autoencoder.splice import ablate_latents, saes_spliced

RenderToken = Callable[[int], str]
RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_post", "mixer.hook_out")
"""Hooks whose activation is (added to) the residual stream itself."""


# ---- data ----------------------------------------------------------------------------------------------
def latent_cards(features: Tensor, latents: Sequence[int], tokens: Tensor, render: RenderToken,
                 mask: Tensor | None = None, k: int = 8, before: int = 8, after: int = 2,
                 bins: int = 24) -> list[dict[str, Any]]:
    """Cards (contexts, histogram, density) for ``latents``; ``features`` [b, l, c] holds their activations in the
    same order, ``tokens`` [b, l] the ids, ``mask`` [b, l] the real positions (None: all).

    Contexts are the ``k`` positions where the latent is largest, with ``before`` / ``after`` tokens around them and
    the latent's activation on every shown token.
    """
    b, l, c = features.shape
    if len(latents) != c or tuple(tokens.shape) != (b, l):
        raise ValueError(f"features {tuple(features.shape)} need one column per latent ({len(latents)}) and "
                         f"tokens of shape ({b}, {l}); got tokens {tuple(tokens.shape)}")
    valid = torch.ones(b, l, dtype=torch.bool) if mask is None else mask.bool().cpu()
    f = features.float().cpu().masked_fill(~valid[..., None], 0.0)
    n_valid = int(valid.sum())
    cards = []
    for j, latent in enumerate(latents):
        col = f[..., j]  # (b, l)
        fired = col[valid & (col != 0)]
        top = col.reshape(-1).topk(min(k, col.numel()))
        contexts = []
        for value, idx in zip(top.values.tolist(), top.indices.tolist()):
            if value <= 0:
                break
            seq, pos = divmod(idx, l)
            lo, hi = max(0, pos - before), min(l, pos + after + 1)
            keep = valid[seq, lo:hi]
            ids = tokens[seq, lo:hi][keep].tolist()
            contexts.append({"sequence": seq, "position": pos, "activation": value,
                             "tokens": [render(int(t)) for t in ids],
                             "acts": [round(float(a), 4) for a in col[seq, lo:hi][keep]],
                             "focus": int(keep[: pos - lo].sum())})
        if fired.numel():
            lo_edge, hi_edge = 0.0, float(fired.max())
            counts = torch.histc(fired, bins=bins, min=lo_edge, max=hi_edge if hi_edge > 0 else 1.0)
            edges = torch.linspace(lo_edge, hi_edge if hi_edge > 0 else 1.0, bins + 1)
            hist = {"edges": [round(float(e), 4) for e in edges], "counts": [int(n) for n in counts]}
        else:
            hist = {"edges": [], "counts": []}
        cards.append({
            "latent": int(latent), "density": fired.numel() / max(n_valid, 1),
            "max_activation": float(fired.max()) if fired.numel() else 0.0,
            "mean_activation": float(fired.mean()) if fired.numel() else 0.0,
            "histogram": hist, "contexts": contexts,
        })
    return cards


def residual_directions(model: Any, hook_name: str, W_dec: Tensor) -> Tensor | None:
    """Decoder rows W_dec [m, k] as directions of the residual stream [m, d], or None without a linear path."""
    if hook_name.endswith(RESIDUAL_HOOKS):
        return W_dec.detach()
    if hook_name.endswith("mixer.hook_gated"):  # gated -> out_proj (linear) -> added to the residual stream
        layer = int(hook_name.split(".")[1])
        return W_dec.detach() @ model.blocks[layer].mixer.out_proj.weight.detach().T
    return None


def _top_tokens(effect: Tensor, render: RenderToken, top: int) -> dict[str, list]:
    """The ``top`` largest and smallest entries of a vocabulary vector [v] (at most half of it each), rendered."""
    n = max(1, min(top, effect.numel() // 2))
    up, down = effect.topk(n), (-effect).topk(n)
    return {"promoted": [[render(int(i)), round(float(v), 4)] for v, i in zip(up.values, up.indices)],
            "suppressed": [[render(int(i)), round(-float(v), 4)] for v, i in zip(down.values, down.indices)]}


@torch.no_grad()
def direct_logit_effect(model: Any, directions: Tensor, render: RenderToken, top: int = 8) -> list[dict]:
    """Per residual direction w [c, d]: the tokens whose logits w raises / lowers most, W_U (γ ⊙ w) (γ: the final
    RMSNorm's weight; per unit of activation, the normalisation's 1/rms left out)."""
    gamma = model.norm_f.weight.detach().float()
    w_u = model.lm_head.weight.detach().float()[: model.cfg.vocab_size]  # (v, d); padded rows are no tokens
    effects = (directions.float().to(w_u.device) * gamma) @ w_u.T  # (c, v)
    note = "direct path: decoder direction through the final norm's weight and the unembedding"
    return [{"kind": "direct", "note": note, **_top_tokens(e.cpu(), render, top)} for e in effects]


@torch.no_grad()
def ablation_logit_effect(model: Any, sae: SparseAutoencoder, hook_name: str, tokens: Tensor,
                          sequences: Sequence[int], positions: Sequence[int], latent: int, render: RenderToken,
                          attention_mask: Tensor | None = None, top: int = 8,
                          start: tuple[int, Tensor] | None = None, clean_final: Tensor | None = None) -> dict:
    """Mean of (clean − ablated) logits at (sequence, position) pairs when ``latent`` is zero-ablated in those
    sequences (all positions; the SAE's error term kept), over the vocabulary; its top promoted / suppressed.

    Logits are formed at those pairs only. ``start=(layer, resid)``: the residual stream entering ``layer`` [B, l, d]
    for every sequence of ``tokens`` (the SAE's hook must be at that layer or later); both passes then run from
    there instead of from the embedding. ``clean_final``: the clean final-normed residual stream [B, l, d] of every
    sequence (``hook_norm_final`` of a clean pass), which replaces the clean pass."""
    rows = sorted(set(int(s) for s in sequences))
    where = {s: i for i, s in enumerate(rows)}
    device = next(model.parameters()).device
    ids = tokens[rows].to(device)
    mask = None if attention_mask is None else attention_mask[rows].to(device)
    part = None if start is None else (start[0], start[1][rows])
    r = torch.tensor([where[int(s)] for s in sequences], device=device)
    p = torch.as_tensor(list(positions), device=device).long()

    def logits_at() -> Tensor:  # (P, v) at the (sequence, position) pairs only
        if part is None:
            resid = model(ids, attention_mask=mask, stop_at_layer=model.cfg.n_layer)
        else:
            resid = model.run_blocks(part[1].to(device), part[0], mask)
        rows_ = model.hook_norm_final(model.norm_f(resid))[r, p]
        return model.lm_head(rows_.to(model.lm_head.weight.dtype)).float()

    with torch.no_grad():
        if clean_final is None:
            clean = logits_at()
        else:
            rows_ = clean_final[rows].to(device)[r, p]
            clean = model.lm_head(rows_.to(model.lm_head.weight.dtype)).float()
        with saes_spliced(model, {hook_name: sae}, use_error_term=True,
                          latent_edits={hook_name: ablate_latents([latent])}):
            ablated = logits_at()
    effect = (clean - ablated).float().mean(0)[: model.cfg.vocab_size].cpu()
    note = f"measured: mean logit change at its top {len(p)} positions when it is zero-ablated"
    return {"kind": "ablation", "note": note, **_top_tokens(effect, render, top)}
