"""mamba_interp: mechanistic interpretability for Mamba-1 and Mamba-2 selective state-space models.

The names below are imported on first use, so ``import mamba_interp.cli`` (the command line) starts without
torch and can install its signal handlers before any heavy import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_FROM_MODELS = ("ActivationCache", "CheckpointError", "HookError", "HookPoint", "HookedMamba", "MambaConfig")

__all__ = [*_FROM_MODELS, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from mamba_interp.models import ActivationCache, CheckpointError, HookedMamba, HookError, HookPoint, MambaConfig


def __getattr__(name: str) -> Any:
    if name in _FROM_MODELS:
        value = getattr(importlib.import_module("mamba_interp.models"), name)
    elif not name.startswith("__"):
        try:  # a subpackage used as an attribute (``mamba_interp.models.X`` after ``import mamba_interp``)
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM_MODELS))
