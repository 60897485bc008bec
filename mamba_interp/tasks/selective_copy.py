"""Selective copying (Gu & Dao 2023, §3.1 and §4.1.1).

Tokens: 0 = noise, 1..C = data ("colours"), C+1 = marker; V = C + 2. The first L−K positions are noise with K
data tokens at sorted random distinct positions; the last K positions are markers. At the i-th marker the
target is the i-th data token, so the model must remember the data tokens in order and ignore the noise.

Known mechanism (the paper's selection argument): Δ is large at data tokens (write) and small at noise
(ignore), visible directly in ``hook_dt``; ``metadata["is_data"]`` is the ground truth for that contrast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mamba_interp.tasks.base import IGNORE, Task, TaskBatch, check_positive_int, register_task, to_long


@dataclass(frozen=True)
class SelectiveCopyParams:
    seq_len: int = 32
    """L, markers included."""
    num_data: int = 4
    """K data tokens to copy."""
    num_colors: int = 8
    """C distinct data tokens (1..C)."""

    def __post_init__(self) -> None:
        check_positive_int("SelectiveCopyParams", seq_len=self.seq_len, num_data=self.num_data,
                           num_colors=self.num_colors)
        _check_len(self.seq_len, self.num_data)


def _check_len(seq_len: int, k: int) -> None:
    if seq_len < 2 * k:
        raise ValueError(f"selective_copy needs seq_len >= 2*num_data = {2 * k}, got {seq_len}")


@register_task
class SelectiveCopyTask(Task):
    """Selective copying. Metadata:

    * ``data`` = ``answer`` [b, K]: the data tokens in order; ``data_pos`` [b, K]: their positions;
    * ``marker_pos`` = ``answer_pos`` [b, K]: L−K+i, where data token i must be produced;
    * ``is_data`` [b, l] bool: the positions holding a data token.
    """

    name = "selective_copy"
    Params = SelectiveCopyParams

    @property
    def vocab_size(self) -> int:
        return self.p.num_colors + 2

    @property
    def marker(self) -> int:
        return self.p.num_colors + 1

    @property
    def chance(self) -> float:
        return 1.0 / self.p.num_colors

    def _generate(self, n, rng, seq_len, split):
        k = self.p.num_data
        _check_len(seq_len, k)
        body = seq_len - k
        data_pos = np.sort(np.argsort(rng.random((n, body)), axis=1)[:, :k], axis=1)  # (b, K) distinct, sorted
        data = rng.integers(1, self.p.num_colors + 1, size=(n, k))  # (b, K)
        tokens = np.zeros((n, seq_len), dtype=np.int64)
        rows = np.arange(n)[:, None]
        tokens[rows, data_pos] = data
        tokens[:, body:] = self.marker
        marker_pos = np.broadcast_to(np.arange(body, seq_len), (n, k))
        targets = np.full((n, seq_len), IGNORE, dtype=np.int64)
        targets[:, body:] = data
        is_data = np.zeros((n, seq_len), dtype=bool)
        is_data[rows, data_pos] = True
        metadata = {
            "data": to_long(data),
            "data_pos": to_long(data_pos),
            "marker_pos": to_long(marker_pos),
            "answer": to_long(data),
            "answer_pos": to_long(marker_pos),
            "is_data": torch.from_numpy(is_data),
        }
        return TaskBatch(to_long(tokens), to_long(targets), metadata)
