"""mamba_interp: mechanistic interpretability for Mamba-1 and Mamba-2 selective state-space models."""

from mamba_interp.models import ActivationCache, CheckpointError, HookedMamba, HookError, HookPoint, MambaConfig

__version__ = "0.1.0"

__all__ = ["ActivationCache", "CheckpointError", "HookError", "HookPoint", "HookedMamba", "MambaConfig", "__version__"]
