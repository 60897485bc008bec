"""The resume key of a step: a hash of everything its result depends on, and nothing else.

A step's key covers the config fields it reads (``Step.key_fields``: its ``register_step(reads=...)`` plus
``ALWAYS_READ``), its version and options, the model (weights fingerprint; task, task parameters, card and
tokenizer of its source), and the keys of the steps it requires, so everything they depend on transitively.
``--resume`` reuses a ``result.json`` only when its ``result_key`` equals the step's key; changing one step's
option therefore recomputes that step and the steps that require it, never the ones it requires.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mamba_interp.pipeline.registry import Step, get_step

if TYPE_CHECKING:  # pragma: no cover
    from mamba_interp.pipeline.config import RunConfig
    from mamba_interp.pipeline.model_source import ModelSource


def digest(obj: Any) -> str:
    """A short, stable hash of a JSON-able object."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def options_dict(options: Any) -> dict[str, Any] | None:
    if options is None:
        return None
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)


def source_identity(source: ModelSource) -> dict[str, Any]:
    """What a step may read about the model besides its weights: the task it was trained on (or was given), the
    card, and the tokenizer files."""
    return {"task": source.task, "task_params": source.task_params, "card": digest(source.card),
            "tokenizer": source.tokenizer_fingerprint()}


class ResumeKeys:
    """The resume keys of one run's steps (computed on demand, each once)."""

    def __init__(self, config: RunConfig, options: Mapping[int, Any], fingerprint: str, layers: tuple[int, ...],
                 source: ModelSource) -> None:
        self.config = config
        self.options = options
        self.fingerprint = fingerprint
        self.layers = layers
        self.source = source_identity(source)
        self._inputs: dict[int, dict[str, Any]] = {}

    def inputs(self, step: Step) -> dict[str, Any]:
        """What the key of ``step`` hashes (stored next to it in ``result.json``, to say why a result is stale)."""
        if step.number not in self._inputs:
            values = self.config.to_dict()
            fields = {f: (list(self.layers) if f == "layers" else values[f]) for f in step.key_fields}
            self._inputs[step.number] = {
                "step": step.number, "version": step.version, "fields": fields,
                "options": options_dict(self.options.get(step.number)), "model": self.fingerprint,
                "source": self.source, "requires": {str(r): self.key(get_step(r)) for r in step.requires},
            }
        return self._inputs[step.number]

    def key(self, step: Step) -> str:
        return digest(self.inputs(step))


def stale_parts(stored: Any, current: Mapping[str, Any]) -> list[str]:
    """The parts of a key's inputs that differ between a stored ``result.json`` and this run (for the log)."""
    if not isinstance(stored, Mapping):
        return ["key inputs (not recorded)"]
    current = json.loads(json.dumps(current, default=str))  # compare as stored: tuples become lists
    parts = []
    for name, value in current.items():
        old = stored.get(name)
        if isinstance(value, Mapping) and isinstance(old, Mapping) and name in ("fields", "source", "requires"):
            parts += [f"{name}.{k}" for k in sorted(set(value) | set(old)) if value.get(k) != old.get(k)]
        elif old != value:
            parts.append(name)
    return parts
