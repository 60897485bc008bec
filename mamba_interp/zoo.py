"""``mamba_interp.zoo``: the shipped model zoo (an alias of :mod:`mamba_interp.tasks.zoo`)."""

from mamba_interp.tasks.zoo import (
    DEFAULT,
    family,
    info,
    load,
    load_checkpoint,
    load_snapshot,
    load_task,
    measure_accuracy,
    names,
    path,
    snapshot_files,
    snapshot_steps,
    training_log,
    zoo_dir,
)

__all__ = [
    "DEFAULT", "family", "info", "load", "load_checkpoint", "load_snapshot", "load_task", "measure_accuracy",
    "names", "path", "snapshot_files", "snapshot_steps", "training_log", "zoo_dir",
]
