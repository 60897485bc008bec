"""Modular addition ``(a, b, =) -> (a + b) mod p``, the grokking task of Power et al. (2022) and Nanda et al.
(2023, arXiv 2301.05217).

Tokens 0..p−1 are the numbers and p is ``=``, so V = p + 1 and L = 3; the target sits at the last position.
The p² pairs are split once into train and test by ``frac_train`` with ``split_seed``; this is a finite task,
so ``sample(None, seed, split=...)`` returns a whole split (full-batch training) in pair order, and
``split="all"`` the full p × p grid in the order ``a·p + b`` that the Fourier progress measures expect.

Known mechanism (Nanda et al.; checked on the zoo's ``modadd-mamba2``): a sparse set of key
frequencies k, with logits ∝ cos(2πk(a + b − c)/p).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from mamba_interp.tasks.base import IGNORE, Task, TaskBatch, check_positive_int, register_task, to_long


@dataclass(frozen=True)
class ModularAdditionParams:
    p: int = 31
    """The modulus (a prime in the literature; any p >= 2 works)."""
    frac_train: float = 0.5
    """Fraction of the p² pairs in the train split."""
    split_seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("ModularAdditionParams", p=self.p)
        if self.p < 2:
            raise ValueError(f"ModularAdditionParams.p={self.p} must be >= 2")
        if not 0.0 < self.frac_train < 1.0:
            raise ValueError(f"ModularAdditionParams.frac_train={self.frac_train} must be in (0, 1)")
        n_train = round(self.frac_train * self.p**2)
        if n_train == 0 or n_train == self.p**2:
            raise ValueError(f"frac_train={self.frac_train} leaves an empty split for p={self.p}")
        if self.split_seed < 0:
            raise ValueError(f"ModularAdditionParams.split_seed={self.split_seed} must be >= 0")


@register_task
class ModularAdditionTask(Task):
    """Modular addition. Metadata ([b] long unless noted):

    * ``a``, ``b``; ``answer`` = (a + b) mod p; ``answer_pos`` = 2 (the ``=`` token);
    * ``pair_index`` = a·p + b; ``is_train`` [b] bool (membership of the train split);
    * ``equals_token``: int p.
    """

    name = "modular_addition"
    Params = ModularAdditionParams
    finite = True

    @property
    def vocab_size(self) -> int:
        return self.p.p + 1

    @property
    def seq_len(self) -> int:
        return 3

    @property
    def chance(self) -> float:
        return 1.0 / self.p.p

    @cached_property
    def _is_train(self) -> np.ndarray:
        """[p²] bool over pair indices a·p + b."""
        total = self.p.p**2
        order = np.random.default_rng([self.p.split_seed, 0x9D]).permutation(total)
        mask = np.zeros(total, dtype=bool)
        mask[order[: round(self.p.frac_train * total)]] = True
        return mask

    def split_indices(self, split: str) -> np.ndarray:
        """Sorted pair indices a·p + b of a split ("train", "test" or "all")."""
        if split == "all":
            return np.arange(self.p.p**2)
        return np.flatnonzero(self._is_train if split == "train" else ~self._is_train)

    def split_size(self, split: str) -> int:
        return len(self.split_indices(split))

    def _generate(self, n, rng, seq_len, split):
        if seq_len != 3:
            raise ValueError(f"modular_addition has a fixed seq_len of 3 (a, b, =), got {seq_len}")
        index = self.split_indices(split)
        if n is not None:
            if not 0 < n <= len(index):
                raise ValueError(f"n={n} must be in 1..{len(index)} (the size of the {split!r} split) or None")
            index = np.sort(rng.choice(index, size=n, replace=False))
        p = self.p.p
        a, b = index // p, index % p
        answer = (a + b) % p
        tokens = np.stack([a, b, np.full_like(a, p)], axis=1)  # (b, 3)
        targets = np.full_like(tokens, IGNORE)
        targets[:, 2] = answer
        metadata = {
            "a": to_long(a),
            "b": to_long(b),
            "answer": to_long(answer),
            "answer_pos": to_long(np.full_like(a, 2)),
            "pair_index": to_long(index),
            "is_train": torch.from_numpy(self._is_train[index].copy()),
            "equals_token": p,
        }
        return TaskBatch(to_long(tokens), to_long(targets), metadata)
