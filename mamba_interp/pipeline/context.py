"""What a step receives (:class:`StepContext`) and what it returns (:class:`StepResult`).

A step sees the run config through :class:`ConfigView`: the result-relevant fields it declared with
``register_step(reads=...)`` (all of them by default) and those that never change a result. Reading an undeclared
field raises :class:`UndeclaredRead`, so a step's resume key always covers what it read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mamba_interp.pipeline.config import CONTEXT_FIELDS, RunConfig
from mamba_interp.utils.io import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    from mamba_interp.models import HookedMamba
    from mamba_interp.pipeline.model_source import ModelSource
    from mamba_interp.pipeline.registry import Step


class UndeclaredRead(RuntimeError):
    """A step read a result-relevant config field it did not declare in ``register_step(reads=...)``."""


def _undeclared(step: Step, name: str) -> UndeclaredRead:
    return UndeclaredRead(
        f"{step.label} reads {name!r}, which is not in its register_step(reads=...); add it there so that --resume "
        f"recomputes the step when {name} changes"
    )


class ConfigView:
    """Read-only run config of one step: its declared fields (``Step.key_fields``), and the fields that never
    change a result (output, device, quiet, ...). Methods such as ``to_dict`` pass through."""

    __slots__ = ("_config", "_step")

    def __init__(self, config: RunConfig, step: Step) -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_step", step)

    def __getattr__(self, name: str) -> Any:
        step = self._step
        if name == "step_options":
            raise UndeclaredRead(f"{step.label} reads config.step_options; read its own options as ctx.options "
                                 "(only those are in its resume key)")
        if name in RunConfig.result_fields() and name not in step.key_fields:
            raise _undeclared(step, name)
        return getattr(self._config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the run config is read-only")

    def __repr__(self) -> str:
        return f"ConfigView({self._step.label}, {self._config!r})"


@dataclass
class StepResult:
    """The outcome of one step.

    metrics: JSON-able numbers (nested dicts/lists fine; numpy/torch scalars are converted); written to
        ``result.json`` and shown in the report. Keep them summaries; per-dimension arrays belong in files.
    reading: a few sentences generated from the numbers ("3 of 128 channels are outliers ..."); the report
        shows it first.
    artifacts: extra files (relative to the step folder) to list; figures and tensors saved through
        ``ctx.save_figure`` / ``ctx.save_tensors`` / ``ctx.save_json`` are added automatically.
    data: in-memory objects for later steps of the same run (tensors, task objects); never written.
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    reading: str = ""
    artifacts: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        """A few lines (the reading, the metric names, counts), not the tensors in ``data``."""
        reading = self.reading if len(self.reading) <= 300 else self.reading[:299] + "…"
        keys = list(self.metrics)
        shown = ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")
        return (f"StepResult(reading={reading!r},\n  metrics: {shown or 'none'},\n  artifacts: "
                f"{len(self.artifacts)} files, data: {', '.join(self.data) or 'none'})")


@dataclass
class StepContext:
    """Everything a step may use. Build nothing global: take it from here.

    model / device / dtype: the loaded model, already on ``device`` (which may be CPU after an OOM fallback).
    config: the validated :class:`RunConfig`, seen through :class:`ConfigView`; ``options``: this step's options
        dataclass (or None).
    seed: this step's seed (derived from ``config.seed`` and the step number; torch, numpy and ``random`` are
        already seeded with it, so a step is deterministic whether or not earlier steps ran in this process).
    batch_size: sequences per forward pass; use it (not ``config.batch_size``), the OOM fallback lowers it.
    out_dir: the step's folder ``OUT/step_NN_<name>/`` (created empty before the step starts).
    source: where the model came from (zoo card with task and task parameters, folder, tokenizer access).
    layers: the resolved layer indices to analyse.
    results: earlier steps' :class:`StepResult` by number (metrics of resumed steps come from their JSON).
    log: a logger writing to the run's log file.
    """

    step: Step
    config: RunConfig | ConfigView
    model: HookedMamba
    device: torch.device
    dtype: torch.dtype
    seed: int
    _batch_size: int
    out_dir: Path
    source: ModelSource
    _layers: tuple[int, ...]
    results: Mapping[int, StepResult]
    log: logging.Logger
    options: Any = None
    _data: Mapping[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    _artifacts: list[str] = field(default_factory=list, repr=False)
    _executor: Any = field(default=None, repr=False)
    """The run's executor for ``--executor ray`` (made by the runner on first use), else None."""

    @property
    def executor(self) -> Any:
        """Runs independent units of work: ``ctx.executor.map(fn, units, desc=...)`` (``pipeline/executor.py``)."""
        if self._executor is not None:
            return self._executor()
        from mamba_interp.pipeline.executor import LocalExecutor

        return LocalExecutor(self.model, self.device, self.progress)

    def _declared(self, name: str) -> None:
        if name in CONTEXT_FIELDS and name not in self.step.key_fields:
            raise _undeclared(self.step, name)

    @property
    def layers(self) -> tuple[int, ...]:
        self._declared("layers")
        return self._layers

    @property
    def batch_size(self) -> int:
        self._declared("batch_size")
        return self._batch_size

    # ---- inputs from earlier steps ---------------------------------------------------------------
    def data(self, step: int) -> dict[str, Any]:
        """In-memory data of an earlier step this step ``requires`` (loaded from disk on resume)."""
        if step not in self._data:
            raise KeyError(
                f"step {self.step.number} asked for data of step {step}; add {step} to its register_step(requires=...)"
            )
        return self._data[step]

    def metrics(self, step: int) -> dict[str, Any]:
        """Metrics of an earlier step of this run."""
        return self.results[step].metrics

    # ---- progress --------------------------------------------------------------------------------
    def progress(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "", **kw: Any):
        """A tqdm progress bar labelled with the step (hidden when stderr is not a terminal or ``quiet``)."""
        from tqdm.auto import tqdm

        label = f"step {self.step.number:02d} {self.step.name}" + (f": {desc}" if desc else "")
        disable = True if self.config.quiet else None
        return tqdm(iterable, total=total, desc=label, leave=False, disable=disable, dynamic_ncols=True, **kw)

    # ---- outputs -----------------------------------------------------------------------------------
    def _register(self, path: Path) -> str:
        rel = path.relative_to(self.out_dir).as_posix()
        if rel not in self._artifacts:
            self._artifacts.append(rel)
        return rel

    def path(self, name: str) -> Path:
        """A path inside the step folder (for files written by other means; list it in ``artifacts``)."""
        return self.out_dir / name

    def save_figure(self, fig: Any, name: str, dpi: int = 100) -> Path:
        """Save a matplotlib figure as ``<name>.png`` (atomically), close it, record it as an artifact."""
        import matplotlib.pyplot as plt

        target = self.out_dir / (name if name.endswith(".png") else f"{name}.png")
        # a figure with a layout engine (layout="constrained") is already laid out; "tight" would redo the work
        bbox = "tight" if fig.get_layout_engine() is None else None
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches=bbox)
        plt.close(fig)
        self._register(target)
        return target

    def save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
                     ) -> Path:
        """Save tensors as ``<name>.safetensors`` (atomically; contiguous CPU copies) and record it."""
        from safetensors.torch import save_file

        target = self.out_dir / (name if name.endswith(".safetensors") else f"{name}.safetensors")
        clean: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for k, v in tensors.items():
            v = v.detach().to("cpu").contiguous()
            ptr = v.untyped_storage().data_ptr()
            if ptr in storages:  # safetensors refuses tensors sharing memory (e.g. views of one array)
                v = v.clone()
            storages.add(v.untyped_storage().data_ptr())
            clean[k] = v
        with atomic_path(target) as tmp:
            save_file(clean, str(tmp), metadata=metadata)
        self._register(target)
        return target

    def save_json(self, name: str, obj: Any) -> Path:
        from mamba_interp.utils.io import atomic_write_json

        target = self.out_dir / (name if name.endswith(".json") else f"{name}.json")
        atomic_write_json(target, obj)
        self._register(target)
        return target
