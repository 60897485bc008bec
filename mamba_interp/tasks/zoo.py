"""The model zoo: small models trained by :mod:`mamba_interp.tasks.training`, shipped as package data.

Each entry is a folder ``zoo_data/<name>/`` with ``config.json`` + ``model.safetensors`` (the checkpoint),
``card.json`` (what it is and how well it does) and ``training_log.json`` (the run's curves; for
``modadd-mamba2`` also ``snapshot_stepNNNNNN.safetensors`` weight snapshots for grokking progress measures).

    >>> from mamba_interp import zoo
    >>> model = zoo.load(zoo.DEFAULT)            # HookedMamba (or TransformerBaseline for a transformer entry)
    >>> card = zoo.info(zoo.DEFAULT)             # task, task_params, arch, accuracy, command, ...
    >>> task = zoo.load_task(zoo.DEFAULT)        # the task the model was trained on, same parameters

Card keys: ``name``, ``description``, ``task``, ``task_params`` (incl. ``vocab_size``, ``seq_len``), ``arch``,
``family`` (models of one family differ only in size, for the scaling step), ``model_config``, ``n_params``,
``seed``, ``train_config``, ``command`` (regenerates the checkpoint), ``build_command`` (retrains and re-cards
the entry), ``accuracy`` (fresh held-out data at the training length, or the test split),
``accuracy_by_seq_len``, ``eval`` (how accuracy was measured), ``train_time_s`` (measured wall time of
``command``), ``steps_run``, ``snapshots``, ``fingerprint``, ``versions``. Cards are written by
``python -m mamba_interp.tasks build-zoo``; no number in them is edited by hand.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

DEFAULT = "induction-mamba1"


def zoo_dir() -> Path:
    return Path(str(resources.files("mamba_interp.tasks").joinpath("zoo_data")))


def names() -> list[str]:
    """Names of the shipped models (folders holding a ``card.json``)."""
    root = zoo_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "card.json").is_file())


def path(name: str) -> Path:
    """The folder of a zoo model; ValueError listing the known names if ``name`` is not one."""
    known = names()
    if name not in known:
        raise ValueError(f"unknown zoo model {name!r}; known models: {', '.join(known) or '(none shipped)'}")
    return zoo_dir() / name


def info(name: str) -> dict[str, Any]:
    """The model card (a fresh dict each call)."""
    return json.loads((path(name) / "card.json").read_text())


def load(name: str = DEFAULT, device: str | None = None) -> nn.Module:
    """The trained model in eval mode: a ``HookedMamba``, or a ``TransformerBaseline`` for transformer entries."""
    model = load_checkpoint(path(name))
    if device is not None:
        model.to(device)
    return model.eval()


def load_checkpoint(folder: str | Path) -> nn.Module:
    """A checkpoint folder written by the trainer: GPT-2 baseline if ``model_type`` is gpt2, else HookedMamba."""
    from mamba_interp.tasks.baseline import TransformerBaseline

    if TransformerBaseline.is_checkpoint(folder):
        return TransformerBaseline.from_pretrained(folder)
    from mamba_interp.models import HookedMamba

    return HookedMamba.from_pretrained(folder)


def load_task(name: str = DEFAULT):
    """The task (with the card's parameters) the model was trained on."""
    from mamba_interp.tasks.base import get_task

    card = info(name)
    return get_task(card["task"], **card["task_params"])


def training_log(name: str) -> dict[str, Any]:
    """The full ``training_log.json`` (per-step loss and lr; per-eval train/test loss, accuracy, Σw²)."""
    log = path(name) / "training_log.json"
    if not log.exists():
        raise ValueError(f"zoo model {name!r} ships no training log")
    return json.loads(log.read_text())


def snapshot_files(folder: str | Path) -> dict[int, Path]:
    """``snapshot_stepNNNNNN.safetensors`` files of a checkpoint folder (zoo entry or ``mamba-interp train``
    output) by training step, in step order."""
    files = {}
    for p in Path(folder).glob("snapshot_step*.safetensors"):
        step = p.stem.removeprefix("snapshot_step")
        if step.isdigit():
            files[int(step)] = p
    return dict(sorted(files.items()))


def snapshot_steps(name: str) -> list[int]:
    """Steps at which weight snapshots are shipped (empty for most models)."""
    return list(snapshot_files(path(name)))


def load_snapshot(name: str, step: int) -> nn.Module:
    """The model as it was after ``step`` training steps (see :func:`snapshot_steps`)."""
    from mamba_interp.tasks.training import load_snapshot as _load

    steps = snapshot_steps(name)
    if step not in steps:
        raise ValueError(f"zoo model {name!r} has no snapshot at step {step}; available: {steps}")
    return _load(load(name), path(name) / f"snapshot_step{step:06d}.safetensors")


def family(name: str) -> list[str]:
    """Models of the family ``name`` (a card's ``family``), smallest first."""
    members = [(info(n)["n_params"], n) for n in names() if info(n).get("family") == name]
    if not members:
        fams = sorted({info(n).get("family") for n in names()} - {None})
        raise ValueError(f"unknown zoo family {name!r}; known families: {', '.join(fams)}")
    return [n for _, n in sorted(members)]


def measure_accuracy(name: str, n: int = 1000, seed: int = 1, seq_len: int | None = None) -> float:
    """Accuracy of a zoo model on ``n`` fresh held-out sequences (finite tasks: the whole test split)."""
    from mamba_interp.tasks.training import evaluate

    task, model = load_task(name), load(name)
    batch = task.sample(None if task.finite else n, seed, seq_len=seq_len, split="test")
    return evaluate(model, task, batch)["acc"]
