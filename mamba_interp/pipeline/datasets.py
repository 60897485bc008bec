"""Datasets of a run (step 1): the task batches of a zoo/task model, or prompt sets for a language model.

A dataset is a ``mamba_interp.tasks.base.TaskBatch`` (tokens [b, l], targets [b, l] with -100 where unscored,
``eval_mask``, optional left-padding ``attention_mask``, ground-truth ``metadata``). :func:`build_datasets`
returns them by name with the one later steps analyse by default (``primary``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

    @property
    def batch(self) -> TaskBatch:
        return self.sets[self.primary]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "primary": self.primary, "sets": self.sets, "task": self.task,
                "heldout": self.heldout, "batch": self.batch, "datasets": self, "notes": self.notes}


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


def build_datasets(source: Any, samples: int, seq_len: int | None, seed: int) -> Datasets:
    """Task batches for a task model; else repeated random tokens plus (with a tokenizer) text prompt sets."""
    from mamba_interp.tasks import get_task

    if source.task is not None:
        task = get_task(source.task, **source.task_params)
        n = samples
        if getattr(task, "finite", False):  # a fixed test split: at most all of it
            n = min(samples, len(task.sample(None, seed=seed, split="test")))
        batch = task.sample(n, seed=seed, seq_len=seq_len, split="test")
        heldout = task.sample(n, seed=seed + 1, seq_len=seq_len, split="test")
        return Datasets("task", source.task, {source.task: batch}, task=task, heldout=heldout)
    length = seq_len or DEFAULT_LM_LEN
    tok = source.tokenizer()
    notes: list[str] = []
    if tok is None:
        batch = repeated_tokens(source.model.cfg.vocab_size, samples, length, seed)
        heldout = repeated_tokens(source.model.cfg.vocab_size, samples, length, seed + 1)
        notes.append(f"text prompt sets skipped: {source.tokenizer_error}")
        return Datasets("lm", "repeated_tokens", {"repeated_tokens": batch}, heldout=heldout, notes=notes)
    task = get_task("text_induction", tokenizer=tok, half_len=max(2, length // 2))
    sets = {"text_induction": task.sample(samples, seed=seed)}
    heldout = task.sample(samples, seed=seed + 1)
    for name in TEXT_SETS:
        try:
            sets[name] = get_task(name, tokenizer=tok).sample(samples, seed=seed)
        except (ValueError, KeyError) as exc:
            notes.append(f"{name} skipped: {str(exc).splitlines()[0]}")
    vocab = source.model.cfg.vocab_size
    for name in list(sets):
        if int(sets[name].tokens.max()) >= vocab:
            notes.append(f"{name} skipped: the tokenizer produces ids beyond the model's vocabulary ({vocab})")
            del sets[name]
    if "text_induction" not in sets:
        raise ValueError(f"the tokenizer's ids exceed the model's vocabulary ({vocab}); use the model's own tokenizer")
    return Datasets("lm", "text_induction", sets, task=task, heldout=heldout, notes=notes)


@torch.no_grad()
def evaluate(model: Any, batch: TaskBatch, batch_size: int, progress: Any = None) -> dict[str, Any]:
    """Accuracy over ``eval_mask``, mean cross-entropy over scored targets, and per example the mean
    probability of the correct token, whether every scored position is right, the mean cross-entropy over its
    targets (``example_loss``, NaN without one) and the fraction of its scored positions that are right
    (``example_accuracy``, NaN without one). Runs under any hooks attached with ``model.hooks(...)``."""
    device = next(model.parameters()).device
    b = len(batch)
    correct_pos = total_pos = 0
    loss_sum, loss_n = 0.0, 0
    p_correct = torch.zeros(b, dtype=torch.float64)
    all_right = torch.zeros(b, dtype=torch.bool)
    example_loss = torch.full((b,), float("nan"), dtype=torch.float64)
    example_acc = torch.full((b,), float("nan"), dtype=torch.float64)
    starts = range(0, b, batch_size)
    for s in (progress(starts) if progress is not None else starts):
        sl = slice(s, s + batch_size)
        ids = batch.tokens[sl].to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask[sl].to(device)
        logits = model(ids, attention_mask=mask).float()  # (b, l, v)
        targets = batch.targets[sl].to(device)
        emask = batch.eval_mask[sl].to(device)
        scored = targets != IGNORE
        logp = torch.log_softmax(logits, -1)
        tgt = targets.clamp(min=0)
        lp = logp.gather(-1, tgt[..., None])[..., 0]  # (b, l)
        loss_sum += float(-(lp * scored).sum())
        loss_n += int(scored.sum())
        hit = (logits.argmax(-1) == targets) & emask
        correct_pos += int(hit.sum())
        total_pos += int(emask.sum())
        p = (lp.exp() * emask).sum(-1) / emask.sum(-1).clamp(min=1)
        p_correct[sl] = p.double().cpu()
        all_right[sl] = (hit | ~emask).all(-1).cpu()
        n_t, n_e = scored.sum(-1), emask.sum(-1)
        example_loss[sl] = torch.where(n_t > 0, -(lp * scored).sum(-1) / n_t.clamp(min=1), torch.nan).double().cpu()
        example_acc[sl] = torch.where(n_e > 0, hit.sum(-1) / n_e.clamp(min=1), torch.nan).double().cpu()
    return {
        "accuracy": correct_pos / max(total_pos, 1),
        "loss": loss_sum / max(loss_n, 1),
        "scored_positions": total_pos,
        "p_correct": p_correct,
        "example_correct": all_right,
        "example_loss": example_loss,
        "example_accuracy": example_acc,
    }


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
