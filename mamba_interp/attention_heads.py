"""The transformer baseline's induction mechanism: head scores from attention patterns, confirmed by patching.

For the GPT-2 baseline (``mamba_interp.tasks.baseline.TransformerBaseline``), read with plain torch hooks on the
transformers modules (no second model implementation):

* :func:`attention_patterns` — every head's attention probabilities [layers, b, h, l, l] (eager attention).
* Scores of Olsson et al. 2022 / TransformerLens ``head_detector`` ("mul" score: attention mass on the pattern):
  :func:`previous_token_score` (mass on i − 1, averaged over positions i ≥ 1), :func:`induction_score` (for task
  batches with ground truth: the query's mass on the answer position p + 1; otherwise :func:`duplicate_shift_score`,
  the mass on the token after an earlier copy of the current token), and :func:`position_score` (the mass of one
  position on another, e.g. the answer position p + 1 on the trigger p: the previous-token lookup where it matters).
* :func:`patch_components` — denoising activation patching (Meng et al. 2022; Zhang & Nanda 2023, arXiv 2309.16042):
  run the corrupted input with one component's output replaced by its clean value (all positions, or one position
  per example) and return the per-example metric. Components: ``("head", layer, h)`` (the head's slice of the
  merged-heads input of ``attn.c_proj``), ``("attn", layer)``, ``("mlp", layer)``, ``("block", layer)``.
* :func:`restored_fraction` — (mean m_patched − mean m_corrupt) / (mean m_clean − mean m_corrupt), with a bootstrap
  CI over examples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mamba_interp.comparison import bootstrap_indices
from mamba_interp.stats import Estimate

Component = tuple  # ("head", layer, h) | ("attn", layer) | ("mlp", layer) | ("block", layer)
Metric = Callable[[torch.Tensor, slice], torch.Tensor]  # (logits [b, l, v] of examples[index], index) -> [b]


@contextlib.contextmanager
def eager_attention(baseline: nn.Module) -> Iterator[None]:
    """Run GPT-2 with the eager attention kernel (the only one that returns probabilities), then restore."""
    hf = baseline.hf_model
    before = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        hf.set_attn_implementation(before)


@torch.no_grad()
def attention_patterns(baseline: nn.Module, tokens: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Attention probabilities [layers, b, h, l, l] (float32, CPU) of ``tokens`` [b, l]."""
    dev = next(baseline.parameters()).device
    parts = []
    with eager_attention(baseline):
        for start in range(0, tokens.shape[0], batch_size):
            out = baseline.hf_model(input_ids=tokens[start : start + batch_size].to(dev), output_attentions=True,
                                    use_cache=False)
            parts.append(torch.stack([a.float().cpu() for a in out.attentions]))
    return torch.cat(parts, dim=1)


def previous_token_score(patterns: torch.Tensor) -> torch.Tensor:
    """Mean attention of position i on i − 1 over i ≥ 1 and examples: [layers, h]."""
    diag = torch.diagonal(patterns, offset=-1, dim1=-2, dim2=-1)  # [L, b, h, l-1]
    return diag.mean(dim=(1, 3))


def position_score(patterns: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Mean attention of position ``query[b]`` on position ``key[b]``: [layers, h]."""
    rows = torch.arange(patterns.shape[1])
    per_example = patterns.permute(1, 3, 4, 0, 2)[rows, query.cpu(), key.cpu()]  # [b, L, h]
    return per_example.mean(dim=0)


def induction_score(patterns: torch.Tensor, query_pos: torch.Tensor, value_pos: torch.Tensor) -> torch.Tensor:
    """Attention of the query (the repeated trigger) on the answer position p + 1: [layers, h]."""
    return position_score(patterns, query_pos, value_pos)


def duplicate_shift_score(patterns: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Olsson et al.'s induction pattern without ground truth: P[i, j] = 1 if token j − 1 equals token i and
    j − 1 < i; score = Σ A ⊙ P / Σ A over query rows that have such a j: [layers, h]."""
    t = tokens.cpu()
    same = t[:, :, None] == t[:, None, :]  # [b, i, j'] token i equals token j'
    pattern = torch.zeros_like(same)
    pattern[:, :, 1:] = same[:, :, :-1]  # P[i, j] = [token j − 1 == token i]
    pattern &= torch.tril(torch.ones(t.shape[1], t.shape[1], dtype=torch.bool))[None]  # j <= i (so j − 1 < i)
    rows = pattern.any(-1)  # [b, i]
    mass = (patterns * pattern[None, :, None]).sum(-1)  # [L, b, h, i]
    total = patterns.sum(-1)
    sel = rows[None, :, None].expand_as(mass)
    return (mass * sel).sum(dim=(1, 3)) / (total * sel).sum(dim=(1, 3)).clamp(min=1e-12)


# ---- patching ---------------------------------------------------------------------------------------------------
def _module(baseline: nn.Module, comp: Component) -> tuple[nn.Module, bool]:
    """The module whose activation ``comp`` names, and whether it is read at its input (forward pre-hook)."""
    block = baseline.hf_model.transformer.h[comp[1]]
    kind = comp[0]
    if kind == "head":
        return block.attn.c_proj, True
    if kind == "attn":
        return block.attn, False
    if kind == "mlp":
        return block.mlp, False
    if kind == "block":
        return block, False
    raise ValueError(f"component {comp!r} is unknown; use ('head', layer, h), ('attn'|'mlp'|'block', layer)")


def _first(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _replace_first(x: Any, new: torch.Tensor) -> Any:
    return (new, *x[1:]) if isinstance(x, tuple) else new


def _splice(baseline: nn.Module, comp: Component, act: torch.Tensor, clean: torch.Tensor,
            positions: torch.Tensor | None) -> torch.Tensor:
    """``act`` with the component's part replaced by ``clean`` (all positions, or position[b] per example)."""
    out = act.clone()
    cols = slice(None)
    if comp[0] == "head":
        hd = baseline.config.n_embd // baseline.config.n_head
        cols = slice(comp[2] * hd, (comp[2] + 1) * hd)
    if positions is None:
        out[:, :, cols] = clean[:, :, cols]
    else:
        rows = torch.arange(act.shape[0], device=act.device)
        out[rows, positions, cols] = clean[rows, positions, cols]
    return out


@torch.no_grad()
def _record(baseline: nn.Module, tokens: torch.Tensor, comps: Sequence[Component]) -> dict[Component, torch.Tensor]:
    store: dict[Component, torch.Tensor] = {}
    handles = []
    for comp in comps:
        module, pre = _module(baseline, comp)
        if pre:
            handles.append(module.register_forward_pre_hook(lambda m, a, c=comp: store.__setitem__(c, a[0].clone())))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, o, c=comp: store.__setitem__(c, _first(o).clone())))
    try:
        baseline(tokens)
    finally:
        for h in handles:
            h.remove()
    return store


@torch.no_grad()
def patch_components(baseline: nn.Module, clean_tokens: torch.Tensor, corrupt_tokens: torch.Tensor, metric: Metric,
                     components: Sequence[Component], positions: torch.Tensor | None = None,
                     batch_size: int = 64) -> dict[str, Any]:
    """Denoising patches: per-example ``metric(logits, index)`` (``index`` the slice of the examples in this forward
    pass, so the metric can look up their answers) on the clean run, the corrupted run, and the corrupted run with each
    component's clean activation spliced in (at every position, or at ``positions[b]``). Returns ``{"clean": [b],
    "corrupt": [b], "patched": {component: [b]}}`` (float64 numpy)."""
    if clean_tokens.shape != corrupt_tokens.shape:
        raise ValueError("clean and corrupted tokens must have the same shape (paired sequences)")
    dev = next(baseline.parameters()).device
    clean_m, corrupt_m, patched = [], [], {c: [] for c in components}
    for start in range(0, clean_tokens.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        clean, corrupt = clean_tokens[sl].to(dev), corrupt_tokens[sl].to(dev)
        pos = None if positions is None else positions[sl].to(dev)
        store = _record(baseline, clean, components)
        clean_m.append(metric(baseline(clean), sl))
        corrupt_m.append(metric(baseline(corrupt), sl))
        for comp in components:
            module, pre = _module(baseline, comp)
            if pre:
                handle = module.register_forward_pre_hook(
                    lambda m, a, c=comp: (_splice(baseline, c, a[0], store[c], pos), *a[1:]))
            else:
                handle = module.register_forward_hook(
                    lambda m, a, o, c=comp: _replace_first(o, _splice(baseline, c, _first(o), store[c], pos)))
            try:
                patched[comp].append(metric(baseline(corrupt), sl))
            finally:
                handle.remove()
    cat = lambda xs: torch.cat(xs).double().cpu().numpy()  # noqa: E731
    return {"clean": cat(clean_m), "corrupt": cat(corrupt_m), "patched": {c: cat(v) for c, v in patched.items()}}


def restored_fraction(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray, n_resamples: int = 1000,
                      seed: int = 0) -> Estimate:
    """(mean patched − mean corrupt) / (mean clean − mean corrupt) with a bootstrap CI resampling examples
    (the three arrays are paired)."""
    p, c, k = (np.asarray(a, dtype=np.float64) for a in (patched, clean, corrupt))

    def ratio(idx: np.ndarray) -> float:
        gap = c[idx].mean() - k[idx].mean()
        return float((p[idx].mean() - k[idx].mean()) / gap) if gap != 0 else float("nan")

    return bootstrap_indices(ratio, len(p), n_resamples=n_resamples, seed=seed)


def component_label(comp: Component) -> str:
    """``"L.H"`` for a head, ``"attnL"``, ``"mlpL"``, ``"blockL"`` otherwise."""
    return f"{comp[1]}.{comp[2]}" if comp[0] == "head" else f"{comp[0]}{comp[1]}"
