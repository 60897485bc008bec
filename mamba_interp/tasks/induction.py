"""Induction heads (associative recall of one pair), in the form of the Mamba paper (Gu & Dao 2023, §4.1.2).

The format is fixed because other checks (implicit attention, patching at ``value_pos``) rely on it:

* vocabulary V (default 16): token 0 is padding and never appears; token V−1 is the trigger; content tokens
  are 1..V−2;
* a sequence of length L is uniform content tokens, except a trigger at a random position p (0 ≤ p ≤ L−3)
  followed by a content token X, and a trigger again at position L−1; the trigger appears nowhere else;
* the target is X at the last position (accuracy = argmax of the last logits).

Known mechanism (an SSM form of Olsson et al. 2022's induction heads): the conv of an early layer shifts the
previous token into each position ("the token after a trigger"), and the last layer's SSM reads it
out where C at L−1 matches B at p+1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mamba_interp.tasks.base import IGNORE, Task, TaskBatch, check_positive_int, register_task, to_long


@dataclass(frozen=True)
class InductionParams:
    vocab_size: int = 16
    """V: token 0 = padding (never used), V−1 = trigger, 1..V−2 = content."""
    seq_len: int = 64
    """L: the training length; ``sample(..., seq_len=...)`` may ask for any L ≥ 3."""

    def __post_init__(self) -> None:
        check_positive_int("InductionParams", vocab_size=self.vocab_size, seq_len=self.seq_len)
        if self.vocab_size < 4:
            raise ValueError(f"InductionParams.vocab_size={self.vocab_size} must be >= 4 (2+ content tokens)")
        if self.seq_len < 3:
            raise ValueError(f"InductionParams.seq_len={self.seq_len} must be >= 3 (trigger, value, trigger)")


@register_task
class InductionTask(Task):
    """Single-query induction. Metadata (all [b] long unless noted):

    * ``trigger_pos``: p, the first trigger; ``value_pos``: p+1, where X sits;
    * ``query_pos`` = ``answer_pos``: L−1, the second trigger, where X must be predicted;
    * ``answer``: X; ``distance``: (L−1) − (p+1), how far back the answer lies;
    * ``trigger_token``: int, V−1.
    """

    name = "induction"
    Params = InductionParams

    @property
    def vocab_size(self) -> int:
        return self.p.vocab_size

    @property
    def trigger(self) -> int:
        return self.p.vocab_size - 1

    @property
    def chance(self) -> float:
        return 1.0 / (self.p.vocab_size - 2)

    def _generate(self, n, rng, seq_len, split):
        if seq_len < 3:
            raise ValueError(f"induction needs seq_len >= 3, got {seq_len}")
        v, rows = self.p.vocab_size, np.arange(n)
        tokens = rng.integers(1, v - 1, size=(n, seq_len))  # (b, l) content 1..V-2
        p = rng.integers(0, seq_len - 2, size=n)  # (b,) first trigger in 0..L-3
        tokens[rows, p] = self.trigger
        tokens[:, -1] = self.trigger
        answer = tokens[rows, p + 1]  # never the trigger: p+1 <= L-2
        targets = np.full((n, seq_len), IGNORE, dtype=np.int64)
        targets[:, -1] = answer
        last = np.full(n, seq_len - 1)
        metadata = {
            "trigger_pos": to_long(p),
            "value_pos": to_long(p + 1),
            "query_pos": to_long(last),
            "answer_pos": to_long(last),
            "answer": to_long(answer),
            "distance": to_long(seq_len - 2 - p),
            "trigger_token": self.trigger,
        }
        return TaskBatch(to_long(tokens), to_long(targets), metadata)

    def corrupt(self, batch: TaskBatch, seed: int) -> TaskBatch:
        """The same sequences with X replaced by a different content token: only the answer changes."""
        rng = np.random.default_rng([int(seed), 3])
        answer = batch.metadata["answer"].numpy()
        shift = rng.integers(1, self.p.vocab_size - 2, size=len(batch))  # 1..V-3, never 0
        new = (answer - 1 + shift) % (self.p.vocab_size - 2) + 1  # another content token
        tokens, targets = batch.tokens.clone(), batch.targets.clone()
        rows = np.arange(len(batch))
        tokens[rows, batch.metadata["value_pos"].numpy()] = to_long(new)
        targets[:, -1] = to_long(new)
        return TaskBatch(tokens, targets, {**batch.metadata, "answer": to_long(new)}, task=self.name)
