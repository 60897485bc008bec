"""Temporal influence: Jacobian norms and score gradients between positions, and the memory horizon.

``temporal_jacobian`` measures how much the target at position t (logits, or any hook) depends on the source
activation at every position s: ‖∂ target_t / ∂ source_s‖_F over the feature dimensions, or, with ``score``,
the gradient of one scalar per target (e.g. the correct answer's log-prob) — gradient-based input attribution
(MambaLRP, Rezaei Jafari et al. 2024, arXiv 2406.07592, starts from the same gradient × input). It uses plain
reverse-mode autograd through the model's own forward, so it works with every scan implementation, the ``loop``
scan's hand-written backward included (``torch.func`` transforms are not used: they do not compose with that
custom autograd function).

Cost: one forward, then one backward per target position, batched over the sequences (which never interact).
With ``score`` the batch is the input; for the Jacobian norm each sequence is replicated once per target
feature (F = v for logits), so the same passes run on a batch F times larger — use ``score`` for large
vocabularies. A backward is about two forwards and linear in l for the ``loop``, ``chunked`` and ``parallel``
scans, so one target row with a score costs about one forward + backward.

For a model without hook points (e.g. the zoo's GPT-2 baseline in a transformer comparison) pass the
embedding *module* as ``source`` (``source=model.hf_model.transformer.wte``): its output is captured with a
forward hook and the same gradient-of-score path applies to any ``nn.Module`` returning logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from mamba_interp.temporal_causality.hidden_attention import as_positions

Score = Callable[[Tensor, int], Tensor]
JACOBIAN_REDUCTIONS = ("norm", "input_x_grad", "none")


def answer_logprob(answers: Tensor) -> Score:
    """A ``score`` for :func:`temporal_jacobian`: the log-prob of ``answers`` ([b], or [b, T] one per target
    column) under the target logits at each target position."""

    def score(logits_t: Tensor, j: int) -> Tensor:
        a = answers if answers.dim() == 1 else answers[:, j]
        logp = torch.log_softmax(logits_t.float(), dim=-1)
        return logp.gather(-1, a.to(logp.device).long()[:, None])[:, 0]

    return score


@contextlib.contextmanager
def _capture(model: nn.Module, names: list[Any], target: Any, store: dict[Any, Tensor]) -> Iterator[None]:
    """Record each source (and a hooked target) in the autograd graph of one forward; the first source that
    does not already require grad becomes a leaf, so gradients reach every later source through it."""

    def keep(key: Any, value: Tensor) -> Tensor | None:
        if not value.requires_grad:
            value = value.detach().requires_grad_(True)
            store[key] = value
            return value
        store[key] = value
        return None

    wanted = names + ([target] if target != "logits" else [])
    hook_names = [n for n in wanted if isinstance(n, str)]
    modules = [n for n in wanted if isinstance(n, nn.Module)]
    if hook_names and not hasattr(model, "hooks"):
        raise TypeError(
            f"{hook_names[0]!r} names a hook point, but {type(model).__name__} has none; pass the embedding module "
            "instead (e.g. source=model.hf_model.transformer.wte)"
        )
    handles = [m.register_forward_hook(lambda mod, args, out, key=m: keep(key, out)) for m in modules]
    try:
        if hook_names:
            with model.hooks(fwd_hooks=[(n, lambda t, hook, key=n: keep(key, t)) for n in hook_names]):
                yield
        else:
            yield
    finally:
        for h in handles:
            h.remove()


def temporal_jacobian(
    model: nn.Module,
    input_ids: Tensor,
    target_positions: Any = None,
    source: Any = "hook_embed",
    target: Any = "logits",
    score: Score | None = None,
    reduce: str = "norm",
    attention_mask: Tensor | None = None,
    max_features: int = 1024,
) -> Any:
    """Influence of every source position on targets at ``target_positions``: [b, T, l], zero for s > t.

    target_positions: None (every position, T = l), ints shared by every sequence, or [b] / [b, T] tensors per
    sequence. source: a hook name (``"hook_embed"``, ``"blocks.1.hook_resid_pre"``), an ``nn.Module`` (its
    output), or a list of them — then a dict name -> result from the same backward passes. target: "logits"
    (the model's output) or a hook name / module. score: ``score(target_rows [b, ...], j) -> [b]`` turns the
    Jacobian into the gradient of that scalar (:func:`answer_logprob`). reduce: "norm" (Frobenius norm over the
    target's and source's feature dims), "input_x_grad" (Σ_d source·∂score/∂source, needs ``score``), or
    "none" (raw: [b, T, l, d] with a score, [b, T, F, l, d] without; F = flattened target features).
    Without a score each sequence is replicated once per target feature (a batch of b·F, at most
    ``max_features`` features), so each target position still costs one batched backward.
    """
    if reduce not in JACOBIAN_REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is unknown; use one of {JACOBIAN_REDUCTIONS}")
    if reduce == "input_x_grad" and score is None:
        raise ValueError("reduce='input_x_grad' needs a score (gradient × input is defined for a scalar)")
    single = isinstance(source, (str, nn.Module))
    names = [source] if single else list(source)
    if not names:
        raise ValueError("source is empty; name at least one hook point or module")
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    b, l = ids.shape
    pos = torch.arange(l).expand(b, l) if target_positions is None else as_positions(target_positions, b, l,
                                                                                     "target_positions")
    pos = pos.to(ids.device)
    F = 1
    if score is None:  # one replica of each sequence per target feature: every backward yields all F rows
        F = _feature_count(model, ids, attention_mask, target)
        if F > max_features:
            raise ValueError(f"the target has {F} features per position (> max_features={max_features}); pass a "
                             "score (e.g. answer_logprob(answers)) for one backward per position")
        ids = ids.repeat_interleave(F, 0)
        pos = pos.repeat_interleave(F, 0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(F, 0)
    tgt, sources = _forward(model, ids, attention_mask, names, target)
    rows = torch.arange(ids.shape[0], device=ids.device)
    T = pos.shape[1]
    results: list[list[Tensor]] = [[] for _ in names]
    for j in range(T):
        picked = tgt[rows, pos[:, j]]  # (b·F, ...)
        if score is not None:
            value = score(picked, j).sum()
        else:  # replica f of a sequence differentiates its own feature f
            value = picked.reshape(b, F, F).diagonal(dim1=1, dim2=2).sum()
        grads = torch.autograd.grad(value, sources, retain_graph=j < T - 1, allow_unused=True)
        for k, (g, src) in enumerate(zip(grads, sources)):
            g = (torch.zeros_like(src) if g is None else g).reshape(b, F, l, -1)  # (b, F, l, d)
            if reduce == "norm":
                results[k].append(g.square().sum(dim=(1, 3)).sqrt())
            elif reduce == "input_x_grad":
                results[k].append((g[:, 0] * src.detach().reshape(b, l, -1)).sum(-1))
            else:
                results[k].append(g[:, 0] if score is not None else g)
    stacked = [torch.stack(r, 1).detach() for r in results]  # (b, T, l[, ...])
    return stacked[0] if single else dict(zip(names, stacked))


def _forward(model: nn.Module, ids: Tensor, mask: Tensor | None, names: list[Any], target: Any
             ) -> tuple[Tensor, list[Tensor]]:
    store: dict[Any, Tensor] = {}
    with torch.enable_grad(), _capture(model, names, target, store):
        out = model(ids) if mask is None else model(ids, attention_mask=mask)
    missing = [n for n in names + ([] if target == "logits" else [target]) if n not in store]
    if missing:
        raise ValueError(f"{missing[0]!r} did not run in the forward pass; check the name")
    return (out if target == "logits" else store[target]), [store[n] for n in names]


def _feature_count(model: nn.Module, ids: Tensor, mask: Tensor | None, target: Any) -> int:
    """Features of the target at one position: the logits' width from the config, else from a probe forward."""
    if target == "logits" and hasattr(getattr(model, "cfg", None), "padded_vocab_size"):
        return int(model.cfg.padded_vocab_size)
    with torch.no_grad():
        out, _ = _forward(model, ids[:1], None if mask is None else mask[:1], [], target)
    return int(out[0, 0].numel())


def memory_horizon(influence: Tensor, threshold: float = 0.1, target_positions: Any = None) -> Tensor:
    """Per target, the largest distance t − s whose influence is ≥ ``threshold`` × that target's peak (over
    s ≤ t): influence [b, T, l] (e.g. :func:`temporal_jacobian`'s output; [T, l] for one sequence) -> long
    [b, T] ([T]).

    target_positions: the t of each row (ints / [b] / [b, T] as in :func:`temporal_jacobian`); None means the
    rows are every position (T = l). A target with zero influence everywhere gets horizon 0. This is the
    "farthest source above a fraction of the peak" definition (not a tail-based ε-horizon): report the
    threshold with it.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} must be in (0, 1]")
    if influence.dim() not in (2, 3):
        raise ValueError(f"influence must be [b, T, l] or [T, l], got shape {tuple(influence.shape)}")
    x = influence if influence.dim() == 3 else influence[None]
    b, T, l = x.shape
    if target_positions is None:
        if T != l:
            raise ValueError(f"influence has {T} target rows for length {l}; pass target_positions")
        t = torch.arange(l, device=x.device).expand(b, l)
    else:
        t = as_positions(target_positions, b, l, "target_positions").to(x.device)
        if t.shape[1] != T:
            raise ValueError(f"target_positions has {t.shape[1]} columns for {T} influence rows")
    s = torch.arange(l, device=x.device)
    causal = s <= t[..., None]  # (b, T, l)
    x = x.abs().masked_fill(~causal, 0)
    peak = x.amax(-1, keepdim=True)
    above = causal & (x >= threshold * peak) & (peak > 0)
    out = (t[..., None] - s).masked_fill(~above, -1).amax(-1).clamp_min(0)
    return out if influence.dim() == 3 else out[0]


def influence_profile(influence: Tensor, target_positions: Tensor, normalise: bool = True) -> Tensor:
    """Mean influence at each distance τ = t − s (0..l−1): influence [b, T, l] -> [l]. With ``normalise`` each
    target's row is first divided by its sum, so every target weighs the same (an influence profile I(τ) over
    gradient norms)."""
    b, T, l = influence.shape
    t = as_positions(target_positions, b, l, "target_positions").to(influence.device)
    dist = t[..., None] - torch.arange(l, device=influence.device)  # (b, T, l)
    ok = dist >= 0
    x = influence.abs().masked_fill(~ok, 0)
    if normalise:
        x = x / x.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    total = torch.zeros(l, dtype=x.dtype, device=x.device).index_add_(0, dist[ok], x[ok])
    count = torch.zeros(l, dtype=x.dtype, device=x.device).index_add_(0, dist[ok], torch.ones_like(x[ok]))
    return total / count.clamp_min(1)
