"""Model profiles (``pipeline/profiles.py``) and the recurrence of probes across two profiles (step 10): the probe
part against a refit of the search's own probes, and the recurrence measures against a planted permutation of a
model's dimensions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.pipeline import profiles as P
from mamba_interp.pipeline.steps.s10_universality import circuit_recurrence, circuit_site_overlap, probe_recurrence
from mamba_interp.probing import probe_model
from mamba_interp.tasks import get_task


@pytest.fixture(scope="module")
def probed():
    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(arch="mamba1", d_model=16, n_layer=1, vocab_size=16, d_state=4)).eval()
    batch = get_task("induction", vocab_size=16, seq_len=16).sample(24, 0, split="test")
    settings = P.ProfileSettings(probe_k=4, probe_tokens=200)
    return model, batch, settings, P.probe_profile(model, batch, settings)


def test_probe_profile_matches_the_search(probed):
    model, batch, settings, prof = probed
    report = probe_model(model, batch, [0], list(settings.probe_hooks), methods=("ksparse",), ks=(4,), k=4,
                         control=False, seed=settings.seed, max_tokens=200, n_resamples=200)
    assert prof["best"] == report.best_table()
    assert set(prof["widths"]) == {"0.resid_post", "0.x", "0.y"} and prof["widths"]["0.x"] == 32
    assert prof["acts"]["0.x"].shape == (24 * 16, 32)
    for var, (task, sums) in prof["heldout"].items():
        # the refitted best probe reproduces the search's score from its per-sequence statistics
        assert 1.0 - P.probe_error(task, sums) == pytest.approx(prof["best"][var]["score"], abs=1e-12)
        assert sums.shape[0] >= 2  # one row per held-out sequence


def _permuted(prof, seed):
    """The same model with the dimensions of every site permuted: b's column j is a's column perm[j]."""
    rng = np.random.default_rng(seed)
    perms = {s: rng.permutation(w) for s, w in prof["widths"].items()}
    inv = {s: np.argsort(p) for s, p in perms.items()}
    acts = {s: a[:, perms[s]] for s, a in prof["acts"].items()}
    supports = {v: {s: sorted(int(inv[s][i]) for i in sup) for s, sup in row.items()}
                for v, row in prof["supports"].items()}
    best = {v: {**b, "support": supports[v][f"{b['layer']}.{b['hook']}"]} for v, b in prof["best"].items()}
    return {**prof, "acts": acts, "supports": supports, "best": best}


def test_probe_recurrence_of_a_permuted_copy_is_complete(probed):
    prof = probed[3]
    res = probe_recurrence(prof, _permuted(prof, 1), threshold=0.6, n_null=200)
    sites = res["probe_sites"]
    assert sites["observed"] == 1.0 and sites["decoded_a"] == sites["decoded_b"] > 0
    sup = res["probe_supports"]
    assert sup["per_variable"] and all(v["jaccard"] == 1.0 for v in sup["per_variable"].values())
    assert sup["observed"] == 1.0 and sup["null_mean"] < 0.5 and sup["p_value"] < 0.01
    assert all(a == b for a, b in res["probe_best_site"].values())


def test_probe_recurrence_of_unrelated_dimensions_is_at_the_null(probed):
    prof = probed[3]
    rng = np.random.default_rng(2)
    # every site's activations replaced by independent noise: the matching is arbitrary, supports do not recur
    noise = {**prof, "acts": {s: rng.standard_normal(a.shape).astype(np.float32) for s, a in prof["acts"].items()}}
    sup = probe_recurrence(prof, noise, threshold=0.6, n_null=500)["probe_supports"]
    assert sup["observed"] < 1.0 and sup["p_value"] > 0.01


def test_probe_settings_are_checked():
    assert P.ProfileSettings(probe_hooks=["x", "x", "y"]).probe_hooks == ("x", "y")
    for bad in (("state_norm",), (), "x"):
        with pytest.raises(ValueError, match="probe_hooks"):
            P.ProfileSettings(probe_hooks=bad)
    with pytest.raises(ValueError, match="probe_k"):
        P.ProfileSettings(probe_k=0)
    with pytest.raises(ValueError, match="circuit_max_evals"):
        P.ProfileSettings(circuit_max_evals=0)


def test_without_the_circuits_module_the_circuit_is_pending(probed, monkeypatch):
    model, batch, settings, _ = probed
    monkeypatch.setattr(P, "circuits_available", lambda: False)
    task = get_task("induction", vocab_size=16, seq_len=16)
    assert P.circuit_profile(model, task, batch, batch, settings) == {}
    assert P.pending() == P.PENDING and "circuits" in P.pending()[0]
    assert P.ModelProfile("m", "primary", "mamba1", 1, 16, 0, [], {}, {}).pending == P.PENDING
    monkeypatch.setattr(P, "circuits_available", lambda: True)
    assert P.pending() == ()


def test_circuit_site_overlap_against_random_sites():
    sites = [[0, "y", "final"], [1, "out", "final"], [1, "ssm_state", "source"]]
    same = circuit_site_overlap({"sites": sites, "n_sites": 60}, {"sites": sites[::-1], "n_sites": 60}, 2000, 0)
    assert same["observed"] == 1.0 and same["p_value"] < 0.01 and same["null_mean"] < 0.1
    half = circuit_site_overlap({"sites": sites[:2], "n_sites": 60}, {"sites": sites[1:], "n_sites": 60}, 2000, 0)
    assert half["observed"] == pytest.approx(1 / 3) and half["candidate_sites"] == 60
    apart = circuit_site_overlap({"sites": sites[:1], "n_sites": 60}, {"sites": sites[2:], "n_sites": 60}, 2000, 0)
    assert apart["observed"] == 0.0 and apart["p_value"] > 0.5
    # the null's mean is the expected Jaccard of random sets of the same sizes: |A||B| / N for single sites
    assert apart["null_mean"] == pytest.approx(1 / 60, abs=0.01)


def test_circuit_recurrence_summarises_each_model():
    from types import SimpleNamespace

    def prof(name, suff, p, channels):
        return SimpleNamespace(name=name, circuit={
            "sites": [[0, "y", "final"]], "units": 1, "channels": channels, "reached": True, "sufficiency": suff,
            "sufficiency_ci": [suff - 0.05, suff + 0.05], "random_sufficiency_mean": 0.1, "p_value": p})

    out = circuit_recurrence([prof("a", 0.9, 0.001, 4), prof("b", 0.8, 0.002, 8),
                              SimpleNamespace(name="c", circuit={"skipped": "no gap"})])
    assert out["n_models"] == 2 and set(out["per_model"]) == {"a", "b"}
    assert out["sufficiency"]["value"] == pytest.approx(0.85) and out["channels"]["value"] == 6.0
    assert out["sufficiency"]["ci"][0] < 0.85 < out["sufficiency"]["ci"][1] and out["beats_random"]
    assert not circuit_recurrence([prof("a", 0.9, 0.001, 4), prof("b", 0.2, 0.4, 4)])["beats_random"]
    assert circuit_recurrence([prof("a", 0.9, 0.001, 4)]) is None


@pytest.mark.slow
def test_circuit_profile_of_the_default_model():
    """With the circuits module: the profile's circuit restores >= 90 % of the logit difference on its search
    batch (``find_circuit``'s contract), its sites are among the candidates, and on held-out sequences it beats
    random circuits of the same layout."""
    pytest.importorskip("mamba_interp.circuits")
    from mamba_interp import zoo

    model, task = zoo.load("induction-mamba1"), zoo.load_task("induction-mamba1")
    settings = P.ProfileSettings(circuit_sequences=16, circuit_random=10)
    c = P.circuit_profile(model, task, task.sample(16, 1, split="test"), task.sample(32, 2, split="test"), settings)
    assert c["reached"] and c["search_sufficiency"] >= P.CIRCUIT_THRESHOLD
    assert 1 <= len(c["sites"]) <= c["n_sites"] and c["channels"] >= 1
    assert c["sufficiency"] > c["random_sufficiency_mean"] and c["p_value"] < 0.05
    assert c["example_sufficiency"].shape == (32,)
