"""Steps 10 (universality) and 14 (scaling) end to end on a family of tiny random models named with --compare
(another seed, two other sizes); skips; and (slow) the issue's checks on the default zoo family."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_helpers import read_result, run_pipeline

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.pipeline import profiles

FAST = {"sequences": 8, "length_multiples": [1, 2], "long_sequences": 6, "sae_steps": 20, "bootstrap": 20,
        "influence_sequences": 4, "rotations": 3, "probe_tokens": 100, "probe_threshold": 0.6, "null_samples": 100}
CARD = {"task": "induction", "task_params": {"vocab_size": 16, "seq_len": 24}}


def _member(folder, d_model, seed):
    torch.manual_seed(seed)
    HookedMamba(MambaConfig(arch="mamba1", d_model=d_model, n_layer=2, vocab_size=16, d_state=8)).save_pretrained(
        folder)
    (folder / "card.json").write_text(json.dumps({**CARD, "seed": seed}))
    return str(folder)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return [_member(root / "seed7", 32, 7), _member(root / "d16", 16, 1), _member(root / "d24", 24, 2)]


@pytest.fixture(scope="module")
def fam_run(task_model_dir, family, tmp_path_factory):
    out = tmp_path_factory.mktemp("fam") / "run"
    profiles.clear_cache()
    _, summary = run_pipeline(task_model_dir, out, steps="10,14", compare=",".join(family), samples=8, figures=True,
                              step_options={"universality": FAST, "scaling": FAST})
    assert summary.exit_code == 0
    return out


def test_step10_pairs_and_summary(fam_run):
    res = read_result(fam_run, "step_10_universality")
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert [x["role"] for x in m["models"]] == ["primary", "seed", "size", "size"]
    assert list(m["seeds"]["pairs"]) == ["m1task0|seed7"] and len(m["sizes"]["pairs"]) == 2
    pair = m["seeds"]["pairs"]["m1task0|seed7"]
    assert set(pair["cka"]) == {"stream0", "stream1", "stream2"}
    assert {"value", "ci", "random_init", "above_null"} <= set(pair["cka"]["stream2"])
    for q in ("representations_cka_last", "features_mppc", "features_mmcs"):
        s = m["seeds"]["summary"][q]
        assert s["n_pairs"] == 1 and len(s["ci"]) == 2 and isinstance(s["recurs"], bool)
    lk = m["seeds"]["summary"]["lookup"]
    assert lk["n_models"] == 2 and isinstance(lk["recurs"], bool) and len(lk["knockout_drop"]["ci"]) == 2
    assert set(lk["per_model"]) == {"m1task0", "seed7"}
    assert set(m["models"][0]["lookup"]["induction_score"]) == {"0", "1"}
    assert {"probe_sites", "probe_best_site"} <= set(pair) and pair["probe_sites"]["cells"] == 6 * len(
        m["probe_scores"])  # every variable at 2 layers x 3 hooks
    assert {"probe_sites_jaccard", "probe_best_site"} <= set(m["seeds"]["summary"])
    assert set(m["probe_scores"]["token"]) == {"m1task0", "seed7", "d16", "d24"}
    assert m["pending"] == list(profiles.pending()) and "cka_across_models.png" in res["artifacts"]


def test_step14_table_and_fits(fam_run):
    res = read_result(fam_run, "step_14_scaling")
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert [row["d_model"] for row in m["table"]] == [16, 24, 32, 32]
    fits = m["fits"]
    assert {"loss_1x", "loss_2x", "error_1x", "sae_fvu", "induction_score", "memory_horizon_2x",
            "top_source_hit_2x", "probe_error_token"} <= set(fits)
    assert set(m["table"][0]["probes"]["token"]) == {"layer", "hook", "score", "score_ci", "k"}
    for f in fits.values():
        assert "exponent" in f or "not_fitted" in f
        assert len(f["values"]) == 4
    assert fits["sae_fvu"]["n_sizes"] == 3 and fits["sae_fvu"]["n_points"] == 4
    assert m["seed_spread"]["sae_fvu"]["seeds"] == 2
    assert "rough slope" in res["reading"] and "scaling.png" in res["artifacts"]


def test_profiles_are_computed_once(fam_run, task_model_dir, family, tmp_path, monkeypatch):
    calls = []
    real = profiles.XM.sae_features
    monkeypatch.setattr(profiles.XM, "sae_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    profiles.clear_cache()
    run_pipeline(task_model_dir, tmp_path / "again", steps="10,14", compare=",".join(family), samples=8,
                 step_options={"universality": FAST, "scaling": FAST})
    assert len(calls) == 4  # one SAE per model, shared by both steps
    again = read_result(tmp_path / "again", "step_14_scaling")["metrics"]
    assert again == read_result(fam_run, "step_14_scaling")["metrics"]


def test_steps_skip_without_companions(task_model_dir, lm_model_dir, family, tmp_path):
    run_pipeline(task_model_dir, tmp_path / "none", steps="10,14")
    for folder in ("step_10_universality", "step_14_scaling"):
        res = read_result(tmp_path / "none", folder)
        assert res["status"] == "skipped" and "--compare" in res["reason"]
    run_pipeline(task_model_dir, tmp_path / "seed", steps="14", compare=family[0],
                 step_options={"scaling": FAST})
    res = read_result(tmp_path / "seed", "step_14_scaling")
    assert res["status"] == "skipped" and "single size" in res["reason"]
    run_pipeline(lm_model_dir, tmp_path / "lm", steps="10", compare=family[0])
    res = read_result(tmp_path / "lm", "step_10_universality")
    assert res["status"] == "skipped"


@pytest.mark.slow
def test_steps_10_14_on_the_default_family(tmp_path):
    """The issue's checks: recurrence across the three seeds with CIs and nulls; the scaling table and fits."""
    profiles.clear_cache()
    _, summary = run_pipeline("induction-mamba1", tmp_path / "run", steps="10,14", samples=128, figures=False)
    assert summary.exit_code == 0
    m10 = read_result(tmp_path / "run", "step_10_universality")["metrics"]
    assert len(m10["seeds"]["pairs"]) == 3
    summary = m10["seeds"]["summary"]
    for q in ("representations_cka_last", "features_mppc", "features_mmcs", "probe_sites_jaccard",
              "probe_supports_jaccard"):
        assert summary[q]["n_pairs"] == 3 and summary[q]["null_mean"] is not None and len(summary[q]["ci"]) == 2
    assert summary["lookup"]["n_models"] == 3
    if profiles.circuits_available():  # step 5's circuits: site recurrence against random sites, sufficiency
        q = summary["circuit_sites_jaccard"]
        assert q["n_pairs"] == 3 and q["null_mean"] is not None and len(q["ci"]) == 2
        assert summary["circuit"]["n_models"] == 3 and len(summary["circuit"]["sufficiency"]["ci"]) == 2
    else:
        assert m10["pending"] == list(profiles.PENDING)
    m14 = read_result(tmp_path / "run", "step_14_scaling")["metrics"]
    assert len({row["n_params"] for row in m14["table"]}) == 3
    assert "exponent" in m14["fits"]["sae_fvu"] and "exponent" in m14["fits"]["loss_16x"]
    assert any(k.startswith("probe_error_") for k in m14["fits"])
    if profiles.circuits_available():
        assert "exponent" in m14["fits"]["circuit_sufficiency"]


def test_options_validation():
    from mamba_interp.pipeline.config import UsageError
    from mamba_interp.pipeline.registry import get_step

    for step in ("equivalence", "universality", "scaling"):
        with pytest.raises(UsageError, match="length_multiples"):
            get_step(step).make_options({"length_multiples": [0, 4]})
        with pytest.raises(UsageError, match="sae_steps"):
            get_step(step).make_options({"sae_steps": 0})
    assert get_step("scaling").make_options({"length_multiples": [16, 1, 1]}).length_multiples == (1, 16)
