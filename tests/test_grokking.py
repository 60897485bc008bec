"""Grokking progress measures: the Fourier helpers on constructed signals, the loss identities, phase location on a
planted curve, and the issue's checks on the zoo's modadd-mamba2 snapshots."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mamba_interp import zoo
from mamba_interp.grokking import (all_pairs, analyse_run, excluded_loss, fourier_basis, frequency_energy, gini,
                                   key_frequencies, knee, locate_phases, logit_frequency_energy, project_frequencies,
                                   restricted_loss, sum_directions, top_fraction)

P = 31


@pytest.mark.parametrize("p", [31, 8])
def test_fourier_basis_is_orthonormal(p):
    basis = fourier_basis(p)
    assert basis.shape == (p, p)
    torch.testing.assert_close(basis @ basis.T, torch.eye(p, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [1, 7, 15])
def test_a_pure_frequency_embedding_has_all_its_energy_there(k):
    a = torch.arange(P, dtype=torch.float64)
    g = torch.Generator().manual_seed(k)
    mix = torch.randn(2, 16, generator=g, dtype=torch.float64)  # cos and sin of frequency k mixed into 16 dims
    emb = torch.stack([torch.cos(2 * math.pi * k * a / P), torch.sin(2 * math.pi * k * a / P)], 1) @ mix + 3.0
    energy = frequency_energy(emb)
    assert energy.shape == (P // 2 + 1,)
    assert float(energy[k] / energy.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(energy[0]) == pytest.approx(0.0, abs=1e-9)  # the constant 3.0 is centred away
    assert key_frequencies(energy) == [k] and top_fraction(energy, 1) == pytest.approx(1.0)
    assert gini(energy[1:]) == pytest.approx(1 - 1 / (P // 2))  # all mass on one of 15
    centred = emb - emb.mean(0)
    assert float(energy.sum()) == pytest.approx(float(centred.pow(2).sum()), rel=1e-12)  # Parseval


def test_key_frequencies_gini_and_top_fraction_on_planted_energies():
    energy = torch.zeros(16, dtype=torch.float64)
    energy[[3, 5, 9]] = torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)
    energy[1:] += 0.01
    assert key_frequencies(energy, 0.85) == [3, 5, 9]
    assert key_frequencies(energy, 0.85, max_k=2) == [3, 5]
    assert top_fraction(energy, 3) == pytest.approx(10.03 / 10.15)
    assert gini(torch.ones(15)) == pytest.approx(0.0, abs=1e-12)


def test_sum_directions_and_projection():
    dirs = torch.cat([sum_directions(P, k) for k in range(1, P // 2 + 1)])
    torch.testing.assert_close(dirs @ dirs.T, torch.eye(P - 1, dtype=torch.float64), atol=1e-10, rtol=0)
    a = torch.arange(P)
    s = (a[:, None] + a[None, :]).reshape(-1) % P
    g = torch.Generator().manual_seed(0)
    f = torch.randn(P, P + 1, generator=g, dtype=torch.float64)
    lg = f[s]  # logits that depend on a + b only
    lg = lg - lg.mean(0)
    torch.testing.assert_close(project_frequencies(lg, P, range(1, P // 2 + 1)), lg, atol=1e-10, rtol=0)


def test_loss_identities_on_constructed_logits():
    a = torch.arange(P)
    labels = ((a[:, None] + a[None, :]) % P).reshape(-1)
    g = torch.Generator().manual_seed(1)
    where = torch.rand(P * P, generator=g) < 0.5
    arbitrary = torch.randn(P * P, P + 1, generator=g, dtype=torch.float64) * 3
    # excluded loss with nothing removed = the plain train loss, for any logits
    assert float(excluded_loss(arbitrary, labels, P, [], where)) == pytest.approx(
        float(F.cross_entropy(arbitrary[where], labels[where])), rel=1e-12)
    # restricted loss with every frequency kept = the plain loss for logits that depend on a + b only
    f = torch.randn(P, P + 1, generator=g, dtype=torch.float64) * 3
    sym = f[labels]
    assert float(restricted_loss(sym, labels, P, range(1, P // 2 + 1))) == pytest.approx(
        float(F.cross_entropy(sym, labels)), rel=1e-10)
    # a pure frequency-k algorithm: removing k leaves uniform logits (loss log v); keeping only k loses nothing
    c = torch.arange(P + 1)
    pure = 10 * torch.cos(2 * math.pi * 4 * (labels[:, None] - c[None, :]).double() / P)
    assert float(excluded_loss(pure, labels, P, [4])) == pytest.approx(math.log(P + 1), rel=1e-9)
    assert float(restricted_loss(pure, labels, P, [4])) == pytest.approx(float(F.cross_entropy(pure, labels)),
                                                                         rel=1e-9)
    assert int(torch.argmax(logit_frequency_energy(pure, P))) == 4


def test_knee_and_phases_on_a_planted_curve():
    steps = np.arange(0, 2001, 25)
    # train accuracy 1 from step 200; test loss falls slowly, then fast from step 1200; test accuracy 1 at 1600
    log_test = np.where(steps < 1200, 1.0 - steps / 4000, 0.7 - (steps - 1200) / 100)
    x = steps[(steps >= 200) & (steps <= 1600)]
    y = log_test[(steps >= 200) & (steps <= 1600)]
    assert int(x[knee(x.astype(float), y)]) == 1200
    evals = [{"step": int(s), "train_acc": float(s >= 200), "test_acc": float(s >= 1600), "test_loss": math.exp(v)}
             for s, v in zip(steps, log_test)]
    out = locate_phases(evals)
    assert out["phases"] == {"memorisation": [0, 200], "circuit_formation": [200, 1200], "cleanup": [1200, 1600]}
    assert locate_phases([{**e, "test_acc": 0.0} for e in evals])["phases"] == {}


@pytest.fixture(scope="module")
def modadd():
    name = "modadd-mamba2"
    model, task, log = zoo.load(name), zoo.load_task(name), zoo.training_log(name)
    is_train = torch.zeros(task.p.p**2, dtype=torch.bool)
    is_train[torch.from_numpy(task.split_indices("train"))] = True
    run = analyse_run(model, log["final"]["steps_run"], zoo.snapshot_files(zoo.path(name)), task.p.p, is_train,
                      log["evals"], n_resamples=500)
    return model, task, log, is_train, run


def test_measured_losses_match_the_training_log(modadd):
    model, task, log, is_train, run = modadd
    logged = {e["step"]: e for e in log["evals"]}
    for m in run.measures:
        if m.step in logged:
            assert m.train_loss == pytest.approx(logged[m.step]["train_loss"], abs=1e-5)
            assert m.test_accuracy == pytest.approx(logged[m.step]["test_acc"], abs=1e-9)
            assert m.weight_norm_sq == pytest.approx(logged[m.step]["weight_norm_sq"], rel=1e-9)
    logits, labels = all_pairs(model, task.p.p)
    # excluded loss with no frequency removed is the model's own train loss
    assert float(excluded_loss(logits, labels, task.p.p, [], is_train)) == pytest.approx(
        log["evals"][-1]["train_loss"], rel=1e-3, abs=1e-7)


def test_modadd_key_frequencies_and_phases(modadd):
    _, task, log, _, run = modadd
    p = task.p.p
    assert run.steps == [0, 150, 500, 900, 1300, 1700, 3000]
    assert 1 <= len(run.key_frequencies) <= 8 and all(1 <= k <= p // 2 for k in run.key_frequencies)
    final, first = run.measures[-1], run.measures[0]
    frac = lambda m: sum(m.embed_energy[k] for k in run.key_frequencies) / sum(m.embed_energy[1:])  # noqa: E731
    assert frac(final) >= 0.85 and first.embed_top_fraction < 0.70
    assert final.embed_top_fraction >= 0.85
    ph = run.phases
    assert ph["memorised_at"] == 150 and ph["generalised_at"] == 1625
    assert 150 < ph["cleanup_from"] < 1625
    assert run.excluded_rise["rises"] and run.excluded_rise["to_step"] < ph["cleanup_from"]
    for m in run.measures[1:]:
        assert m.restricted_loss <= m.test_loss
