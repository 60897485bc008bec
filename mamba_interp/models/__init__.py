"""Hooked Mamba-1 / Mamba-2 models, hooks, activation cache, loading and scans."""

from mamba_interp.models.cache import ActivationCache, get_act_name
from mamba_interp.models.config import MambaConfig
from mamba_interp.models.hooked_mamba import HookedMamba
from mamba_interp.models.hooks import HookError, HookPoint
from mamba_interp.models.loading import CheckpointError

__all__ = ["ActivationCache", "CheckpointError", "HookError", "HookPoint", "HookedMamba", "MambaConfig", "get_act_name"]
