"""The toy targets: the shipped TMS pentagon, the TMS model, and the residual MLP."""

from __future__ import annotations

import math

import pytest
import torch

from mamba_interp.parameter_decomposition.toy_models import (
    ResidualMLP,
    TMSModel,
    check_tms_target,
    resid_mlp_target,
    tms_5_2,
    tms_target,
    train_tms,
)


def test_shipped_target_is_a_regular_pentagon():
    W, b = tms_5_2()
    norms = W.norm(dim=0)
    assert bool(((norms > 1.1) & (norms < 1.17)).all())
    angles = torch.sort(torch.atan2(W[1], W[0])).values
    gaps = torch.diff(torch.cat([angles, angles[:1] + 2 * math.pi])) * 180 / math.pi
    assert float((gaps - 72).abs().max()) < 3
    assert bool((b < 0).all())
    target = tms_target(W, b)
    x = target.sample(20_000, torch.Generator().manual_seed(0))
    mse = float((target.model(x) - x).pow(2).mean())
    assert mse < 2.5e-3  # the paper's targets: ~1.8e-3; all-zero output ~ p/3 = 1.7e-2
    check_tms_target(W)
    with pytest.raises(ValueError, match="dead features"):
        check_tms_target(torch.cat([W[:, :4], torch.zeros(2, 1)], 1))


def test_tms_model_and_identity_variant():
    W, b = tms_5_2()
    x = torch.rand(7, 5)
    ref = torch.relu(x @ W.T @ W + b)
    torch.testing.assert_close(TMSModel(W, b)(x), ref)
    torch.testing.assert_close(TMSModel(W, b, identity=True)(x), ref)
    t = tms_target(W, b, identity=True)
    assert t.modules == ("linear1", "hidden_layers.0", "linear2") and t.tied == {"linear2": "linear1"}
    assert t.n_params == 10 + 4 + 10
    assert all(not p.requires_grad for p in t.model.parameters())


def test_resid_mlp_shapes_and_target():
    model = ResidualMLP(n_features=10, d_resid=40, d_mlp=5, n_layers=2, seed=0)
    assert torch.allclose(model.W_E.norm(dim=1), torch.ones(10))
    x = torch.randn(3, 10)
    assert model(x).shape == (3, 10)
    t = resid_mlp_target(model)
    assert t.modules == ("layers.0.mlp_in", "layers.0.mlp_out", "layers.1.mlp_in", "layers.1.mlp_out")
    batch = t.sample(1000, torch.Generator().manual_seed(0))
    assert float((batch != 0).double().mean()) == pytest.approx(0.01, abs=0.004)
    assert float(batch.min()) < 0 < float(batch.max())


@pytest.mark.slow
def test_training_reproduces_the_shipped_target():
    torch.set_num_threads(1)
    W, b = train_tms(seed=0)
    shipped_W, shipped_b = tms_5_2()
    torch.testing.assert_close(W, shipped_W, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, shipped_b, atol=1e-4, rtol=1e-4)
