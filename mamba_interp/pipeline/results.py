"""What a run records: the per-step records of ``manifest.json`` and each step's ``result.json``.

``result.json`` is written atomically, only when the step ends, so a run killed mid-step leaves no result that
looks complete. :meth:`ResultStore.matching` reads a result back for ``--resume``: it is reused only when it is
``completed`` and its ``result_key`` is the step's key in this run (``resume_key.py``).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mamba_interp.pipeline.registry import Step
from mamba_interp.pipeline.resume_key import ResumeKeys, options_dict, stale_parts
from mamba_interp.utils.io import atomic_write_json

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from mamba_interp.pipeline.config import RunConfig
    from mamba_interp.pipeline.context import StepContext, StepResult

MANIFEST_FORMAT = "mamba_interp.run/1"

logger = logging.getLogger("mamba_interp.pipeline")


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
    peak_rss_mb: float | None = None
    """Peak resident memory of the process while the step ran (Linux; ``resources.peak_rss``)."""
    cpu_s: float | None = None
    """CPU time of the process (all threads) while the step ran: the cost independent of other load."""

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step.number, "name": self.step.name, "title": self.step.title, "status": self.status,
                "duration_s": self.duration_s, "cpu_s": self.cpu_s, "peak_rss_mb": self.peak_rss_mb,
                "resumed": self.resumed,
                "reason": self.reason, "folder": self.step.folder_name}


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


class ResultStore:
    """The ``step_NN_<name>/result.json`` files of one run, and what makes a stored one reusable."""

    def __init__(self, out_dir: Path, config: RunConfig, fingerprint: str, layers: tuple[int, ...],
                 keys: ResumeKeys) -> None:
        self.out_dir = out_dir
        self.config = config
        self.fingerprint = fingerprint
        self.layers = layers
        self.keys = keys

    def path(self, step: Step) -> Path:
        return self.out_dir / step.folder_name / "result.json"

    def read(self, step: Step) -> dict[str, Any] | None:
        """The step's ``result.json`` as a dict; None when it is missing or unreadable."""
        try:
            data = json.loads(self.path(step).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def belongs(self, step: Step, data: dict[str, Any] | None) -> bool:
        """Whether a stored result (any status) was computed for exactly what this run gives the step."""
        return data is not None and data.get("result_key") == self.keys.key(step)

    def matching(self, step: Step) -> dict[str, Any] | None:
        """The step's completed ``result.json`` if its key is the step's key in this run."""
        data = self.read(step)
        if data is None:
            return None
        if data.get("status") == "completed" and self.belongs(step, data):
            return data
        if data.get("status") == "completed":
            logger.info("%s: result.json is stale (changed: %s)", step.label,
                        ", ".join(stale_parts(data.get("key_inputs"), self.keys.inputs(step))) or "?")
        return None

    def write(self, step: Step, status: str, started: str, duration: float, result: StepResult | None,
              ctx: StepContext | None, fallbacks: list[dict], device: torch.device, error: dict | None = None,
              reason: str | None = None, peak_rss_mb: float | None = None, cpu_s: float | None = None) -> None:
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
            "cpu_s": cpu_s,
            "peak_rss_mb": peak_rss_mb,
            "started_at": started,
            "finished_at": now(),
            "config": self.config.to_dict(),
            "result_key": self.keys.key(step),
            "key_inputs": self.keys.inputs(step),
            "model_fingerprint": self.fingerprint,
            "step_version": step.version,
            "requires": list(step.requires),
            "layers": list(self.layers),
            "options": options_dict(self.keys.options.get(step.number)),
            "device": str(ctx.device) if ctx else str(device),
            "batch_size": ctx._batch_size if ctx else self.config.batch_size,
            "fallbacks": fallbacks,
            "metrics": result.metrics if result else {},
            "artifacts": artifacts,
            "reading": result.reading if result else "",
            "reason": reason,
            "error": error,
        }
        atomic_write_json(self.path(step), payload)
