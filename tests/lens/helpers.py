"""Tiny perturbed models shared by the lens tests (random weights moved off their initial values)."""

from __future__ import annotations

import torch

from mamba_interp import HookedMamba, MambaConfig
from tests.models.helpers import perturb

VOCAB = 20


def tiny_model(arch: str, seed: int = 0, n_layer: int = 2) -> HookedMamba:
    torch.manual_seed(seed)
    cfg = MambaConfig(arch=arch, d_model=32, n_layer=n_layer, vocab_size=VOCAB, d_state=8, headdim=16)
    model = HookedMamba(cfg).eval()
    perturb(model, seed=seed)
    return model


def tokens(b: int = 6, l: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, l), generator=torch.Generator().manual_seed(seed))
