"""Running parity of a bit string: a negative control.

Linear RNNs whose transition eigenvalues lie in [0, 1] (Mamba: exp(Δ·A) ∈ (0, 1)) cannot represent parity
at arbitrary length in finite precision (Grazzi et al. 2024, arXiv 2411.12537; Sarrof et al. 2024). A fixed
short length is partly learnable, so the clean test is *length generalisation*: train at L ≤ 16 and score
at ``sample(..., seq_len=64)``, where a Mamba should fall to chance (0.5).

Tokens are the bits 0 and 1 (V = 2). The target at position t is the XOR of bits 0..t (every position when
``train_targets="all"``, else only the last); accuracy is scored at the last position only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mamba_interp.tasks.base import IGNORE, Task, TaskBatch, check_positive_int, register_task, to_long

TRAIN_TARGETS = ("all", "last")


@dataclass(frozen=True)
class ParityParams:
    seq_len: int = 16
    train_targets: str = "all"
    """"all": running parity at every position (denser signal); "last": only the final bit's parity."""

    def __post_init__(self) -> None:
        check_positive_int("ParityParams", seq_len=self.seq_len)
        if self.train_targets not in TRAIN_TARGETS:
            raise ValueError(f"ParityParams.train_targets={self.train_targets!r} must be one of {TRAIN_TARGETS}")


@register_task
class ParityTask(Task):
    """Running parity. Metadata: ``running_parity`` [b, l] long; ``answer`` [b] (parity of the whole string);
    ``answer_pos`` [b] = L−1; ``num_ones`` [b]."""

    name = "parity"
    Params = ParityParams

    @property
    def vocab_size(self) -> int:
        return 2

    @property
    def chance(self) -> float:
        return 0.5

    def _generate(self, n, rng, seq_len, split):
        if seq_len < 1:
            raise ValueError(f"parity needs seq_len >= 1, got {seq_len}")
        bits = rng.integers(0, 2, size=(n, seq_len))  # (b, l)
        running = np.cumsum(bits, axis=1) % 2  # (b, l)
        if self.p.train_targets == "all":
            targets = running.copy()
        else:
            targets = np.full_like(bits, IGNORE)
            targets[:, -1] = running[:, -1]
        eval_mask = np.zeros((n, seq_len), dtype=bool)
        eval_mask[:, -1] = True
        metadata = {
            "running_parity": to_long(running),
            "answer": to_long(running[:, -1]),
            "answer_pos": to_long(np.full(n, seq_len - 1)),
            "num_ones": to_long(bits.sum(axis=1)),
        }
        return TaskBatch(to_long(bits), to_long(targets), metadata, eval_mask=torch.from_numpy(eval_mask))
