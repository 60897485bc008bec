"""Multi-query associative recall (MQAR), in the layout of Zoology (Arora et al. 2023, arXiv 2312.04927;
``HazyResearch/zoology`` ``zoology/data/multiquery_ar.py``; Arora et al. 2023, arXiv 2312.04927).

* keys are drawn (distinct within a sequence) from 1..V/2−1, values (distinct) from V/2..V−1;
* the context opens with the K pairs ``k1 v1 k2 v2 ... kK vK``;
* each key reappears once as a query in the rest of the sequence, at even offsets ``2·gap`` whose gaps follow
  Zoology's power law (``power_a`` = 0.01 favours short gaps); the target at a query is its value;
* every other slot is 0, or a uniform random token from 0..V−1 when ``random_non_queries``. Zoology defaults to
  random fillers at V = 8192, where a filler rarely equals a key; at the small vocabularies used here a filler
  key followed by a filler token is a second, conflicting binding (a 2-layer Mamba-1 plateaued at 0.29 on
  V = L = 32 with 4 pairs), so the default here is 0-fillers.

Known mechanism: the pairs are bound in the recurrent state (B at the value position carries the key, via the
conv's previous-token shift) and read out where C at the query matches; recall improves with state size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mamba_interp.tasks.base import IGNORE, Task, TaskBatch, check_positive_int, register_task, to_long


@dataclass(frozen=True)
class MQARParams:
    vocab_size: int = 64
    seq_len: int = 64
    num_kv_pairs: int = 8
    power_a: float = 0.01
    """Zoology's power-law exponent for the query gaps (1.0 = uniform)."""
    random_non_queries: bool = False

    def __post_init__(self) -> None:
        check_positive_int("MQARParams", vocab_size=self.vocab_size, seq_len=self.seq_len,
                           num_kv_pairs=self.num_kv_pairs)
        k = self.num_kv_pairs
        if self.vocab_size // 2 - 1 < k or self.vocab_size - self.vocab_size // 2 < k:
            raise ValueError(
                f"MQARParams: vocab_size={self.vocab_size} leaves {self.vocab_size // 2 - 1} keys for "
                f"num_kv_pairs={k}; use vocab_size >= {2 * k + 2}"
            )
        _check_len(self.seq_len, k)
        if not 0 < self.power_a <= 1:
            raise ValueError(f"MQARParams.power_a={self.power_a} must be in (0, 1]")


def _check_len(seq_len: int, k: int) -> None:
    if seq_len % 2 or seq_len < 4 * k:
        raise ValueError(f"MQAR needs an even seq_len >= 4*num_kv_pairs = {4 * k}, got {seq_len}")


@register_task
class MQARTask(Task):
    """MQAR. Metadata ([b, K] long, column i = the i-th pair of the context):

    * ``keys``, ``values``; ``key_pos`` = 2i, ``value_pos`` = 2i+1;
    * ``query_pos`` = ``answer_pos``: where key i is queried; ``answer`` = ``values``;
    * ``num_kv_pairs``: int K.
    """

    name = "mqar"
    Params = MQARParams

    @property
    def vocab_size(self) -> int:
        return self.p.vocab_size

    @property
    def chance(self) -> float:
        return 1.0 / (self.p.vocab_size - self.p.vocab_size // 2)

    def _generate(self, n, rng, seq_len, split):
        v, k = self.p.vocab_size, self.p.num_kv_pairs
        _check_len(seq_len, k)
        half, context = v // 2, 2 * k
        # k distinct keys / values per row: the first k of a random permutation (vectorised choice)
        keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :k] + 1  # (b, K) in 1..V/2-1
        values = np.argsort(rng.random((n, v - half)), axis=1)[:, :k] + half  # (b, K) in V/2..V-1
        space = (seq_len - context) // 2
        weights = self.p.power_a * np.arange(1, space + 1) ** (self.p.power_a - 1)
        # Gumbel top-k = sequential weighted sampling without replacement (numpy's choice(replace=False, p=...))
        scores = np.log(weights / weights.sum()) + rng.gumbel(size=(n, space))
        gaps = np.argsort(-scores, axis=1)[:, :k]  # (b, K)
        if self.p.random_non_queries:
            tokens = rng.integers(0, v, size=(n, seq_len))
        else:
            tokens = np.zeros((n, seq_len), dtype=np.int64)
        tokens[:, 0:context:2], tokens[:, 1:context:2] = keys, values
        rows = np.arange(n)[:, None]
        query_pos = context + 2 * gaps
        tokens[rows, query_pos] = keys
        targets = np.full((n, seq_len), IGNORE, dtype=np.int64)
        targets[rows, query_pos] = values
        metadata = {
            "keys": to_long(keys),
            "values": to_long(values),
            "key_pos": to_long(np.broadcast_to(np.arange(0, context, 2), (n, k))),
            "value_pos": to_long(np.broadcast_to(np.arange(1, context, 2), (n, k))),
            "query_pos": to_long(query_pos),
            "answer_pos": to_long(query_pos),
            "answer": to_long(values),
            "num_kv_pairs": k,
        }
        return TaskBatch(to_long(tokens), to_long(targets), metadata)
