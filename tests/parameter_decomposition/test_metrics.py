"""Decomposition metrics on planted decompositions (perfect, shrunk, with the dead-subcomponent pitfall)."""

from __future__ import annotations

import pytest
import torch

from mamba_interp.parameter_decomposition.metrics import (
    alive,
    ci_l0,
    dense_ci_error,
    feature_match,
    identity_ci_error,
    n_large,
)
from mamba_interp.parameter_decomposition.toy_models import tms_5_2


def planted_components(W: torch.Tensor, scale: float = 1.0, dead: bool = True) -> torch.Tensor:
    """P [C, o, n]: component j = scale · W[:, j] e_jᵀ for every feature, plus (``dead``) near-zero components
    exactly aligned with the features (cosine 1, norm 1e-5) that a cosine-only argmax would pick."""
    m, n = W.shape
    P = torch.zeros(2 * n if dead else n, m, n)
    for j in range(n):
        P[j, :, j] = scale * W[:, j]
        if dead:
            P[n + j, :, j] = 1e-5 * W[:, j] / W[:, j].norm()
    return P


def test_feature_match_perfect_shrunk_and_dead_pitfall():
    W, _ = tms_5_2()
    fm = feature_match(planted_components(W), W)
    assert fm.mmcs == pytest.approx(1.0) and fm.ml2r == pytest.approx(1.0) and fm.best == list(range(5))
    # the reference analyser's cosine argmax can pick a dead copy (norm 1e-5) and read ML2R ~0 for that feature
    dead_wins = planted_components(W)
    dead_wins[5:] = dead_wins[5:] + 1e-9 * torch.randn_like(dead_wins[5:])
    dead_wins[0, 1, 0] += 1e-3  # the real component is now slightly off the feature's direction
    fm2 = feature_match(dead_wins, W)
    assert fm2.best[0] == 0 and fm2.ml2r == pytest.approx(1.0, abs=1e-3) and fm2.ml2r_cosine_argmax < 0.85
    assert feature_match(planted_components(W, 0.9), W).ml2r == pytest.approx(0.9)
    # a rotated (wrong) decomposition: lower MMCS
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    assert feature_match(planted_components(rot @ W, dead=False), W).mmcs < 0.7


def test_identity_and_dense_ci_errors():
    eye = torch.zeros(5, 20)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))[:5]
    eye[torch.arange(5), perm] = 1.0
    assert identity_ci_error(eye) == 0
    noisy = eye.clone()
    noisy[0, perm[1]] = 0.5  # one off-diagonal entry
    noisy[2, perm[2]] = 0.7  # one weak diagonal entry
    assert identity_ci_error(noisy) == 2
    dense = torch.zeros(5, 20)
    dense[:, [3, 7]] = 1.0
    assert dense_ci_error(dense, 2) == 0
    assert dense_ci_error(dense, 3) == 1
    dense[0, 9] = 0.4
    assert dense_ci_error(dense, 2) == 1
    with pytest.raises(ValueError, match="at least as many"):
        identity_ci_error(torch.zeros(5, 3))


def test_alive_l0_and_large_counts():
    ci = torch.tensor([[0.0, 0.6, 0.05], [0.2, 0.0, 0.0]])
    assert alive(ci, 0.1).tolist() == [True, True, False]
    assert alive(ci, 0.5).tolist() == [False, True, False]
    assert ci_l0(ci, 0.1) == pytest.approx(1.0)
    assert ci_l0(ci, 0.1, torch.tensor([True, False])) == pytest.approx(1.0)
    assert n_large(torch.tensor([1.0, 0.5, 0.29, 0.0])) == 2
