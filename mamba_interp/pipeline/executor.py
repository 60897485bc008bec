"""Fan-out of a step's independent units of work (an SAE per (layer, hook), a probe per (layer, hook, variable), a
patching sweep per site, a decomposition per layer): in this process, or on a Ray cluster.

A step hands a module-level function and a list of picklable units to ``ctx.executor``::

    def train_one(worker: Worker, unit: MyUnit) -> Result:     # module level, so Ray can ship it
        return fit(worker.model, unit.data, seed=unit.seed)     # worker.model: the run's model on worker.device

    results = ctx.executor.map(train_one, units, desc="probes")   # results[i] belongs to units[i]

and gets the results in the order of the units. Every unit must be computed from what it carries (its data and its
own seed), never from state shared between units, so the :class:`LocalExecutor` (``--executor local``, the
default: one unit after another, with a progress bar) and the :class:`RayExecutor` (``--executor ray``: one Ray
actor per device, i.e. per GPU, or per CPU of the cluster without GPUs, each loading the model once) give identical
results. ``--ray-address`` joins a running cluster (``ray start --head``); without it a local one is started.
Ray is an optional dependency: ``pip install mamba-interp[distributed]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from mamba_interp.pipeline.config import UsageError

U = TypeVar("U")
R = TypeVar("R")


@dataclass
class Worker:
    """What a unit's function gets besides the unit: the model on the worker's device."""

    model: Any
    device: torch.device
    progress: Callable | None = None
    """Wraps an iterable in a progress bar (local executor only; None on Ray workers)."""


class LocalExecutor:
    """Runs the units one after another in this process."""

    name = "local"

    def __init__(self, model: Any, device: torch.device, progress: Callable | None = None) -> None:
        self.worker = Worker(model, device, progress)

    def map(self, fn: Callable[[Worker, U], R], units: Sequence[U], desc: str = "") -> list[R]:
        wrap = self.worker.progress
        items = wrap(units, desc=desc) if wrap is not None else units
        return [fn(self.worker, u) for u in items]

    def close(self) -> None:
        pass


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray; install it with pip install 'mamba-interp[distributed]' "
                         "(or use --executor local)") from None
    return ray


class _RayWorker:
    """The body of one Ray actor: holds the model, runs units."""

    def __init__(self, model: Any, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        self.worker = Worker(model.to(device).eval(), torch.device(device))

    def run(self, fn: Callable, unit: Any) -> Any:
        return fn(self.worker, unit)


class RayExecutor:
    """One Ray actor per device of the cluster (per GPU; per CPU when it has none), each with one copy of the model;
    the units are dealt to the actors in turn and their results returned in order."""

    name = "ray"

    def __init__(self, model: Any, address: str | None = None, workers: int | None = None) -> None:
        ray = _import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
                raise UsageError(f"cannot start or join {where} ({str(exc).splitlines()[0]}); check --ray-address "
                                 f"or run with --executor local") from None
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        n = workers or (gpus if gpus else cpus)
        actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)(_RayWorker)
        model_ref = ray.put(model.cpu() if gpus else model)
        threads = 1 if not gpus else max(1, cpus // max(gpus, 1))
        self._ray = ray
        self.actors = [actor.remote(model_ref, "cuda" if gpus else "cpu", threads) for _ in range(n)]
        self.devices = n

    def map(self, fn: Callable[[Worker, U], R], units: Sequence[U], desc: str = "") -> list[R]:
        futures = [self.actors[i % len(self.actors)].run.remote(fn, u) for i, u in enumerate(units)]
        return list(self._ray.get(futures))

    def close(self) -> None:
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []


def make_executor(kind: str, model: Any, device: torch.device, progress: Callable | None = None,
                  address: str | None = None) -> LocalExecutor | RayExecutor:
    """``--executor local|ray``. The Ray executor copies ``model`` to its actors once."""
    if kind == "local":
        return LocalExecutor(model, device, progress)
    if kind == "ray":
        workers = int(os.environ.get("MAMBA_INTERP_RAY_WORKERS", "0")) or None
        return RayExecutor(model, address, workers)
    raise UsageError(f"executor {kind!r} is unknown; use local or ray")
