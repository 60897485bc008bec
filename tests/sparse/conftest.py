"""Shared planted-feature data and SAEs trained once per session.

d = 64, n = 128 unit-norm true features, E[L0] = 3 (c ~ U(0, 1) when on), SAE width m = 256, batch 512.
Training uses 200k samples (several epochs); evaluation uses 20k fresh samples of the same dictionary.
"""

from __future__ import annotations

import pytest
import torch

from mamba_interp.sparse_autoencoder import PlantedData, SAEConfig, planted_features, train_sae
from tests.sparse.helpers import L0, N_TRUE, RECIPES, WIDTH, D


@pytest.fixture(scope="session")
def planted() -> PlantedData:
    return planted_features(N_TRUE, D, 200_000, l0=L0, seed=0)


@pytest.fixture(scope="session")
def planted_eval(planted: PlantedData) -> PlantedData:
    """20k fresh samples from the same true dictionary."""
    gen = torch.Generator().manual_seed(12345)
    on = torch.rand(20_000, N_TRUE, generator=gen) < L0 / N_TRUE
    codes = torch.rand(20_000, N_TRUE, generator=gen) * on
    return PlantedData(features=planted.features, codes=codes, activations=codes @ planted.features)


@pytest.fixture(scope="session")
def planted_sae(planted: PlantedData):
    """``planted_sae(name)`` trains the recipe once per session and caches it."""
    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = train_sae(
                planted.activations, SAEConfig(d_in=D, d_sae=WIDTH, seed=0, batch_size=512, **RECIPES[name])
            )
        return cache[name]

    return get
