"""Sparse autoencoders, importable from a checkout: ``from sparse_autoencoder import SAEConfig, train_sae, ...``
(everything :mod:`mamba_interp.sparse_autoencoder` exports, re-exported)."""

from mamba_interp import sparse_autoencoder as _package
from mamba_interp.sparse_autoencoder import *  # noqa: F403  (the package's __all__)

__all__ = list(_package.__all__)
