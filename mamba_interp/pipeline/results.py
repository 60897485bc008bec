"""What a run records: the per-step records of ``manifest.json`` and each step's ``result.json``.

``result.json`` is written atomically, only when the step ends, so a run killed mid-step leaves no result that
looks complete. :meth:`ResultStore.matching` reads a result back for ``--resume``: it is reused only when it is
``completed`` for the same result-relevant config (``RunConfig.result_key``), model fingerprint, step version and
layers.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mamba_interp.pipeline.registry import Step
from mamba_interp.utils.io import atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mamba_interp.pipeline.config import RunConfig
    from mamba_interp.pipeline.context import StepContext, StepResult

MANIFEST_FORMAT = "mamba_interp.run/1"


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), "")


@dataclass
class StepRecord:
    """The runner's view of one step in this run (mirrored in ``manifest.json``)."""

    step: Step
    status: str = "pending"  # pending | running | completed | failed | skipped | interrupted
    duration_s: float | None = None
    resumed: bool = False
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step.number, "name": self.step.name, "title": self.step.title, "status": self.status,
                "duration_s": self.duration_s, "resumed": self.resumed, "reason": self.reason,
                "folder": self.step.folder_name}


@dataclass
class RunSummary:
    out_dir: Path
    report: Path | None
    records: dict[int, StepRecord] = field(default_factory=dict)

    @property
    def failed(self) -> list[int]:
        return [n for n, r in self.records.items() if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def options_dict(options: Any) -> dict[str, Any] | None:
    if options is None:
        return None
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)


class ResultStore:
    """The ``step_NN_<name>/result.json`` files of one run (its config, model fingerprint and layers)."""

    def __init__(self, out_dir: Path, config: RunConfig, fingerprint: str, layers: tuple[int, ...]) -> None:
        self.out_dir = out_dir
        self.config = config
        self.fingerprint = fingerprint
        self.layers = layers

    def path(self, step: Step) -> Path:
        return self.out_dir / step.folder_name / "result.json"

    def matching(self, step: Step) -> dict[str, Any] | None:
        """The step's completed ``result.json`` if it was computed for this config, model and step version."""
        path = self.path(step)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        ok = (data.get("status") == "completed" and data.get("result_key") == self.config.result_key()
              and data.get("model_fingerprint") == self.fingerprint and data.get("step_version") == step.version
              and data.get("layers") == list(self.layers))
        return data if ok else None

    def write(self, step: Step, status: str, started: str, duration: float, result: StepResult | None,
              ctx: StepContext | None, fallbacks: list[dict], device: torch.device, error: dict | None = None,
              reason: str | None = None) -> None:
        """Write the step's ``result.json`` atomically; ``device`` is the run's (used when there is no ``ctx``)."""
        artifacts: list[str] = []
        if result is not None:
            artifacts = list(dict.fromkeys((ctx._artifacts if ctx else []) + list(result.artifacts)))
        payload = {
            "step": step.number,
            "name": step.name,
            "title": step.title,
            "status": status,
            "duration_s": round(duration, 3),
            "started_at": started,
            "finished_at": now(),
            "config": self.config.to_dict(),
            "result_key": self.config.result_key(),
            "model_fingerprint": self.fingerprint,
            "step_version": step.version,
            "requires": list(step.requires),
            "layers": list(self.layers),
            "options": options_dict(ctx.options if ctx else None),
            "device": str(ctx.device) if ctx else str(device),
            "batch_size": ctx.batch_size if ctx else self.config.batch_size,
            "fallbacks": fallbacks,
            "metrics": result.metrics if result else {},
            "artifacts": artifacts,
            "reading": result.reading if result else "",
            "reason": reason,
            "error": error,
        }
        atomic_write_json(self.path(step), payload)
