"""Patching metrics: callables ``logits [b, l, v] -> [b]`` (one value per example; higher = more clean-like for
``logit_diff`` and ``logprob``).

Heimersheim & Nanda 2024 (arXiv 2404.15255) recommend a continuous, roughly logit-linear metric: the logit
difference between the correct and an incorrect answer, or the log-probability of the correct one; KL to the clean
distribution is ACDC's default (Conmy et al. 2023). Every metric here is a :class:`Metric`: besides being called
on full logits it can be restricted to a subset of the examples (:meth:`Metric.subset`) and evaluated on the logits
of a suffix of the sequence (``offset``), which is what lets the patching engine recompute only what a patch
changes. A plain function ``logits -> [b]`` works too (it is evaluated on the whole batch at once).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

def _positions(position: int | Tensor, b: int) -> Tensor:
    """[b, k] long positions (negative = from the end) from an int, [b] or [b, k]."""
    pos = torch.as_tensor(position, dtype=torch.long)
    if pos.dim() == 0:
        pos = pos.expand(b)
    if pos.dim() == 1:
        pos = pos[:, None]
    if pos.shape[0] != b:
        raise ValueError(f"metric positions have {pos.shape[0]} rows for a batch of {b}; pass one row per example")
    return pos


def _tokens(tokens: int | Tensor, b: int, k: int) -> Tensor:
    t = torch.as_tensor(tokens, dtype=torch.long)
    if t.dim() == 0:
        t = t.expand(b)
    if t.dim() == 1:
        t = t[:, None]
    return t.expand(b, k) if t.shape[1] == 1 else t


class Metric:
    """A per-example metric of the logits. Subclasses implement :meth:`values`.

    ``position``: the answer position(s): an int (negative = from the end), [b] or [b, k] (k answers per example,
    averaged). ``per_example``: tensors with the batch as their first dimension (answers, wrong tokens, ...).
    """

    name = "metric"

    def __init__(self, position: int | Tensor = -1, **per_example: Any) -> None:
        self.position = position
        self.per_example = per_example

    # ---- what subclasses define -----------------------------------------------------------------
    def values(self, picked: Tensor, **per_example: Tensor) -> Tensor:
        """``picked`` [b, k, v]: logits at the answer positions -> [b]."""
        raise NotImplementedError

    # ---- evaluation ---------------------------------------------------------------------------------
    def __call__(self, logits: Tensor, offset: int = 0) -> Tensor:
        """logits [b, l', v] of positions ``offset..offset+l'-1`` -> [b] float32."""
        b, length = logits.shape[0], logits.shape[1] + offset
        pos = _positions(self.position, b).to(logits.device)
        pos = torch.where(pos < 0, pos + length, pos) - offset
        if bool((pos < 0).any()) or bool((pos >= logits.shape[1]).any()):
            raise ValueError(f"metric position outside the {logits.shape[1]} computed positions (offset {offset})")
        rows = torch.arange(b, device=logits.device)[:, None]
        picked = logits[rows, pos].float()  # (b, k, v)
        extra = {k: torch.as_tensor(v).to(logits.device) for k, v in self.per_example.items()}
        return self.values(picked, **extra)

    def first_position(self, seq_len: int) -> int:
        """The earliest absolute position this metric reads (a suffix from there on is enough)."""
        pos = torch.as_tensor(self.position, dtype=torch.long)
        pos = torch.where(pos < 0, pos + seq_len, pos)
        return int(pos.min())

    def subset(self, index: Tensor) -> Metric:
        """The same metric for the examples ``index`` (a [b'] long tensor)."""
        def pick(v: Any) -> Any:
            t = torch.as_tensor(v)
            return t[index.to(t.device)] if t.dim() else v

        out = copy.copy(self)
        out.position = pick(self.position)
        out.per_example = {k: pick(v) for k, v in self.per_example.items()}
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(position={self.position if isinstance(self.position, int) else '[per example]'})"


class LogitDiff(Metric):
    name = "logit_diff"

    def values(self, picked: Tensor, answer: Tensor, wrong: Tensor) -> Tensor:
        b, k, _ = picked.shape
        a, w = _tokens(answer, b, k), _tokens(wrong, b, k)
        diff = picked.gather(-1, a[..., None])[..., 0] - picked.gather(-1, w[..., None])[..., 0]  # (b, k)
        return diff.mean(-1)


class LogProb(Metric):
    name = "logprob"

    def values(self, picked: Tensor, answer: Tensor) -> Tensor:
        b, k, _ = picked.shape
        logp = torch.log_softmax(picked, -1)
        return logp.gather(-1, _tokens(answer, b, k)[..., None])[..., 0].mean(-1)


class KLToClean(Metric):
    """KL(p_clean ‖ p) at the answer positions (0 for the clean run; *lower* is more clean-like). The normalised
    patching effect is still 0 at the corrupted and 1 at the clean run, since both baselines use the same metric."""

    name = "kl_to_clean"

    def values(self, picked: Tensor, clean_logprobs: Tensor) -> Tensor:
        logp = torch.log_softmax(picked, -1)  # (b, k, v)
        ref = clean_logprobs.to(logp.dtype)
        return (ref.exp() * (ref - logp)).sum(-1).mean(-1)


class Correct(Metric):
    """1 where the argmax at every answer position is the answer (a discrete readout: report it beside a
    continuous metric, not instead of one)."""

    name = "correct"

    def values(self, picked: Tensor, answer: Tensor) -> Tensor:
        b, k, _ = picked.shape
        return (picked.argmax(-1) == _tokens(answer, b, k)).all(-1).float()


class Stacked(Metric):
    """Several metrics of one forward: logits -> [b, m] (column j = ``metrics[j]``)."""

    name = "stacked"

    def __init__(self, *metrics: Metric) -> None:
        if not metrics or not all(isinstance(m, Metric) for m in metrics):
            raise TypeError("Stacked needs Metric objects")
        super().__init__(metrics[0].position)
        self.metrics = metrics

    def __call__(self, logits: Tensor, offset: int = 0) -> Tensor:
        return torch.stack([m(logits, offset) for m in self.metrics], -1)

    def first_position(self, seq_len: int) -> int:
        return min(m.first_position(seq_len) for m in self.metrics)

    def subset(self, index: Tensor) -> Stacked:
        return Stacked(*(m.subset(index) for m in self.metrics))


class CustomMetric(Metric):
    """``fn(picked_logits [b, k, v], **per_example) -> [b]``, with subset/suffix support."""

    def __init__(self, fn: Callable[..., Tensor], position: int | Tensor = -1, name: str = "custom",
                 **per_example: Any) -> None:
        super().__init__(position, **per_example)
        self.fn, self.name = fn, name

    def values(self, picked: Tensor, **per_example: Tensor) -> Tensor:
        return self.fn(picked, **per_example)


def logit_diff(answer: int | Tensor, wrong: int | Tensor, position: int | Tensor = -1) -> LogitDiff:
    """logit[answer] − logit[wrong] at ``position`` ([b] answers and wrong tokens, or [b, k] with [b, k]
    positions, averaged over k)."""
    return LogitDiff(position, answer=answer, wrong=wrong)


def correct(answer: int | Tensor, position: int | Tensor = -1) -> Correct:
    """1.0 where argmax == answer at ``position`` (every one of them, for [b, k] positions), else 0.0."""
    return Correct(position, answer=answer)


def logprob(answer: int | Tensor, position: int | Tensor = -1) -> LogProb:
    """log p(answer) at ``position``."""
    return LogProb(position, answer=answer)


def kl_to_clean(clean_logits: Tensor, position: int | Tensor = -1) -> KLToClean:
    """KL(p_clean ‖ p_patched) at ``position``; ``clean_logits`` [b, l, v] are the clean run's logits."""
    b, length = clean_logits.shape[:2]
    pos = _positions(position, b)
    pos = torch.where(pos < 0, pos + length, pos).to(clean_logits.device)
    rows = torch.arange(b, device=clean_logits.device)[:, None]
    ref = torch.log_softmax(clean_logits[rows, pos].float(), -1).detach()  # (b, k, v)
    return KLToClean(position, clean_logprobs=ref)


def custom_metric(fn: Callable[..., Tensor], position: int | Tensor = -1, name: str = "custom",
                  **per_example: Any) -> CustomMetric:
    """A metric from ``fn(picked_logits [b, k, v], **per_example) -> [b]`` (the logits at ``position``), which the
    engine can restrict to example subsets and sequence suffixes."""
    return CustomMetric(fn, position, name, **per_example)


def as_metric(metric: Any) -> tuple[Callable[..., Tensor], bool]:
    """(callable, supports subsets and suffixes)."""
    if isinstance(metric, Metric):
        return metric, True
    if not callable(metric):
        raise TypeError(f"metric must be a callable logits [b, l, v] -> [b], got {type(metric).__name__}")
    return metric, False


def task_metric(clean: Any, corrupt: Any = None) -> Metric:
    """The default metric of a clean / corrupted ``TaskBatch`` pair: the logit difference between the clean answer
    and the wrong one (metadata ``wrong``, else the corrupted batch's answer when it differs) at ``answer_pos``;
    the log-probability of the answer when no wrong token is defined."""
    meta = clean.metadata
    if "answer" not in meta:
        raise ValueError(f"batch of task {clean.task!r} has no 'answer' metadata; pass metric= explicitly")
    answer = torch.as_tensor(meta["answer"])
    position = torch.as_tensor(meta.get("answer_pos", clean.seq_len - 1))
    wrong = meta.get("wrong")
    if wrong is None and corrupt is not None and "answer" in corrupt.metadata:
        other = torch.as_tensor(corrupt.metadata["answer"])
        if other.shape == answer.shape and bool((other != answer).all()):
            wrong = other
    if wrong is not None and bool((torch.as_tensor(wrong) >= 0).all()):
        return logit_diff(answer, torch.as_tensor(wrong), position)
    return logprob(answer, position)
