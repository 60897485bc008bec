"""The common interface of every task: a seeded batch generator with ground truth, and its metrics.

A task is built from a frozen, validated parameter dataclass (``Task.Params``) and samples batches:

    >>> task = get_task("induction", vocab_size=16, seq_len=64)
    >>> batch = task.sample(32, seed=0)            # TaskBatch: tokens [b, l], targets [b, l], metadata
    >>> acc = task.accuracy(model(batch.tokens), batch)

Conventions shared by all tasks (index letters: b batch, l position, v vocabulary, k answers per example):

* ``tokens`` [b, l] long; ``targets`` [b, l] long with ``IGNORE`` (-100) where there is no training target. A
  target at position t is what the model's logits at position t must predict (the "next token" at t).
* ``eval_mask`` [b, l] bool: the positions accuracy is scored on (by default ``targets != IGNORE``; parity
  trains on every running-parity bit but scores only the last).
* ``metadata``: ground truth for probes, SAEs and causal checks. Every task fills at least
  ``answer`` and ``answer_pos`` ([b] long for one answer per example, [b, k] for k answers), plus the
  task-specific keys its docstring lists. Tensor values have the batch as their first dimension.
* ``sample(n, seed, seq_len=None, split="train")`` is deterministic in ``(params, n, seed, seq_len, split)``
  and independent of global RNG state. The ``"train"`` and ``"test"`` streams of generator tasks never share a
  random stream, so evaluating on ``split="test"`` is evaluating on fresh data. Finite tasks (modular
  addition) hold a fixed train/test partition of all examples instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100
SPLITS = ("train", "test", "all")
_SPLIT_CODE = {"train": 0, "test": 1, "all": 2}


@dataclass
class TaskBatch:
    """A batch of task sequences with targets and ground truth (see the module docstring for conventions)."""

    tokens: torch.Tensor  # (b, l) long
    targets: torch.Tensor  # (b, l) long, IGNORE where unscored
    metadata: dict[str, Any] = field(default_factory=dict)
    eval_mask: torch.Tensor | None = None  # (b, l) bool; None -> targets != IGNORE
    attention_mask: torch.Tensor | None = None  # (b, l) 0/1 for padded text prompts; None -> no padding
    task: str = ""

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2 or self.tokens.shape != self.targets.shape:
            raise ValueError(
                f"TaskBatch needs tokens and targets of the same shape [b, l], got {tuple(self.tokens.shape)} "
                f"and {tuple(self.targets.shape)}"
            )
        if self.eval_mask is None:
            self.eval_mask = self.targets != IGNORE

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def to(self, device: str | torch.device) -> TaskBatch:
        """A copy with every tensor (metadata included) on ``device``."""
        move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return dataclasses.replace(
            self,
            tokens=move(self.tokens),
            targets=move(self.targets),
            eval_mask=move(self.eval_mask),
            attention_mask=move(self.attention_mask),
            metadata={k: move(v) for k, v in self.metadata.items()},
        )

    def select(self, index: slice | torch.Tensor | list[int]) -> TaskBatch:
        """The sub-batch of the given examples (metadata entries whose first dimension is the batch follow)."""
        b = len(self)
        if isinstance(index, slice):
            index = torch.arange(b)[index]
        index = torch.as_tensor(index, dtype=torch.long)

        def pick(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b:
                return v[index]
            if isinstance(v, list) and len(v) == b:
                return [v[i] for i in index.tolist()]
            return v

        return dataclasses.replace(
            self,
            tokens=self.tokens[index],
            targets=self.targets[index],
            eval_mask=self.eval_mask[index],
            attention_mask=None if self.attention_mask is None else self.attention_mask[index],
            metadata={k: pick(v) for k, v in self.metadata.items()},
        )


class Task:
    """Base class: subclasses set ``name``, ``Params`` (a frozen dataclass validated in ``__post_init__``),
    ``vocab_size``/``seq_len`` and implement ``_generate``.

    ``Params`` may omit ``vocab_size``/``seq_len`` when they are derived (modular addition: ``p + 1`` and 3);
    :meth:`from_params` then accepts them only if they equal the derived values, so a card's ``task_params``
    (:meth:`spec`) round-trips through ``get_task(name, **task_params)``.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type]
    finite: ClassVar[bool] = False  # True: a fixed set of examples split into train/test (no fresh data)

    def __init__(self, params: Any) -> None:
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} needs {self.Params.__name__}, got {type(params).__name__}")
        self.p = params

    @classmethod
    def from_params(cls, **kwargs: Any) -> Task:
        fields = {f.name for f in dataclasses.fields(cls.Params)}
        derived = {k: kwargs.pop(k) for k in ("vocab_size", "seq_len") if k in kwargs and k not in fields}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise ValueError(
                f"task {cls.name!r} has no parameter(s) {unknown}; its parameters are {sorted(fields)}"
            )
        task = cls(cls.Params(**kwargs))
        for key, value in derived.items():
            if value != getattr(task, key):
                raise ValueError(
                    f"task {cls.name!r}: {key}={value} does not match the value {getattr(task, key)} implied by "
                    f"its other parameters; drop {key} or fix the others"
                )
        return task

    # ---- description -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def seq_len(self) -> int:
        return int(self.p.seq_len)

    @property
    def chance(self) -> float | None:
        """Accuracy of a uniform guess among the possible answers (None when not fixed by the parameters)."""
        return None

    @property
    def params(self) -> dict[str, Any]:
        """The constructor parameters (``get_task(task.name, **task.params)`` rebuilds the task)."""
        return dataclasses.asdict(self.p)

    def spec(self) -> dict[str, Any]:
        """Parameters plus the derived ``vocab_size`` and ``seq_len`` (what a model card records)."""
        return {**self.params, "vocab_size": self.vocab_size, "seq_len": self.seq_len}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    # ---- sampling ----------------------------------------------------------------------------
    def sample(self, n: int | None, seed: int, seq_len: int | None = None, split: str = "train") -> TaskBatch:
        """``n`` examples, deterministic in ``(params, n, seed, seq_len, split)``.

        ``seq_len`` overrides the task's length (length generalisation) for tasks that allow it.
        """
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is unknown; use one of {SPLITS}")
        if not self.finite and (n is None or n <= 0):
            raise ValueError(f"n={n!r} must be a positive number of examples for task {self.name!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer")
        # SeedSequence mixes (seed, split) into independent streams: train and test never coincide
        rng = np.random.default_rng([int(seed), _SPLIT_CODE[split]])
        batch = self._generate(n, rng, self.seq_len if seq_len is None else int(seq_len), split)
        batch.task = self.name
        return batch

    def _generate(self, n: int | None, rng: np.random.Generator, seq_len: int, split: str) -> TaskBatch:
        raise NotImplementedError

    def corrupt(self, batch: TaskBatch, seed: int) -> TaskBatch:
        """A corrupted partner of ``batch`` for activation patching (same positions, different answer)."""
        raise NotImplementedError(f"task {self.name!r} defines no corrupted partner; patch against another sample")

    # ---- metrics -----------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """Mean cross-entropy over positions with a target. logits [b, l, v] -> scalar."""
        return lm_loss(logits, batch.targets.to(logits.device))

    def accuracy(self, logits: torch.Tensor, batch: TaskBatch) -> float:
        """Fraction of scored positions (``batch.eval_mask``) whose argmax equals the target."""
        return masked_accuracy(logits, batch.targets, batch.eval_mask)

    def per_example_correct(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """[b] bool: every scored position of the example is predicted correctly."""
        targets, mask = batch.targets.to(logits.device), batch.eval_mask.to(logits.device)
        ok = (logits.argmax(-1) == targets) | ~mask
        return ok.all(dim=-1).cpu()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over positions whose target is not ``IGNORE``; logits [b, l, v], targets [b, l]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE)


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.to(logits.device)
    n = int(mask.sum())
    if n == 0:
        raise ValueError("no scored positions in this batch (eval_mask is all False)")
    correct = (logits.argmax(-1) == targets.to(logits.device)) & mask
    return float(correct.sum()) / n


# ---- registry -------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding a task to :func:`get_task`'s registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    _REGISTRY[cls.name] = cls
    return cls


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **params: Any) -> Task:
    """Build the task ``name`` with its parameters (see each task class for them and their defaults)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return _REGISTRY[name].from_params(**params)


def check_positive_int(owner: str, **values: Any) -> None:
    for key, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner}.{key}={value!r} must be a positive integer")


def to_long(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
