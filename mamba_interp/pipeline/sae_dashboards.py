"""Step 3's feature dashboards: which latents of each SAE get a card, and the measurements behind each card.

Per SAE at most ``n`` latents (``Options.dashboards``), in this order:

1. the best matches of the ground-truth variables (the latents of ``correlate_latents``, by |r|), up to n − 3;
2. the densest live latent;
3. the most ablation-relevant latents: attribution patching (``latent_attribution``; Syed et al. 2023, on SAE
   latents Marks et al. 2024) estimates for every latent how zero-ablating it everywhere changes the log-odds of
   the correct token at the target positions, with every SAE spliced in with its error term, in one forward and
   backward pass over the first held-out sequences (``Options.dashboard_sequences`` of them, at most
   ``Options.dashboard_tokens`` tokens: ``pipeline.datasets.budget_sequences``). The log-odds
   z_target − logsumexp(z_other) is used rather than the cross-entropy because a well-trained model's loss is
   saturated (p ≈ 1, gradient ≈ 0) and its gradient ranks nothing (Heimersheim & Nanda 2024, "How to use and
   interpret activation patching", prefer logit differences for the same reason). The top latent of each SAE is
   then ablated for real (``run_with_saes`` with the error term) on the same sequences: its card shows the
   measured change of the target loss with a paired bootstrap CI over sequences.

Each card (``mamba_interp.sparse_autoencoder.dashboard``) adds the top-activating held-out contexts, the activation
histogram, the logit effect (direct path through the unembedding for residual-stream hooks, else measured by
ablation at the top contexts) and the variable the latent correlates with most.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mamba_interp.pipeline.context import StepContext
from mamba_interp.pipeline.sae_support import (
    LayerStarts,
    SAEActivations,
    SequenceCE,
    TrainedSAE,
    sequence_losses,
    token_renderer,
)
from mamba_interp.sparse_autoencoder import ablate_latents, feature_variable_correlation, latent_attribution
from mamba_interp.sparse_autoencoder.dashboard import (
    ablation_logit_effect,
    direct_logit_effect,
    latent_cards,
    residual_directions,
)
from mamba_interp.stats import paired_diff_ci

FILE = "feature_dashboards"


def log_odds(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per sequence: the summed log-odds z_t − logsumexp_{j≠t} z_j of the target token t over its target
    positions (targets != -100), and their count, [b]."""
    from mamba_interp.tasks.base import IGNORE

    scored = targets != IGNORE
    z = logits.float()
    t = targets.clamp(min=0)[..., None]
    z_t = z.gather(-1, t)[..., 0]
    others = z.scatter(-1, t, float("-inf")).logsumexp(-1)
    return ((z_t - others) * scored).sum(1), scored.sum(1)


def attributions(model: Any, batch: Any, trained: dict[str, TrainedSAE], batch_size: int,
                 vocab: int, start: Tensor | None = None) -> dict[str, Tensor]:
    """Per SAE key, [m] estimated change of the mean log-odds of the correct token over ``batch``'s target
    positions when each latent is zero-ablated (all SAEs spliced at once with their error terms: the forward is
    the clean model's). Negative: ablating the latent hurts.

    The pass starts at the first SAE's layer from the residual stream entering it (computed without autograd), and
    the log-odds are taken on the target positions ``memory_plan.ATTRIBUTION_LOGIT_CHUNK`` rows at a time under
    activation checkpointing, so the autograd graph holds only the blocks after that layer and one chunk of
    full-vocabulary logits (:func:`attributions_reference` is the plain full-model pass; the two agree).
    ``start``: that residual stream [b, l, d] of the whole batch, when the caller has it (``LayerStarts``). The
    graph is bounded by running
    ``attribution_batch`` sequences at a time (``memory_plan.ATTRIBUTION_GRAPH_BYTES``); a sum over sequences, so
    the result does not depend on it."""
    import torch.utils.checkpoint

    from mamba_interp.pipeline.logits import layer_input
    from mamba_interp.pipeline.memory_plan import ATTRIBUTION_LOGIT_CHUNK, attribution_batch
    from mamba_interp.tasks.base import IGNORE

    device = next(model.parameters()).device
    total_targets = int((batch.targets != IGNORE).sum())
    by_hook = {t.hook_name: t.sae for t in trained.values()}
    first = min(t.layer for t in trained.values())
    out = {k: torch.zeros(t.sae.cfg.d_sae) for k, t in trained.items()}

    def chunk_log_odds(rows: Tensor, tgt: Tensor) -> Tensor:  # rows [c, d] normed, tgt [c] -> summed log-odds
        logits = model.lm_head(rows.to(model.lm_head.weight.dtype))[..., :vocab][None]
        return log_odds(logits, tgt[None])[0].sum()

    step = attribution_batch(model.cfg, model.cfg.n_layer - first, batch.tokens.shape[1],
                             [t.sae.cfg.d_sae for t in trained.values()], batch_size)
    for s in range(0, len(batch), step):
        ids = batch.tokens[s:s + step].to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask[s:s + step].to(device)
        targets = batch.targets[s:s + step].to(device)
        resid = layer_input(model, ids, mask, first) if start is None else start[s:s + step].to(device)  # [b, l, d]
        scored = targets != IGNORE

        def forward(resid: Tensor = resid, mask: Tensor | None = mask, scored: Tensor = scored) -> Tensor:
            normed = model.hook_norm_final(model.norm_f(model.run_blocks(resid, first, mask)))
            return normed[scored]  # [P, d]

        def metric(rows: Tensor, tgt: Tensor = targets[scored]) -> Tensor:
            total = rows.new_zeros(())
            chunk = ATTRIBUTION_LOGIT_CHUNK
            for c in range(0, rows.shape[0], chunk):
                total = total + torch.utils.checkpoint.checkpoint(
                    chunk_log_odds, rows[c:c + chunk], tgt[c:c + chunk], use_reentrant=False)
            return total / max(total_targets, 1)

        part = latent_attribution(model, metric, saes=by_hook, forward=forward)
        for key, t in trained.items():
            out[key] += part[t.hook_name]
    return out


def attributions_reference(model: Any, batch: Any, trained: dict[str, TrainedSAE], batch_size: int,
                           vocab: int) -> dict[str, Tensor]:
    """:func:`attributions` by the plain pass: the whole model with autograd, full logits [b, l, v]."""
    from mamba_interp.tasks.base import IGNORE

    device = next(model.parameters()).device
    total_targets = int((batch.targets != IGNORE).sum())
    by_hook = {t.hook_name: t.sae for t in trained.values()}
    out = {k: torch.zeros(t.sae.cfg.d_sae) for k, t in trained.items()}
    for s in range(0, len(batch), batch_size):
        ids = batch.tokens[s:s + batch_size].to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask[s:s + batch_size].to(device)
        targets = batch.targets[s:s + batch_size].to(device)

        def metric(logits: Tensor, targets: Tensor = targets) -> Tensor:
            return log_odds(logits[..., :vocab], targets)[0].sum() / max(total_targets, 1)

        part = latent_attribution(model, metric, ids, attention_mask=mask, saes=by_hook)
        for key, t in trained.items():
            out[key] += part[t.hook_name]
    return out


def choose_latents(records: list[dict], density: Tensor, attribution: Tensor, n: int) -> list[tuple[int, list[str]]]:
    """Up to ``n`` (latent, reasons): variable matches, the densest latent, then the most ablation-relevant."""
    chosen: dict[int, list[str]] = {}

    def add(latent: int, reason: str, limit: int) -> None:
        if latent in chosen:
            chosen[latent].append(reason)
        elif len(chosen) < limit:
            chosen[latent] = [reason]

    for rec in sorted(records, key=lambda r: -r["abs_r"])[: max(n - 3, 1)]:
        add(int(rec["latent"]), f"best latent for {rec['variable']} (r = {rec['r']:.2f})", max(n - 3, 1))
    if bool((density > 0).any()):
        dense = int(density.argmax())
        add(dense, f"densest: fires on {100 * float(density[dense]):.1f}% of tokens", n)
    for latent in attribution.argsort().tolist():  # most negative first: ablating it hurts the most
        if len(chosen) >= n or attribution[latent] >= 0:
            break
        add(int(latent), f"ablation-relevant: ≈ {float(attribution[latent]):+.3g} log-odds of the answer "
            "(attribution)", n)
    return [(latent, reasons) for latent, reasons in chosen.items()]


def _dense(values: Tensor, mask: Tensor) -> Tensor:
    """Rows over the valid tokens [N, c] -> [b, l, c] with zeros at padding."""
    out = torch.zeros(*mask.shape, values.shape[-1])
    out[mask] = values
    return out


def build_dashboards(ctx: StepContext, trained: dict[str, TrainedSAE], features: dict[str, Tensor],
                     data: SAEActivations, correlations: dict[str, list[dict]], variables: dict[str, Tensor],
                     n: int, n_sequences: int, k: int, starts: LayerStarts | None = None,
                     clean: SequenceCE | None = None, clean_final: Tensor | None = None) -> list[dict]:
    """The cards of every SAE (JSON-able), measured on step 3's held-out data. ``starts``: the residual stream
    entering each SAE layer of the held-out batch, and ``clean``: its clean cross-entropy per sequence, when step 3
    has them (every pass here then starts at an SAE's layer); ``clean_final``: its clean final-normed residual
    stream [b, l, d] (the clean logits of the measured logit effects)."""
    model, batch = ctx.model, data.eval_batch
    render = token_renderer(ctx)
    n_sub = min(n_sequences, len(batch))
    subset = batch.select(slice(0, n_sub))
    starts = starts if starts is not None else LayerStarts(model, batch, ctx.batch_size)
    first = min(t.layer for t in trained.values())
    att = attributions(model, subset, trained, ctx.batch_size, model.cfg.vocab_size, start=starts(first, n_sub)[1])
    clean = (clean.per_sequence(n_sub) if clean is not None
             else sequence_losses(model, subset, ctx.batch_size, start=starts(first, n_sub)))
    mask = data.eval.mask
    cards: list[dict] = []
    for idx, (key, t) in enumerate(trained.items()):
        picks = choose_latents(correlations.get(key, []), t.density, att[key], n)
        if not picks:
            continue
        latents = [p[0] for p in picks]
        f = features[key][:, latents]  # (N_eval, c)
        sae_cards = latent_cards(_dense(f, mask), latents, batch.tokens, render, mask=mask, k=k)
        matched = feature_variable_correlation(f, variables, n_shuffles=1, seed=ctx.seed + idx) if variables else None
        directions = residual_directions(model, t.hook_name, t.sae.W_dec[latents])
        direct = direct_logit_effect(model, directions, render) if directions is not None else None
        top_latent = int(att[key].argmin())
        for j, ((latent, reasons), card) in enumerate(zip(picks, sae_cards)):
            card.update(sae=key, hook_name=t.hook_name, reasons=reasons, attribution=float(att[key][latent]))
            if matched is not None:
                v = int(matched.r[:, j].abs().argmax())
                card["variable"] = {"name": matched.names[v], "r": float(matched.r[v, j]),
                                    "shuffled_best_abs_r": float(matched.shuffled_best_abs_r[v])}
            if direct is not None:
                card["logit_effect"] = direct[j]
            elif card["contexts"]:
                seqs = [c["sequence"] for c in card["contexts"]]
                pos = [c["position"] for c in card["contexts"]]
                card["logit_effect"] = ablation_logit_effect(model, t.sae, t.hook_name, batch.tokens, seqs, pos,
                                                             latent, render, attention_mask=batch.attention_mask,
                                                             start=starts(t.layer), clean_final=clean_final)
            if latent == top_latent and float(att[key][latent]) < 0:
                ablated = sequence_losses(model, subset, ctx.batch_size, saes={t.hook_name: t.sae},
                                          use_error_term=True, latent_edits={t.hook_name: ablate_latents([latent])},
                                          start=starts(t.layer, n_sub))
                card["ablation"] = paired_diff_ci(ablated.numpy(), clean.numpy(), seed=ctx.seed).to_dict()
            cards.append(card)
    return cards
