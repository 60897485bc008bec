"""Per-layer measures of an associative lookup ("where does the model fetch the answer from?") on a TaskBatch.

A *lookup* is the ground truth of a recall task: the position that predicts the answer (``query``), the earlier
position holding the answer (``source``; induction's p+1) and the cue in front of it (``trigger``; induction's p).
:func:`lookup_positions` reads it from the metadata each task documents:

| task | query | source | trigger |
|---|---|---|---|
| induction | ``query_pos`` (L−1) | ``value_pos`` (p+1) | ``trigger_pos`` (p) |
| mqar | ``query_pos`` | ``value_pos`` | ``key_pos`` |
| repeated_tokens, text_induction | ``answer_pos`` | ``source_pos`` | ``source_pos`` − 1 |
| ioi | ``answer_pos`` | ``io_pos`` | — |
| any other scored task | its last scored position | — | — |

The measures, each callable with a model and a batch (no pipeline needed, so circuit and universality studies
can run them on other models):

* :func:`induction_score` — the fraction of queries whose hidden-attention row (mean |α| over channels/heads, the
  query itself excluded) peaks at the source (the hidden-attention analogue of an induction-head score; Olsson
  et al. 2022, with Ali et al. 2024's hidden attention);
* :func:`knockout_accuracy_drop` — accuracy lost when the flow source → query is knocked out in one layer's SSM
  (Endy et al. 2025's knockout), paired with a random-source knockout of the same size as the control
  (exact McNemar test between the two);
* :func:`top_source_hit` — the fraction of sequences whose most influential source (gradient norm of the answer's
  log-prob w.r.t. the embedding), the query itself excluded, is the trigger or the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mamba_interp.stats import estimate, paired_diff_ci
from mamba_interp.tasks.base import IGNORE
from mamba_interp.temporal_causality.hidden_attention import attention_weights, knockout, ssm_inputs
from mamba_interp.temporal_causality.jacobian import answer_logprob, temporal_jacobian


@dataclass
class Lookup:
    """Ground-truth positions of a batch's recall queries, each [b, k] long (column i = the i-th query)."""

    query: Tensor
    answer: Tensor
    source: Tensor | None = None
    trigger: Tensor | None = None

    def column(self, j: int) -> Lookup:
        """The j-th query of every sequence (``-1``: the last), as [b, 1] tensors."""
        pick = lambda t: None if t is None else t[:, j:j + 1 if j != -1 else None]  # noqa: E731
        return Lookup(pick(self.query), pick(self.answer), pick(self.source), pick(self.trigger))

    def select(self, rows: slice) -> Lookup:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Lookup(pick(self.query), pick(self.answer), pick(self.source), pick(self.trigger))


def _cols(t: Any, b: int) -> Tensor:
    return torch.as_tensor(t).long().reshape(b, -1)


def lookup_positions(batch: Any) -> Lookup | None:
    """The batch's :class:`Lookup` (module docstring), or None when no position is scored."""
    b, meta, task = len(batch), batch.metadata, batch.task
    if task == "induction":
        return Lookup(_cols(meta["query_pos"], b), _cols(meta["answer"], b), _cols(meta["value_pos"], b),
                      _cols(meta["trigger_pos"], b))
    if task == "mqar":
        return Lookup(_cols(meta["query_pos"], b), _cols(meta["answer"], b), _cols(meta["value_pos"], b),
                      _cols(meta["key_pos"], b))
    if task in ("repeated_tokens", "text_induction") and "source_pos" in meta:
        src = _cols(meta["source_pos"], b)
        return Lookup(_cols(meta["answer_pos"], b), _cols(meta["answer"], b), src, src - 1)
    if task == "ioi":
        return Lookup(_cols(meta["answer_pos"], b), _cols(meta["answer"], b), _cols(meta["io_pos"], b))
    scored = batch.eval_mask & (batch.targets != IGNORE)
    if not bool(scored.any(-1).all()):
        return None
    last = (scored * torch.arange(batch.seq_len)).argmax(-1, keepdim=True)  # (b, 1) last scored position
    return Lookup(last, batch.targets.gather(1, last))


def _need_source(lookup: Lookup | None, what: str) -> Lookup:
    if lookup is None or lookup.source is None:
        raise ValueError(f"{what} needs a recall task with a known source position (induction, mqar, repeated "
                         "tokens, ioi); pass lookup= for other batches")
    return lookup


@dataclass
class LookupAttention:
    """Hidden attention of one layer at the queries. rows: mean |α| over units, [b, k, l]; at_source: |α| of
    each unit from the source to the query, [b, units, k]."""

    rows: Tensor
    at_source: Tensor


def lookup_attention(model: Any, batch: Any, layer: int, lookup: Lookup | None = None, batch_size: int = 64
                     ) -> LookupAttention:
    """Hidden-attention rows of ``layer`` at every query of ``batch`` (only those rows are computed)."""
    lk = _need_source(lookup if lookup is not None else lookup_positions(batch), "lookup_attention")
    device = next(model.parameters()).device
    rows, at_source = [], []
    for start in range(0, len(batch), batch_size):
        sl = slice(start, start + batch_size)
        ids = batch.tokens[sl].to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask[sl].to(device)
        inp = ssm_inputs(model, ids, [layer], mask)[layer]
        w = attention_weights(inp, lk.query[sl].to(device)).abs()  # (b', units, k, l)
        rows.append(w.mean(1).cpu())
        src = lk.source[sl].to(device)[:, None, :, None].expand(-1, w.shape[1], -1, 1)
        at_source.append(w.gather(-1, src)[..., 0].cpu())
    return LookupAttention(torch.cat(rows), torch.cat(at_source))


def induction_score(model: Any, batch: Any, layer: int, lookup: Lookup | None = None, batch_size: int = 64,
                    attention: LookupAttention | None = None) -> tuple[float, Tensor]:
    """(fraction of queries whose hidden-attention row peaks at the source, per-sequence fraction [b]).

    The row is mean |α| over channels (Mamba-1) or heads (Mamba-2) at the query, with the query's own column
    excluded (it carries the current token, not a lookup). ``attention`` reuses a :func:`lookup_attention`.
    """
    lk = _need_source(lookup if lookup is not None else lookup_positions(batch), "induction_score")
    att = attention if attention is not None else lookup_attention(model, batch, layer, lk, batch_size)
    rows = att.rows.clone()  # (b, k, l)
    s = torch.arange(rows.shape[-1])
    rows[s >= lk.query[..., None]] = -torch.inf  # the query itself (and the future) excluded
    hit = (rows.argmax(-1) == lk.source).double()  # (b, k)
    per_seq = hit.mean(-1)
    return float(per_seq.mean()), per_seq


def top_units(attention: LookupAttention, top: int | None = None) -> list[int]:
    """Channel / head indices ranked by their mean |α| from the source to the query (the largest first)."""
    order = torch.argsort(attention.at_source.mean(dim=(0, 2)), descending=True)
    return [int(i) for i in order[:top]]


def _correct(logits: Tensor, lk: Lookup) -> Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return (logits[rows, lk.query[:, 0]].argmax(-1) == lk.answer[:, 0]).cpu()


def random_sources(lookup: Lookup, seed: int) -> Tensor:
    """One random position per sequence before its query, avoiding the source and trigger: [b, 1] (the
    same-size control of a source knockout)."""
    g = torch.Generator().manual_seed(int(seed))
    q = lookup.query[:, 0]
    avoid = [lookup.source[:, 0]] + ([lookup.trigger[:, 0]] if lookup.trigger is not None else [])
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        banned = {int(a[i]) for a in avoid}
        # too short to avoid both: avoid the source only (the query itself is never knocked out)
        choices = ([s for s in range(int(q[i])) if s not in banned]
                   or [s for s in range(int(q[i])) if s != int(avoid[0][i])] or [0])
        out[i] = choices[int(torch.randint(len(choices), (1,), generator=g))]
    return out[:, None]


def mcnemar_greater(better: np.ndarray, worse: np.ndarray) -> float:
    """Exact McNemar test (a binomial test on the discordant pairs, ``scipy.stats.binomtest``) that paired
    0/1 outcomes ``better`` are correct more often than ``worse``."""
    from scipy.stats import binomtest

    b, w = np.asarray(better, dtype=bool), np.asarray(worse, dtype=bool)
    up, down = int((b & ~w).sum()), int((~b & w).sum())
    return 1.0 if up + down == 0 else float(binomtest(up, up + down, 0.5, alternative="greater").pvalue)


def proportion_ci(hits: Any, confidence: float = 0.95) -> list[float]:
    """Exact (Clopper–Pearson) CI of a hit rate (``scipy.stats.binomtest``): unlike a bootstrap it does not
    collapse to a point when every sequence is a hit."""
    from scipy.stats import binomtest

    h = np.asarray(hits, dtype=bool).reshape(-1)
    ci = binomtest(int(h.sum()), max(int(h.size), 1)).proportion_ci(confidence, method="exact")
    return [float(ci.low), float(ci.high)]


@torch.no_grad()
def answer_correct(model: Any, batch: Any, lookup: Lookup | None = None, batch_size: int = 64) -> Tensor:
    """[b] bool: the model's argmax at the first query of each sequence is the answer."""
    lk = lookup if lookup is not None else lookup_positions(batch)
    if lk is None:
        raise ValueError("answer_correct needs a batch with a scored position (targets or a lookup)")
    lk = lk.column(0)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(batch), batch_size):
        sl = slice(start, start + batch_size)
        mask = None if batch.attention_mask is None else batch.attention_mask[sl].to(device)
        out.append(_correct(model(batch.tokens[sl].to(device), attention_mask=mask), _on(lk.select(sl), device)))
    return torch.cat(out)


def _on(lk: Lookup, device: Any) -> Lookup:
    return Lookup(*(None if t is None else t.to(device) for t in (lk.query, lk.answer, lk.source, lk.trigger)))


@torch.no_grad()
def knockout_accuracy_drop(model: Any, batch: Any, layer: int, lookup: Lookup | None = None, batch_size: int = 64,
                           seed: int = 0, clean: Tensor | None = None) -> dict[str, Any]:
    """Accuracy at the query with the flow source → query knocked out in ``layer``'s SSM, against the clean
    model and a control knocking out one random earlier position instead (same size).

    Uses the first query of each sequence; ``clean`` ([b] bool, :func:`answer_correct`) reuses the clean
    forward across layers. Returns JSON-able ``Estimate`` dicts: ``clean``, ``knocked``, ``control``
    accuracies; ``drop`` = clean − knocked and ``control_drop`` (paired bootstrap CIs over sequences);
    ``p_vs_control``: exact McNemar p-value that the knockout hurts more than the control.
    """
    lk = _need_source(lookup if lookup is not None else lookup_positions(batch), "knockout_accuracy_drop").column(0)
    if clean is None:
        clean = answer_correct(model, batch, lk, batch_size)
    control_src = random_sources(lk, seed)
    device = next(model.parameters()).device
    knocked, control = [], []
    for start in range(0, len(batch), batch_size):
        sl = slice(start, start + batch_size)
        part = _on(lk.select(sl), device)
        ids = batch.tokens[sl].to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask[sl].to(device)
        knocked.append(_correct(knockout(model, ids, layer, part.source[:, 0], part.query[:, 0], mask), part))
        control.append(_correct(knockout(model, ids, layer, control_src[sl, 0].to(device), part.query[:, 0], mask),
                                part))
    c, k, r = (x.double().numpy() for x in (clean.cpu(), torch.cat(knocked), torch.cat(control)))
    return {
        "clean": estimate(c, seed=seed).to_dict(),
        "knocked": estimate(k, seed=seed).to_dict(),
        "control": estimate(r, seed=seed).to_dict(),
        "drop": paired_diff_ci(c, k, seed=seed).to_dict(),
        "control_drop": paired_diff_ci(c, r, seed=seed).to_dict(),
        "p_vs_control": mcnemar_greater(r, k),
    }


def influence_on_answer(model: Any, batch: Any, sources: Any = ("hook_embed",), lookup: Lookup | None = None,
                        batch_size: int = 64) -> dict[Any, Tensor]:
    """‖∂ log p(answer) / ∂ source_s‖ at the last query of each sequence, for every source position s:
    name -> [b, l] (one backward per batch of sequences for all sources together)."""
    lk = lookup if lookup is not None else lookup_positions(batch)
    if lk is None:
        raise ValueError("influence_on_answer needs a batch with a scored position (targets or a lookup)")
    lk = lk.column(-1)
    device = next(model.parameters()).device
    parts: dict[Any, list[Tensor]] = {}
    for start in range(0, len(batch), batch_size):
        sl = slice(start, start + batch_size)
        ids = batch.tokens[sl].to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask[sl].to(device)
        got = temporal_jacobian(model, ids, lk.query[sl, 0].to(device), source=list(sources),
                                score=answer_logprob(lk.answer[sl, 0].to(device)), attention_mask=mask)
        for name, v in got.items():
            parts.setdefault(name, []).append(v[:, 0].cpu())  # (b', l)
    return {name: torch.cat(v) for name, v in parts.items()}


def top_source_hit(model: Any, batch: Any, lookup: Lookup | None = None, batch_size: int = 64,
                   influence: Tensor | None = None) -> tuple[float, Tensor]:
    """(fraction of sequences whose most influential source before the (last) query is its trigger or source,
    per-sequence hits [b] bool). ``influence`` [b, l] reuses :func:`influence_on_answer`'s embedding result.

    To measure at another length, sample the batch there (``task.sample(n, seed, seq_len=4 * L)``)."""
    lk = _need_source(lookup if lookup is not None else lookup_positions(batch), "top_source_hit").column(-1)
    infl = influence if influence is not None else influence_on_answer(model, batch, lookup=lk,
                                                                        batch_size=batch_size)["hook_embed"]
    x = infl.clone().double()
    s = torch.arange(x.shape[-1])
    x[s[None, :] >= lk.query] = -torch.inf
    top = x.argmax(-1, keepdim=True)  # (b, 1)
    hit = top == lk.source
    if lk.trigger is not None:
        hit |= top == lk.trigger
    hit = hit[:, 0]
    return float(hit.double().mean()), hit


def position_classes(lookup: Lookup, seq_len: int) -> dict[str, Tensor]:
    """[b, l] bool masks of the source position classes of the (last) query: ``trigger``, ``source``, ``query``
    (the position itself), ``recent`` (the 3 positions before the query that the short conv also reaches, minus
    the above), ``other`` (everything else before the query)."""
    lk = lookup.column(-1)
    b = lk.query.shape[0]
    s = torch.arange(seq_len).expand(b, seq_len)
    q = lk.query
    out: dict[str, Tensor] = {}
    taken = torch.zeros(b, seq_len, dtype=torch.bool)
    for name, pos in (("query", q), ("source", lk.source), ("trigger", lk.trigger)):
        if pos is None:
            continue
        m = (s == pos) & ~taken
        out[name] = m
        taken |= m
    out["recent"] = (s < q) & (s >= q - 3) & ~taken
    out["other"] = (s < q) & ~taken & ~out["recent"]
    return out


def class_shares(influence: Tensor, classes: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Per sequence, the share of the total influence (sum over positions ≤ query) in each class: name -> [b]."""
    x = influence.double().abs()
    total = sum((x * m).sum(-1) for m in classes.values()).clamp_min(torch.finfo(torch.float64).tiny)
    return {name: ((x * m).sum(-1) / total).numpy() for name, m in classes.items()}
