"""Re-export of :mod:`mamba_interp.activation_patching`, so ``from activation_patching import ...`` works from a
checkout (beside ``mamba_mechanistic_analysis.py``)."""

from mamba_interp.activation_patching import *  # noqa: F401,F403
from mamba_interp.activation_patching import __all__  # noqa: F401
