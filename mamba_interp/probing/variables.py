"""The probed tokens of each ground-truth variable of a batch (``pipeline/task_variables.py``).

A variable's rows are the valid tokens where it is defined (categorical variables keep their ``max_classes`` most
frequent classes), subsampled to ``max_tokens``: for classification at most ``max_tokens / K`` tokens per class, so
rare classes keep all of theirs (the probes use balanced class weights and balanced accuracy, so this resampling
does not move the chance level). Each row also carries its sequence (the probes' group), its current token (the
control task's type) and its control label.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mamba_interp.probing.probes import control_labels
from mamba_interp.probing.scores import CLASSIFICATION


@dataclass
class VariableData:
    """The probed tokens of one variable: ``rows`` index the valid tokens of the batch (row-major, as
    ``ActivationSet.tokens``); ``y`` their labels (int class ids or float values), ``groups`` their sequence,
    ``types`` their current token (the control task's type), ``control`` their control-task labels (drawn per type
    from the distribution of ``y`` over *all* the tokens where it is defined, before subsampling, as Hewitt & Liang
    draw them from the task's empirical label distribution); ``positions`` [b, l] every token where the variable is
    defined and probed, where the amnesic test erases it."""

    name: str
    task: str
    rows: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    types: np.ndarray
    control: np.ndarray
    positions: torch.Tensor
    classes: list = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, "tokens": int(self.rows.size), "defined_tokens": int(self.positions.sum()),
                "sequences": int(np.unique(self.groups).size), "classes": [int(c) for c in self.classes]}


def _subsample(y: np.ndarray, task: str, max_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions into ``y``: all if ≤ max_tokens; else per class at most ceil(max_tokens / K)
    (classification) or a uniform sample (regression)."""
    if y.size <= max_tokens:
        return np.arange(y.size)
    if task != CLASSIFICATION:
        return np.sort(rng.choice(y.size, max_tokens, replace=False))
    classes = np.unique(y)
    cap = -(-max_tokens // classes.size)
    keep = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        keep.append(idx if idx.size <= cap else rng.choice(idx, cap, replace=False))
    return np.sort(np.concatenate(keep))


def prepare_variables(batch: Any, mask: torch.Tensor | None = None, names: Sequence[str] | None = None,
                      max_tokens: int = 2000, max_classes: int = 16, min_count: int = 5, seed: int = 0
                      ) -> dict[str, VariableData]:
    """The probed rows of every variable of ``batch`` (or of ``names``) that has at least two classes (or values)
    with ``min_count`` tokens in two sequences or more."""
    from mamba_interp.pipeline.task_variables import task_variables, variable_labels

    if mask is None:
        mask = (torch.ones(batch.tokens.shape, dtype=torch.bool) if batch.attention_mask is None
                else batch.attention_mask.bool())
    tv = task_variables(batch, mask)
    wanted = list(tv.names) if names is None else list(names)
    unknown = [n for n in wanted if n not in tv.names]
    if unknown:
        raise ValueError(f"variable {unknown[0]!r} is not defined for this batch; it has {', '.join(tv.names)}")
    coords = mask.nonzero()  # (N, 2): sequence, position
    tokens = batch.tokens[mask].numpy()
    out: dict[str, VariableData] = {}
    for name in wanted:
        labels, task = variable_labels(tv, name, mask, max_classes, min_count)
        defined = np.flatnonzero(np.isfinite(labels.numpy()))
        y = labels.numpy()[defined]
        if task == CLASSIFICATION:
            classes, counts = np.unique(y, return_counts=True)
            if (counts >= min_count).sum() < 2:
                continue
            y = y.astype(np.int64)
        else:
            classes = np.array([])
            if np.unique(y).size < 2:
                continue
        if np.unique(coords[defined, 0].numpy()).size < 2:
            continue
        key = zlib.crc32(name.encode())  # a variable's tokens do not depend on which others are probed
        pick = _subsample(y, task, max_tokens, np.random.default_rng([seed, key]))
        rows = defined[pick]
        ctrl = control_labels(y, tokens[defined], (seed + key) % 2**32)[pick]
        positions = torch.zeros(mask.shape, dtype=torch.bool)
        positions[coords[defined, 0], coords[defined, 1]] = True
        out[name] = VariableData(name, task, rows, y[pick], coords[rows, 0].numpy(), tokens[rows], ctrl, positions,
                                 [c.item() for c in classes])
    return out

