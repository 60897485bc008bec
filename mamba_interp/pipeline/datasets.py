"""Datasets of a run (step 1): the task batches of a zoo/task model, or prompt sets for a language model.

A dataset is a ``mamba_interp.tasks.base.TaskBatch`` (tokens [b, l], targets [b, l] with -100 where unscored,
``eval_mask``, optional left-padding ``attention_mask``, ground-truth ``metadata``). :func:`build_datasets`
returns them by name with the one later steps analyse by default (``primary``); :func:`evaluate` scores a model
on one, and :func:`score_set` / :func:`chance_warning` say whether it is above chance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamba_interp.stats import Estimate, estimate
from mamba_interp.tasks.base import IGNORE, TaskBatch
from mamba_interp.tasks.text import repeated_block_batch

DEFAULT_LM_LEN = 64
TEXT_SETS = ("ioi", "factual_recall")


@dataclass
class Datasets:
    """What step 1 hands to later steps (``ctx.data(1)``)."""

    kind: str  # "task" (a synthetic task with ground truth) or "lm" (prompt sets for a language model)
    primary: str  # the dataset step 2 and later steps analyse by default
    sets: dict[str, TaskBatch]
    task: Any = None  # the Task object (kind == "task", or the text_induction task of an LM with a tokenizer)
    heldout: TaskBatch | None = None  # fresh sequences of the primary task (probe/SAE test splits)
    notes: list[str] = field(default_factory=list)  # prompt sets that could not be built, and why
    tasks: dict[str, Any] = field(default_factory=dict)  # the Task object of each set (None: repeated tokens)

    @property
    def batch(self) -> TaskBatch:
        return self.sets[self.primary]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "primary": self.primary, "sets": self.sets, "task": self.task,
                "heldout": self.heldout, "batch": self.batch, "datasets": self, "notes": self.notes}


MIN_BUDGET_SEQUENCES = 16
"""A token budget (``budget_sequences``) never leaves fewer sequences than this: the CIs are bootstrapped over
sequences."""


def budget_sequences(max_sequences: int, max_tokens: int | None, seq_len: int, available: int) -> int:
    """How many of ``available`` sequences of ``seq_len`` tokens a pass takes that reads at most ``max_sequences``
    sequences and at most ``max_tokens`` tokens (None: no token cap), the token cap never going below
    ``MIN_BUDGET_SEQUENCES`` sequences. Short task sequences are capped by the count, long corpus windows by the
    tokens (at 256 tokens, 4096 tokens are 16 sequences), so a pass costs about the same whatever the length."""
    n = max_sequences
    if max_tokens is not None:
        n = min(n, max(MIN_BUDGET_SEQUENCES, max_tokens // max(seq_len, 1)))
    return max(1, min(n, available))


def repeated_tokens(vocab_size: int, n: int, seq_len: int, seed: int, low: int = 1) -> TaskBatch:
    """Random tokens ``r`` then ``r`` again (the repeated-sequence induction test of Olsson et al. 2022), for
    models without a tokenizer. Same targets and metadata as the ``text_induction`` task: in the second copy
    each next token is predictable only by copying from the first."""
    half = seq_len // 2
    if half < 2:
        raise ValueError(f"repeated_tokens needs seq_len >= 4, got {seq_len}")
    rng = np.random.default_rng([int(seed), 11])
    block = rng.integers(low, vocab_size, size=(n, half))  # (b, half)
    return repeated_block_batch(block, [], task="repeated_tokens")


def build_datasets(source: Any, samples: int, seq_len: int | None, seed: int, corpus: str | None = None,
                   tokens: int | None = None) -> Datasets:
    """Task batches for a task model; else repeated random tokens plus (with a tokenizer) text prompt sets; with a
    ``corpus``, its context windows (``pipeline/corpus.py``: ``tokens // seq_len`` windows, else ``samples``) are
    the primary dataset instead of the synthetic ones."""
    from mamba_interp.tasks import get_task

    if corpus is not None:
        return _corpus_datasets(source, corpus, samples, seq_len or DEFAULT_LM_LEN, tokens, seed)

    if source.task is not None:
        task = get_task(source.task, **source.task_params)
        n = samples
        if getattr(task, "finite", False):  # a fixed test split: at most all of it
            n = min(samples, len(task.sample(None, seed=seed, split="test")))
        batch = task.sample(n, seed=seed, seq_len=seq_len, split="test")
        heldout = task.sample(n, seed=seed + 1, seq_len=seq_len, split="test")
        return Datasets("task", source.task, {source.task: batch}, task=task, heldout=heldout,
                        tasks={source.task: task})
    length = seq_len or DEFAULT_LM_LEN
    tok = source.tokenizer()
    notes: list[str] = []
    if tok is None:
        batch = repeated_tokens(source.model.cfg.vocab_size, samples, length, seed)
        heldout = repeated_tokens(source.model.cfg.vocab_size, samples, length, seed + 1)
        notes.append(f"text prompt sets skipped: {source.tokenizer_error}")
        return Datasets("lm", "repeated_tokens", {"repeated_tokens": batch}, heldout=heldout, notes=notes,
                        tasks={"repeated_tokens": None})
    task = get_task("text_induction", tokenizer=tok, half_len=max(2, length // 2))
    sets = {"text_induction": task.sample(samples, seed=seed)}
    tasks = {"text_induction": task}
    heldout = task.sample(samples, seed=seed + 1)
    for name in TEXT_SETS:
        try:
            tasks[name] = get_task(name, tokenizer=tok)
            sets[name] = tasks[name].sample(samples, seed=seed)
        except (ValueError, KeyError) as exc:
            tasks.pop(name, None)
            notes.append(f"{name} skipped: {str(exc).splitlines()[0]}")
    vocab = source.model.cfg.vocab_size
    for name in list(sets):
        if int(sets[name].tokens.max()) >= vocab:
            notes.append(f"{name} skipped: the tokenizer produces ids beyond the model's vocabulary ({vocab})")
            del sets[name]
    if "text_induction" not in sets:
        raise ValueError(f"the tokenizer's ids exceed the model's vocabulary ({vocab}); use the model's own tokenizer")
    return Datasets("lm", "text_induction", sets, task=task, heldout=heldout, notes=notes,
                    tasks={k: v for k, v in tasks.items() if k in sets})


Scorer = Callable[[torch.Tensor, TaskBatch], torch.Tensor]
"""``(logits [b, l, v], batch of those b examples) -> [b]``, e.g. ``IOITask.logit_diff``."""


def _corpus_datasets(source: Any, corpus: str, samples: int, seq_len: int, tokens: int | None,
                     seed: int) -> Datasets:
    from mamba_interp.pipeline.corpus import corpus_batch

    tok = source.tokenizer()
    if tok is None:
        raise ValueError(f"--corpus needs the model's tokenizer, which did not load ({source.tokenizer_error})")
    windows = samples if tokens is None else max(1, tokens // seq_len)
    batch, note = corpus_batch(corpus, tok, seq_len, windows)
    vocab = source.model.cfg.vocab_size
    if int(batch.tokens.max()) >= vocab:
        raise ValueError(f"the tokenizer's ids exceed the model's vocabulary ({vocab}); use the model's own tokenizer")
    lm = build_datasets(source, samples, seq_len, seed)  # the prompt sets, scored beside the corpus
    sets = {"corpus": batch, **{n: b for n, b in lm.sets.items() if n in TEXT_SETS}}
    return Datasets("lm", "corpus", sets, heldout=None, notes=[note, *lm.notes],
                    tasks={"corpus": None, **{n: t for n, t in lm.tasks.items() if n in sets}})


@torch.no_grad()
def evaluate(model: Any, batch: TaskBatch, batch_size: int, progress: Any = None,
             scorers: dict[str, Scorer] | None = None, start: tuple[int, torch.Tensor] | None = None
             ) -> dict[str, Any]:
    """Accuracy over ``eval_mask``, mean cross-entropy over scored targets, and per example [b]: the mean
    probability (``p_correct``) and log-probability (``logprob``) of the correct token over the scored positions,
    whether every scored position is right (``example_correct``), the mean cross-entropy over its targets
    (``example_loss``, NaN without one), the fraction of its scored positions that are right
    (``example_accuracy``, NaN without one), the argmax at the last scored position (``prediction``), and each of
    ``scorers`` (under ``scores``). Runs under any hooks attached with ``model.hooks(...)``.

    Full-vocabulary logits are formed only at the scored positions (``pipeline/logits.py``); a scorer reads the
    logits [b, l, v] of its batch, so only sets with scorers (short prompts such as IOI) pay for them.
    ``start=(layer, resid)``: run from block ``layer`` on the cached residual stream entering it [b, l, d] of the
    whole batch (``pipeline/logits.layer_input``), for passes whose hooks are all at that layer or later."""
    from mamba_interp.pipeline.logits import final_normed, score_positions, unembed

    device = next(model.parameters()).device
    b = len(batch)
    correct_pos = total_pos = 0
    loss_sum, loss_n = 0.0, 0
    p_correct = torch.zeros(b, dtype=torch.float64)
    logprob = torch.zeros(b, dtype=torch.float64)
    prediction = torch.zeros(b, dtype=torch.long)
    all_right = torch.zeros(b, dtype=torch.bool)
    example_loss = torch.full((b,), float("nan"), dtype=torch.float64)
    example_acc = torch.full((b,), float("nan"), dtype=torch.float64)
    scores = {name: torch.zeros(b, dtype=torch.float64) for name in scorers or {}}
    starts = range(0, b, batch_size)
    for s in (progress(starts) if progress is not None else starts):
        sl = slice(s, s + batch_size)
        ids = batch.tokens[sl].to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask[sl].to(device)
        targets = batch.targets[sl].to(device)
        emask = batch.eval_mask[sl].to(device)
        scored = targets != IGNORE
        # full-vocabulary logits only at the positions scored (pipeline/logits.py)
        select = scored | emask
        part = None if start is None else (start[0], start[1][sl])
        lp_sel, pred_sel = score_positions(model, ids, targets, select, attention_mask=mask, start=part)
        lp = torch.zeros(targets.shape, device=device).masked_scatter_(select, lp_sel)  # (b, l)
        pred = torch.full(targets.shape, -1, dtype=torch.long, device=device).masked_scatter_(select, pred_sel)
        loss_sum += float(-(lp * scored).sum())
        loss_n += int(scored.sum())
        hit = (pred == targets) & emask
        correct_pos += int(hit.sum())
        total_pos += int(emask.sum())
        n_scored = emask.sum(-1).clamp(min=1)
        p_correct[sl] = ((lp.exp() * emask).sum(-1) / n_scored).double().cpu()
        logprob[sl] = ((lp * emask).sum(-1) / n_scored).double().cpu()
        last = (emask.long() * torch.arange(emask.shape[1], device=device)).argmax(-1)  # last scored position
        prediction[sl] = pred.gather(1, last[:, None])[:, 0].cpu()
        all_right[sl] = (hit | ~emask).all(-1).cpu()
        n_t, n_e = scored.sum(-1), emask.sum(-1)
        example_loss[sl] = torch.where(n_t > 0, -(lp * scored).sum(-1) / n_t.clamp(min=1), torch.nan).double().cpu()
        example_acc[sl] = torch.where(n_e > 0, hit.sum(-1) / n_e.clamp(min=1), torch.nan).double().cpu()
        if scorers:
            logits = unembed(model, final_normed(model, ids, mask, part))  # (b, l, v)
            for name, fn in scorers.items():
                scores[name][sl] = fn(logits, batch.select(sl)).double().cpu()
    return {
        "accuracy": correct_pos / max(total_pos, 1),
        "loss": loss_sum / max(loss_n, 1),
        "scored_positions": total_pos,
        "p_correct": p_correct,
        "logprob": logprob,
        "example_accuracy": example_acc,
        "prediction": prediction,
        "example_correct": all_right,
        "example_loss": example_loss,
        "scores": scores,
    }


# ---- scores against chance --------------------------------------------------------------------------
LOG2 = math.log(2.0)


@dataclass(frozen=True)
class SetScore:
    """The headline score of one dataset, its bootstrap CI over examples, and its chance level.

    * ``accuracy`` (synthetic tasks, induction sets): per-example fraction of scored positions right; chance is the
      task's (a uniform guess), or 1/V for repeated tokens over the model's V tokens.
    * ``logit_diff`` (IOI; Wang et al. 2022 §3): logit(IO) − logit(S) at the last position; chance 0.
    * ``answer_logprob`` (factual recall; Meng et al. 2022): log p(answer); chance log(1/V), a uniform output.

    ``above_chance``: the CI's lower end exceeds chance and the value is at least "twice chance" in log-odds
    (log-odds of the accuracy + log 2; IO at least twice as likely as S; the answer twice as likely as uniform),
    so a random model's small systematic biases do not count as ability.
    """

    name: str
    label: str
    estimate: Estimate
    chance: float
    above_chance: bool

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.name, "label": self.label, **self.estimate.to_dict(), "chance": self.chance,
                "above_chance": self.above_chance}

    def __str__(self) -> str:
        return f"{self.label} {self.estimate} (chance {self.chance:.3g})"


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def score_set(name: str, task: Any, ev: dict[str, Any], vocab_size: int, seed: int = 0) -> SetScore:
    """The :class:`SetScore` of one evaluated set (``ev`` from :func:`evaluate`, with ``scores["logit_diff"]``
    for tasks that define ``logit_diff``)."""
    if "logit_diff" in ev["scores"]:
        kind, label, values, chance = "logit_diff", "logit difference IO − S", ev["scores"]["logit_diff"], 0.0
    elif name == "factual_recall":
        kind, label, values, chance = "answer_logprob", "log p(answer)", ev["logprob"], -math.log(vocab_size)
    else:
        task_chance = getattr(task, "chance", None) if task is not None else None
        kind, label, values = "accuracy", "accuracy", ev["example_accuracy"]
        chance = float(task_chance) if task_chance is not None else 1.0 / vocab_size
    est = estimate(values, seed=seed)
    if kind == "accuracy":
        strong = est.value >= 1.0 or _logit(est.value) >= _logit(chance) + LOG2
    else:
        strong = est.value >= chance + LOG2
    return SetScore(kind, label, est, chance, bool(est.ci_low > chance and strong))


def chance_warning(scores: dict[str, SetScore]) -> str | None:
    """A warning when no dataset is above chance (e.g. a random init), else None."""
    if not scores or any(sc.above_chance for sc in scores.values()):
        return None
    parts = "; ".join(f"{name}: {sc}" for name, sc in scores.items())
    which = "its dataset" if len(scores) == 1 else f"every one of its {len(scores)} datasets"
    return (f"The model is at chance on {which} ({parts}). It behaves like an untrained model, so what later "
            "steps find describes its random weights, not a learned mechanism.")


def batch_tensors(batch: TaskBatch) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a batch into tensors (for safetensors) and JSON-able metadata."""
    tensors = {"tokens": batch.tokens, "targets": batch.targets, "eval_mask": batch.eval_mask.to(torch.uint8)}
    if batch.attention_mask is not None:
        tensors["attention_mask"] = batch.attention_mask
    other: dict[str, Any] = {}
    for k, v in batch.metadata.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            tensors[f"metadata.{k}"] = v
        else:
            other[k] = v
    return tensors, other


def load_batch(path: str | Path, meta: dict[str, Any] | None = None, task: str = "") -> TaskBatch:
    from safetensors.torch import load_file

    t = load_file(str(path))
    metadata = {k[len("metadata."):]: v for k, v in t.items() if k.startswith("metadata.")}
    metadata.update(meta or {})
    return TaskBatch(t["tokens"], t["targets"], metadata, eval_mask=t["eval_mask"].bool(),
                     attention_mask=t.get("attention_mask"), task=task)
