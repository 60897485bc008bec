"""Running models of different architectures on the same inputs: residual streams, answer scores, input
influence and length generalisation, for a ``HookedMamba`` and the GPT-2 baseline (``TransformerBaseline``) alike.

* :func:`residual_streams` — the residual stream entering the first block and after every block ([L + 1] tensors
  [b, l, d]): ``hook_embed`` and ``blocks.i.hook_resid_post`` of a HookedMamba; the summed token + position
  embedding and every block's output (before the final LayerNorm) of GPT-2, read with plain torch forward hooks.
* :func:`scored_logprob` — per example, the mean log-probability of the targets at the scored positions.
* :func:`embedding_source` — what ``temporal_causality`` differentiates against for input influence on either
  architecture (``influence_on_answer(model, batch, sources=(embedding_source(model),))``).
* :func:`example_scores` / :func:`length_curve` — per-example loss and correctness, and accuracy and loss on
  fresh task sequences at several lengths (the extrapolation gap).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mamba_interp.tasks.base import TaskBatch


def is_transformer(model: nn.Module) -> bool:
    from mamba_interp.tasks.baseline import TransformerBaseline

    return isinstance(model, TransformerBaseline)


def n_streams(model: nn.Module) -> int:
    """Number of residual-stream read-outs: layers + 1."""
    return (model.config.n_layer if is_transformer(model) else model.cfg.n_layer) + 1


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def embedding_source(model: nn.Module) -> Any:
    """The ``source`` that ``temporal_causality.temporal_jacobian`` / ``influence_on_answer`` differentiate against
    for input influence: the ``hook_embed`` hook of a HookedMamba, the token-embedding module of GPT-2 (read with a
    forward hook; its output is the token part of the summed embedding)."""
    return model.hf_model.transformer.wte if is_transformer(model) else "hook_embed"


@torch.no_grad()
def residual_streams(model: nn.Module, tokens: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
    """[L + 1] residual streams [b, l, d] (float32, CPU) of ``tokens`` [b, l]: entering block 0, then after
    each block."""
    parts: list[list[torch.Tensor]] = []
    dev = _device(model)
    for start in range(0, tokens.shape[0], batch_size):
        ids = tokens[start : start + batch_size].to(dev)
        if is_transformer(model):
            got: dict[int, torch.Tensor] = {}
            tr = model.hf_model.transformer
            handles = [tr.drop.register_forward_hook(lambda m, i, o: got.__setitem__(0, o))]
            for i, block in enumerate(tr.h):
                handles.append(block.register_forward_hook(
                    lambda m, inp, out, i=i: got.__setitem__(i + 1, out[0] if isinstance(out, tuple) else out)))
            try:
                model(ids)
            finally:
                for h in handles:
                    h.remove()
            streams = [got[i] for i in range(len(tr.h) + 1)]
        else:
            names = ["hook_embed"] + [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layer)]
            _, cache = model.run_with_cache(ids, names_filter=names)
            streams = [cache[n] for n in names]
        parts.append([s.float().cpu() for s in streams])
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def scored_logprob(logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
    """Mean log p(target) over each example's scored positions: [b] (logits [b, l, v])."""
    logp = torch.log_softmax(logits.float(), -1)
    mask = batch.eval_mask.to(logits.device)
    tgt = batch.targets.to(logits.device).clamp(min=0)
    lp = logp.gather(-1, tgt[..., None])[..., 0] * mask
    return lp.sum(-1) / mask.sum(-1).clamp(min=1)


@torch.no_grad()
def example_scores(model: nn.Module, batch: TaskBatch, batch_size: int = 64) -> dict[str, np.ndarray]:
    """Per example: ``loss`` (mean −log p of the targets at the scored positions), ``correct`` (every scored
    position right), ``hits`` / ``scored`` (right and scored positions), float64 numpy [b]."""
    dev = _device(model)
    loss, correct, hits, scored = [], [], [], []
    # attention is quadratic in the length: keep about 32k tokens per forward pass
    step = max(1, min(batch_size, 32768 // max(batch.seq_len, 1)))
    for start in range(0, len(batch), step):
        part = batch.select(slice(start, start + step))
        logits = model(part.tokens.to(dev)).float()
        mask = part.eval_mask.to(dev)
        right = (logits.argmax(-1) == part.targets.to(dev)) & mask
        loss.append(-scored_logprob(logits, part))
        correct.append((right | ~mask).all(-1))
        hits.append(right.sum(-1))
        scored.append(mask.sum(-1))
    cat = lambda xs: torch.cat(xs).double().cpu().numpy()  # noqa: E731
    return {"loss": cat(loss), "correct": cat(correct), "hits": cat(hits), "scored": cat(scored)}


def length_curve(model: nn.Module, task: Any, lengths: Sequence[int], n: int, seed: int, batch_size: int = 64
                 ) -> dict[int, dict]:
    """Accuracy (over scored positions) and mean loss on ``n`` fresh test sequences per length, with the
    per-example ``scores`` (:func:`example_scores`) for CIs; lengths a GPT-2 baseline cannot embed (beyond
    ``n_positions``) are left out."""
    out = {}
    for length in lengths:
        if is_transformer(model) and length > model.n_positions:
            continue
        batch = task.sample(n, seed, seq_len=int(length), split="test")
        sc = example_scores(model, batch, batch_size)
        out[int(length)] = {"accuracy": float(sc["hits"].sum() / max(sc["scored"].sum(), 1)),
                            "loss": float(sc["loss"].mean()), "n": len(batch), "scores": sc}
    return out


def sae_features(train: torch.Tensor, evaluate_on: torch.Tensor, expansion: int = 4, k: int = 8, steps: int = 1000,
                 seed: int = 0) -> tuple[torch.Tensor, dict[str, float], Any]:
    """A TopK SAE (``sparse_autoencoder.train_sae``, d_sae = ``expansion``·d) trained on ``train`` [t, d]; returns
    its latent activations on ``evaluate_on`` [n, d] ([n, d_sae]), its metrics there (L0, FVU, dead fraction) and
    the SAE. Shared, cheap settings so that several models' features are comparable."""
    from mamba_interp.sparse_autoencoder import SAEConfig, sae_metrics, train_sae

    d = train.shape[1]
    cfg = SAEConfig(d_in=d, d_sae=expansion * d, architecture="topk", k=min(k, expansion * d), steps=steps,
                    batch_size=min(256, train.shape[0]), seed=seed, log_every=max(1, steps // 10),
                    dead_window_tokens=min(200_000, 50 * train.shape[0]))
    sae = train_sae(train.float(), cfg)
    with torch.no_grad():
        feats = sae.encode(evaluate_on.float().to(sae.device)).cpu()
    m = sae_metrics(sae, evaluate_on.float())
    return feats, {"l0": m.l0, "fvu": m.fvu, "dead_fraction": m.dead_fraction, "d_sae": cfg.d_sae}, sae


def live_features(feats: torch.Tensor, min_active: int = 20) -> torch.Tensor:
    """The columns of ``feats`` [n, f] that are non-zero on at least ``min_active`` rows."""
    return feats[:, (feats != 0).sum(0) >= min_active]
