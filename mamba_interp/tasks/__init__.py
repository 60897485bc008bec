"""Synthetic tasks with ground truth, text prompt sets, tiny-model training, and the model zoo.

    >>> from mamba_interp import tasks
    >>> task = tasks.get_task("induction", vocab_size=16, seq_len=64)
    >>> batch = task.sample(256, seed=0, split="test")   # tokens, targets, metadata (ground truth)
    >>> from mamba_interp import zoo
    >>> model = zoo.load(zoo.DEFAULT); task.accuracy(model(batch.tokens), batch)

Tasks: ``induction``, ``mqar``, ``selective_copy``, ``modular_addition``, ``parity`` (synthetic);
``text_induction``, ``ioi``, ``factual_recall`` (prompt sets for real LMs, need ``tokenizer=``).
Training: :class:`TrainConfig`, :func:`train`, ``mamba-interp train ...``. Zoo: :mod:`mamba_interp.tasks.zoo`.
"""

from mamba_interp.tasks.base import IGNORE, Task, TaskBatch, get_task, lm_loss, register_task, task_names
from mamba_interp.tasks.induction import InductionTask
from mamba_interp.tasks.modular_addition import ModularAdditionTask
from mamba_interp.tasks.mqar import MQARTask
from mamba_interp.tasks.parity import ParityTask
from mamba_interp.tasks.selective_copy import SelectiveCopyTask
from mamba_interp.tasks.text import (
    FactualRecallTask,
    IOITask,
    TextInductionTask,
    TokenizerUnavailableError,
    load_tokenizer,
)
from mamba_interp.tasks.baseline import TransformerBaseline
from mamba_interp.tasks.training import TrainConfig, TrainResult, evaluate, train

__all__ = [
    "IGNORE", "Task", "TaskBatch", "get_task", "lm_loss", "register_task", "task_names",
    "InductionTask", "MQARTask", "SelectiveCopyTask", "ModularAdditionTask", "ParityTask",
    "TextInductionTask", "IOITask", "FactualRecallTask", "TokenizerUnavailableError", "load_tokenizer",
    "TransformerBaseline", "TrainConfig", "TrainResult", "evaluate", "train",
]
