"""Companion models of a run: the other models the cross-model steps (9 equivalence, 10 universality, 14 scaling)
compare the analysed model with.

* A zoo model's companions come from the zoo cards: the other members of its ``family`` (same task and
  architecture; other sizes and other seeds) and the transformer baselines trained on the same task with the same
  parameters (``arch == "transformer"``).
* ``RunConfig.compare`` (``--compare MODEL[,MODEL...]``) names them explicitly — zoo names, checkpoint folders
  (HookedMamba or the GPT-2 baseline format) or hub ids; when given, it replaces the zoo family. A folder or hub
  model has companions only this way.

:func:`resolve_companions` only reads cards and configs; :meth:`Companion.load` loads one model (a step loads
them one at a time and drops each before the next, to bound memory). Each companion has a ``role`` relative to
the analysed model: ``"seed"`` (same architecture and size, another seed), ``"size"`` (same architecture, another
size), ``"transformer"`` or ``"other"``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.model_source import ModelSource, import_zoo, task_from_card

# model_config keys that describe the training seed or bookkeeping, not the architecture (two seeds of one recipe
# differ in none of the others)
_SIZE_KEYS = ("arch", "d_model", "n_layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "vocab_size",
              "n_embd", "n_head", "n_positions")


@dataclass(frozen=True)
class Companion:
    """One model to compare with: how to load it and what its card says."""

    spec: str
    name: str
    kind: str  # "zoo", "folder" or "hub"
    role: str
    arch: str | None
    n_params: int | None = None
    seed: int | None = None
    task: str | None = None
    task_params: dict[str, Any] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_transformer(self) -> bool:
        return self.arch == "transformer"

    def load(self) -> nn.Module:
        """The model in eval mode on the CPU: a ``HookedMamba`` or a ``TransformerBaseline``."""
        zoo = import_zoo()
        if self.kind == "zoo":
            return zoo.load(self.spec)
        if self.kind == "folder":
            from mamba_interp.tasks.zoo import load_checkpoint

            return load_checkpoint(self.spec).eval()
        from mamba_interp.models import HookedMamba

        return HookedMamba.from_pretrained(self.spec).eval()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "kind": self.kind, "role": self.role, "arch": self.arch,
                "n_params": self.n_params, "seed": self.seed, "d_model": size_of(self.card).get("d_model")}


def size_of(card: dict[str, Any]) -> dict[str, Any]:
    """The architecture fields of a card's ``model_config`` (or of a config.json)."""
    cfg = card.get("model_config") or card.get("config") or {}
    return {k: cfg[k] for k in _SIZE_KEYS if k in cfg}


def _role(card: dict[str, Any], primary: dict[str, Any]) -> str:
    arch = card.get("arch") or size_of(card).get("arch")
    if arch == "transformer" or size_of(card).get("n_embd") is not None:
        return "transformer"
    p_arch = primary.get("arch") or size_of(primary).get("arch")
    if arch != p_arch or task_from_card(card) != task_from_card(primary):
        return "other"
    return "seed" if size_of(card) == size_of(primary) else "size"


def _folder_card(path: Path) -> dict[str, Any]:
    """A folder's card (card.json or training_log.json, as the model source reads them) plus its config.json."""
    from mamba_interp.pipeline.model_source import _read_card

    card = dict(_read_card(path))
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError):
            cfg = {}
        ours = cfg.get("mamba_interp_config") or {}  # HookedMamba.save_pretrained keeps its own fields here
        card.setdefault("model_config", ours or cfg)
        if cfg.get("model_type") == "gpt2":
            card.setdefault("arch", "transformer")
        elif "arch" in ours:
            card.setdefault("arch", ours["arch"])
    train_cfg = card.get("train_config") or {}
    card.setdefault("seed", train_cfg.get("seed"))
    return card


def _companion(spec: str, primary_card: dict[str, Any], zoo_names: Sequence[str]) -> Companion:
    zoo = import_zoo()
    if spec in zoo_names:
        card, kind, name = zoo.info(spec), "zoo", spec
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            card, kind, name = _folder_card(path), "folder", path.resolve().name
        elif "/" in spec and not path.exists():
            card, kind, name = {}, "hub", spec
        else:
            raise UsageError(f"--compare model {spec!r} is neither a zoo model ({', '.join(zoo_names)}), a checkpoint "
                             "folder nor a hub id; pass one of those")
    task, params = task_from_card(card)
    return Companion(spec=str(spec), name=name, kind=kind, role=_role(card, primary_card),
                     arch=card.get("arch") or size_of(card).get("arch"), n_params=card.get("n_params"),
                     seed=card.get("seed"), task=task, task_params=params, card=card)


def resolve_companions(source: ModelSource, compare: Sequence[str] = ()) -> list[Companion]:
    """The companions of the analysed model ``source`` (see the module docstring), the analysed model excluded."""
    zoo = import_zoo()
    zoo_names = list(zoo.names()) if zoo is not None else []
    primary = dict(source.card or {})
    primary.setdefault("arch", source.model.cfg.arch)
    primary.setdefault("model_config", source.model.cfg.to_dict())
    if source.task is not None and "task" not in primary:
        primary["task"], primary["task_params"] = source.task, dict(source.task_params)
    specs: list[str] = list(compare)
    if not specs and source.kind == "zoo" and zoo is not None:
        fam = primary.get("family")
        if fam:
            specs += zoo.family(fam)
        task = task_from_card(primary)
        specs += [n for n in zoo_names if zoo.info(n).get("arch") == "transformer"
                  and task_from_card(zoo.info(n)) == task]
    out: list[Companion] = []
    seen = {source.name, source.spec}
    for spec in dict.fromkeys(specs):
        if spec in seen:
            continue
        c = _companion(spec, primary, zoo_names)
        if source.path is not None and c.kind == "folder" and Path(c.spec).resolve() == Path(source.path).resolve():
            continue
        out.append(c)
    return out


def no_companions_reason(source: ModelSource, wanted: str) -> str:
    """The skip reason of a cross-model step that found no companion of the kind it needs."""
    how = ("the zoo has none for this model" if source.kind == "zoo"
           else f"a {source.kind} model has companions only through --compare")
    return f"no {wanted} to compare with ({how}); name some with --compare MODEL[,MODEL...]"
