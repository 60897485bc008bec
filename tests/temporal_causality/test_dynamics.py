"""Timescales, Δ selectivity, effective rank, participation ratio, attention-row sparsity, gates and decay groups
against closed forms and planted data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.temporal_causality import (
    cluster_decays,
    decay_timescales,
    delta_selectivity,
    effective_rank,
    gate_stats,
    participation_ratio,
    row_sparsity,
    tokens_for_mass,
)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_timescales_of_a_constant_step(arch):
    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(arch=arch, d_model=16, n_layer=1, vocab_size=8, d_state=4, headdim=8))
    mix = model.blocks[0].mixer
    k = mix.dt_bias.numel() if arch == "mamba2" else model.cfg.d_inner
    dt = torch.full((50, k), 0.2, dtype=torch.float64)
    ts = decay_timescales(model, {0: dt})[0]
    absA = torch.exp(mix.A_log.detach().double())
    slow = absA if arch == "mamba2" else absA.min(1).values
    np.testing.assert_allclose(ts.tau, np.broadcast_to(1 / (0.2 * slow.numpy()), (3, k)), rtol=1e-12)
    np.testing.assert_allclose(ts.half_life, math.log(2) / (0.2 * slow.numpy()), rtol=1e-12)
    np.testing.assert_allclose(ts.decay[1], np.exp(-0.2 * slow.numpy()), rtol=1e-12)
    bias = mix.dt_bias if arch == "mamba2" else mix.dt_proj.bias
    np.testing.assert_allclose(ts.resting, 1 / (F.softplus(bias.detach().double()).numpy() * slow.numpy()),
                               rtol=1e-12)
    assert ts.long_memory_fraction(0) == 1.0
    with pytest.raises(ValueError, match="units"):
        decay_timescales(model, {0: dt[:, :3]})


def test_timescale_quantiles_are_ordered():
    torch.manual_seed(1)
    model = HookedMamba(MambaConfig(d_model=16, n_layer=1, vocab_size=8, d_state=4))
    ts = decay_timescales(model, {0: torch.rand(200, 32) * 0.5 + 0.01})[0]
    assert bool((np.diff(ts.tau, axis=0) >= 0).all()) and bool((np.diff(ts.decay, axis=0) >= 0).all())


def test_delta_selectivity_recovers_a_planted_ratio_and_its_control_does_not():
    g = torch.Generator().manual_seed(0)
    dt = torch.rand(64, 40, 6, generator=g) + 0.5  # (b, l, k)
    relevant = torch.zeros(64, 40, dtype=torch.bool)
    relevant[:, ::5] = True
    dt[relevant] *= torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0, 0.5])  # units 0-2 doubled, 5 halved
    sel = delta_selectivity(dt, relevant, seed=0)
    np.testing.assert_allclose(sel["log_ratio"], np.log([2, 2, 2, 1, 1, 0.5]), atol=0.05)
    assert sel["mean"]["ci"][0] < np.mean(np.log([2, 2, 2, 1, 1, 0.5])) < sel["mean"]["ci"][1]
    assert sel["control_mean"]["ci"][0] < 0 < sel["control_mean"]["ci"][1]
    assert {t["unit"] for t in sel["top"][:4]} == {0, 1, 2, 5}
    assert sel["fraction_above_control"] == pytest.approx(4 / 6)
    assert all(t["ci"][0] < t["log_ratio"] < t["ci"][1] for t in sel["top"])
    with pytest.raises(ValueError, match="at least 2 sequences"):
        delta_selectivity(dt[:1], relevant[:1])


def test_effective_rank_and_participation_ratio_identities():
    assert float(effective_rank(torch.eye(16))) == pytest.approx(16, abs=1e-10)
    rank1 = torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 9.0))
    assert float(effective_rank(rank1)) == pytest.approx(1, abs=1e-6)
    assert math.isnan(float(effective_rank(torch.zeros(3, 3))))
    x = torch.randn(20000, 16, generator=torch.Generator().manual_seed(0))
    assert participation_ratio(x) == pytest.approx(16, abs=0.1)
    assert participation_ratio(x[:, :1] * torch.ones(1, 16)) == pytest.approx(1, abs=1e-6)


def test_row_sparsity_identities():
    l = 64
    t = torch.tensor([63, 63, 63, 9])
    rows = torch.zeros(4, l)
    rows[0] = 1.0  # uniform
    rows[1, 5] = 3.0  # one-hot
    rows[2, :8] = 1.0  # 8 equal sources
    rows[3, :10] = 1.0
    rows[3, 20:] = 7.0  # beyond t = 9: ignored
    sp = row_sparsity(rows, t)
    assert float(sp["gini"][0]) == pytest.approx(0, abs=1e-12) and float(sp["entropy"][0]) == pytest.approx(1)
    assert float(sp["gini"][1]) == pytest.approx(1 - 1 / 64, abs=1e-12)  # 0.9844
    assert float(sp["top_mass"][1]) == pytest.approx(1) and float(sp["top_mass"][2]) == pytest.approx(5 / 8)
    assert float(sp["gini"][3]) == pytest.approx(0, abs=1e-12) and float(sp["entropy"][3]) == pytest.approx(1)
    assert math.isnan(float(row_sparsity(torch.ones(1, 4), torch.tensor([0]))["entropy"][0]))
    assert tokens_for_mass(rows[:3], 0.9).tolist() == [58, 1, 8]


def test_gates_and_decay_groups():
    gate = torch.cat([torch.full((10, 4), 0.01), torch.full((10, 4), 0.8)], 1)  # head 0 closed, head 1 open
    gs = gate_stats(gate, heads=2)
    assert gs["closed_fraction"].tolist() == [1.0, 0.0] and gs["mean"].tolist() == pytest.approx([0.01, 0.8])
    decays = np.array([0.7, 0.71, 0.69, 0.9, 0.91, 0.98, 0.985, 0.979, 0.981])
    labels, groups = cluster_decays(decays, 3, seed=0)
    assert [g["count"] for g in groups] == [3, 2, 4] and labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert groups[0]["center"] == pytest.approx(0.7) and groups[2]["min"] == pytest.approx(0.979)
    _, one = cluster_decays(np.full(4, 0.5), 3)
    assert len(one) == 1 and one[0]["count"] == 4
