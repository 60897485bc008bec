"""Resolve ``--model``: a zoo name, a local checkpoint folder, or a hub id in the local Hugging Face cache.

Every failure is a one-line :class:`UsageError` (the CLI exits with code 2), raised before the run writes anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mamba_interp.models import CheckpointError, HookedMamba
from mamba_interp.models.loading import one_line
from mamba_interp.models.tokens import TOKENIZER_FILES
from mamba_interp.pipeline.config import DEFAULT_MODEL, UsageError

FALLBACK_DEFAULT = "induction-mamba1"
TOKENIZER_KEY_FILES = ("special_tokens_map.json", "added_tokens.json", "merges.txt", "spiece.model")
"""Tokenizer files besides ``TOKENIZER_FILES`` that change how text is tokenised (hashed into resume keys)."""
CARD_FILES = ("card.json", "training_log.json", "task.json")
"""Files in a checkpoint folder that may name the task the model was trained on (``mamba-interp train`` writes
``training_log.json`` with ``{"task": {"name": ..., "params": ...}}``)."""


def import_zoo() -> Any | None:
    """The model zoo module (``mamba_interp.zoo`` or ``mamba_interp.tasks.zoo``) if installed, else None."""
    import importlib

    for name in ("mamba_interp.zoo", "mamba_interp.tasks.zoo"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name not in (name, name.rsplit(".", 1)[0]):
                raise
    return None


def task_from_card(card: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(task name, task parameters) from a zoo card or a training log; (None, {}) when it names no task."""
    task = card.get("task")
    if isinstance(task, dict):
        return task.get("name"), dict(task.get("params") or task.get("spec") or {})
    return task, dict(card.get("task_params") or {})


def default_model_name() -> str:
    zoo = import_zoo()
    return getattr(zoo, "DEFAULT", FALLBACK_DEFAULT) if zoo is not None else FALLBACK_DEFAULT


@dataclass
class ModelSource:
    """A loaded model and what is known about it.

    kind: ``"zoo"``, ``"folder"`` or ``"hub"``. task / task_params: the synthetic task the model was trained on
    (from the zoo card or a card file in the folder), or None for a language model. card: the zoo card or
    the folder's card file, as a dict.
    """

    spec: str
    kind: str
    name: str
    model: HookedMamba
    path: Path | None = None
    task: str | None = None
    task_params: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    _tokenizer: Any = field(default=None, repr=False)
    _tokenizer_error: str | None = field(default=None, repr=False)

    @property
    def is_task_model(self) -> bool:
        return self.task is not None

    def tokenizer(self) -> Any | None:
        """The model's tokenizer (``model.tokenizer``, attached by ``from_pretrained`` from its folder, offline);
        None (with :attr:`tokenizer_error`) if there is none."""
        if self._tokenizer is None and self._tokenizer_error is None:
            self._tokenizer = self.model.tokenizer
            if self._tokenizer is None:
                self._tokenizer_error = (self.model.tokenizer_error
                                         or f"{self.kind} model {self.name!r} has no tokenizer")
        return self._tokenizer

    @property
    def tokenizer_error(self) -> str | None:
        return self._tokenizer_error

    def tokenizer_fingerprint(self) -> str | None:
        """A hash of the tokenizer files in the model's folder (None without any): part of every resume key, so
        results built with other tokenizer files are recomputed."""
        if self.path is None:
            return None
        import hashlib

        h, found = hashlib.sha256(), False
        for name in sorted(set(TOKENIZER_FILES + TOKENIZER_KEY_FILES)):
            p = self.path / name
            if p.is_file():
                h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
                found = True
        return h.hexdigest()[:16] if found else None

    def describe(self) -> dict[str, Any]:
        cfg = self.model.cfg
        return {
            "spec": self.spec, "kind": self.kind, "name": self.name, "path": str(self.path) if self.path else None,
            "arch": cfg.arch, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "d_inner": cfg.d_inner,
            "d_state": cfg.d_state, "vocab_size": cfg.vocab_size, "n_params": self.model.n_params(),
            "task": self.task, "task_params": self.task_params, "card": self.card,
        }


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "model"


def _read_card(folder: Path) -> dict[str, Any]:
    for name in CARD_FILES:
        p = folder / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                if name == "training_log.json":  # keep the card small: the task, not every loss value
                    return {k: data[k] for k in ("task", "final", "train_config", "n_params") if k in data}
                return data
    return {}


def load_model_source(spec: str, task: str | None = None, dtype: torch.dtype | None = None) -> ModelSource:
    """Load the model named by ``spec`` on the CPU (the runner moves it to the run's device)."""
    if spec == DEFAULT_MODEL:
        spec = default_model_name()
    zoo = import_zoo()
    zoo_names = list(zoo.names()) if zoo is not None else []
    if spec in zoo_names:
        try:
            model = zoo.load(spec)
            info = dict(zoo.info(spec))
        except Exception as exc:
            raise UsageError(f"zoo model {spec!r} failed to load: {one_line(exc)}") from None
        if not isinstance(model, HookedMamba):
            raise UsageError(
                f"zoo model {spec!r} is a {type(model).__name__}, not a Mamba model; the pipeline analyses Mamba "
                "models (pick a mamba1/mamba2 entry of the zoo)"
            )
        task_name, task_params = task_from_card(info)
        src = ModelSource(spec, "zoo", spec, model, task=task_name, task_params=task_params, card=info)
    else:
        path = Path(spec).expanduser()
        looks_like_hub = bool(re.fullmatch(r"[\w.-]+/[\w.-]+", spec)) and not path.exists()
        if not path.exists() and not looks_like_hub:
            known = ", ".join(zoo_names) if zoo_names else ("no models shipped" if zoo is not None else
                                                            "mamba_interp.zoo is not installed")
            raise UsageError(
                f"unknown model {spec!r}: not a zoo model (zoo: {known}), not an existing folder, and not a hub id "
                "(owner/name); pass one of those to --model"
            )
        if path.exists() and not path.is_dir():
            raise UsageError(f"model path {spec!r} is a file; pass the checkpoint folder that holds config.json")
        try:
            model = HookedMamba.from_pretrained(path if path.exists() else spec)
        except (CheckpointError, OSError, ValueError) as exc:
            raise UsageError(f"cannot load model {spec!r}: {one_line(exc)}") from None
        folder = path if path.exists() else Path(str(model.cfg.extra.get("source", ""))) or None
        card = _read_card(folder) if folder is not None and folder.is_dir() else {}
        name = path.resolve().name if path.exists() else spec
        task_name, task_params = task_from_card(card)
        src = ModelSource(spec, "folder" if path.exists() else "hub", _safe_name(name), model,
                          path=folder if folder and folder.is_dir() else None,
                          task=task_name, task_params=task_params, card=card)
    if task is not None:  # an explicit --task wins over a card
        src.task = task
        if task != task_from_card(src.card)[0]:
            src.task_params = {}
    if src.task is not None:
        _bind_tokenizer(src)
        _check_task(src)
    if dtype is not None:
        src.model.to(dtype=dtype)
    src.model.eval()
    return src


def _needs_tokenizer(task: str) -> bool:
    """Whether ``task`` is a prompt set built with the model's tokenizer (``tasks.text.TextTask``)."""
    from mamba_interp.tasks.text import TextTask

    todo = [TextTask]
    while todo:
        cls = todo.pop()
        if getattr(cls, "name", None) == task:
            return True
        todo += cls.__subclasses__()
    return False


def _bind_tokenizer(src: ModelSource) -> None:
    """A text task (``--task ioi`` on a language model) gets the model folder's tokenizer."""
    if "tokenizer" in src.task_params or not _needs_tokenizer(src.task):
        return
    if src.tokenizer() is None:
        raise UsageError(f"task {src.task!r} needs the model's tokenizer, but {src.tokenizer_error}; put the "
                         "tokenizer files (tokenizer.json, ...) in the model folder or choose another --task")
    src.task_params = {**src.task_params, "tokenizer": str(src.path)}


def _check_task(src: ModelSource) -> None:
    try:
        from mamba_interp.tasks import get_task
    except ImportError:
        raise UsageError(
            f"model {src.spec!r} needs task {src.task!r}, but mamba_interp.tasks is not installed"
        ) from None
    try:
        task = get_task(src.task, **src.task_params)
    except ValueError as exc:
        raise UsageError(f"task {src.task!r} for model {src.spec!r}: {one_line(exc)}") from None
    if task.vocab_size > src.model.cfg.vocab_size:
        raise UsageError(
            f"task {src.task!r} uses {task.vocab_size} tokens but model {src.spec!r} has only "
            f"{src.model.cfg.vocab_size}; pick a task that fits the model's vocabulary"
        )
