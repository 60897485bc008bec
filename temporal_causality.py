"""``from temporal_causality import ...`` from a checkout: re-exports :mod:`mamba_interp.temporal_causality`."""

from mamba_interp.temporal_causality import *  # noqa: F401,F403
from mamba_interp.temporal_causality import __all__  # noqa: F401
