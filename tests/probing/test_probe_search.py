"""The probe search over layers and hooks, the variables' rows, and the state reader, on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.probing import ProbeReport, collect_states, prepare_variables, probe_model, probe_states
from mamba_interp.tasks import get_task

SMALL = dict(max_tokens=300, n_resamples=200, ks=(1, 2, 4))


@pytest.fixture(scope="module")
def m1():
    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(d_model=16, n_layer=2, vocab_size=10, d_state=4)).eval()
    return model, get_task("induction", vocab_size=10, seq_len=16).sample(40, seed=0)


@pytest.fixture(scope="module")
def report(m1):
    model, batch = m1
    return probe_model(model, batch, [0, 1], ["resid_post", "x"], variables=["token", "after_trigger", "position"],
                       k=4, **SMALL)


def test_probe_model_fits_every_method_at_every_site(report):
    assert set(report.variables) == {"token", "after_trigger", "position"}
    assert len(report.records) == 3 * 4 * 2  # variables × (layer, hook) × methods
    widths = {"resid_post": 16, "x": 32}
    for r in report.records:
        assert r.k == (4 if r.method == "ksparse" else widths[r.hook])
        assert all(0 <= i < widths[r.hook] for i in r.support)
        assert r.score.ci_low <= r.score.value <= r.score.ci_high and r.score.n > 1
        assert r.selectivity is not None and r.control_score is not None
    # a random-init model still carries the current token in its residual stream (the embedding)
    best = report.best("token")
    assert best.score.value >= 0.9 and (best.layer, best.hook) in {(0, "resid_post"), (1, "resid_post"), (0, "x")}
    assert report.variables["position"]["task"] == "regression"
    # one sparsity curve per variable, at its best site
    assert {key[0] for key in report.curves} == set(report.variables)
    assert all(list(c) == [1, 2, 4] for c in report.curves.values())


def test_report_round_trips_through_json(report):
    import json

    coefs = {i: r.coef for i, r in enumerate(report.records)}
    again = ProbeReport.from_dict(json.loads(json.dumps(report.to_dict())), coefs)
    assert again.best_table() == report.best_table()
    assert again.support_overlap("token", 0, "x") == report.support_overlap("token", 0, "x")
    assert 0.0 <= report.support_overlap("token", 0, "x")["ridge"] <= 1.0


def test_probe_model_is_deterministic(m1, report):
    model, batch = m1
    again = probe_model(model, batch, [0, 1], ["resid_post", "x"], variables=["token", "after_trigger", "position"],
                        k=4, **SMALL)
    assert again.to_dict() == report.to_dict()


def test_prepare_variables_balances_classes_and_keeps_positions(m1):
    _, batch = m1
    data = prepare_variables(batch, names=["after_trigger", "token", "stored_value"], max_tokens=100, seed=1)
    at = data["after_trigger"]
    assert at.task == "classification" and at.rows.size <= 100
    assert (at.y == 1).sum() == 40  # the rare class (one per sequence) keeps all its tokens
    assert int(at.positions.sum()) == 40 * 16 and data["stored_value"].positions.sum() < 40 * 16
    tok = data["token"]
    assert np.array_equal(tok.types, tok.y)  # the current token is the token variable itself
    for t in np.unique(tok.types):
        assert np.unique(tok.control[tok.types == t]).size == 1
    with pytest.raises(ValueError, match="not defined"):
        prepare_variables(batch, names=["nope"])


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_collect_states_matches_the_cache(arch):
    torch.manual_seed(1)
    model = HookedMamba(MambaConfig(arch=arch, d_model=16, n_layer=2, vocab_size=10, d_state=4, headdim=8)).eval()
    tokens = torch.randint(1, 10, (7, 9))
    coords = torch.tensor([[0, 0], [6, 8], [3, 4], [3, 5], [1, 2]])
    got = collect_states(model, type("B", (), {"tokens": tokens, "attention_mask": None, "__len__": lambda s: 7})(),
                         1, coords, batch_size=3)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.mixer.hook_ssm_state")
    ref = cache["blocks.1.mixer.hook_ssm_state"][coords[:, 0], coords[:, 1]]
    assert got.shape == ref.shape and torch.allclose(got, ref.float(), atol=1e-6)


def test_probe_states_scores_every_unit_and_a_top_set(m1):
    model, batch = m1
    data = prepare_variables(batch, names=["stored_value"], max_tokens=300)
    states = probe_states(model, batch, [0], data, top=3, n_random=2)
    sp = states["stored_value"][0]
    assert sp.unit == "channel" and len(sp.importance) == 32 and len(sp.top) == 3
    assert sp.importance[sp.top[0]] == max(sp.importance) and len(sp.random_scores) == 2
    assert sp.top_score.ci_low <= sp.top_score.value <= sp.top_score.ci_high


def test_unit_scores_on_a_row_subset_equal_the_scores_on_the_copied_rows():
    """``rows=`` reads each unit's columns of those rows only (step 4's Mamba-2 states), same scores as a copy."""
    import numpy as np

    from mamba_interp.probing.search import unit_scores

    rng = np.random.default_rng(0)
    X = rng.standard_normal((90, 12)).astype(np.float32)
    rows = np.sort(rng.choice(90, 60, replace=False))
    y = X[rows, 4] * 2.0 + 0.1 * rng.standard_normal(60)  # planted: unit 1 (columns 4-7) carries y
    groups = np.arange(60) // 3
    units = [np.arange(u * 4, (u + 1) * 4) for u in range(3)]
    subset = unit_scores(X, y, units, groups, seed=1, rows=rows)
    copied = unit_scores(X[rows], y, units, groups, seed=1)
    np.testing.assert_array_equal(subset, copied)
    assert int(np.argmax(subset)) == 1 and subset[1] > 0.9
