"""Steps 5 (circuits) and 6 (causality) end to end on the quickly trained tiny induction model, their options, the
evidence circuits from steps 3, 7 and 8, and graceful behaviour on a Mamba-2 model and on language models
(repeated tokens without a tokenizer; IOI and factual recall with one). The end-to-end runs need steps 1-3, 7 and
8 first, so they are slow tests; the methods themselves are tested fast in ``tests/test_circuits.py``."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import read_result, run_pipeline
from test_step_probes import FAST_PROBES
from test_step_sae import FAST_SAE, trained_model  # noqa: F401  (the session's tiny trained induction model)

from mamba_interp.circuits import Circuit
from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import get_step

FAST = {"sae": FAST_SAE, "probes": FAST_PROBES, "temporal": {"long_range_samples": 4, "lengths": [2]},
        "ssm_dynamics": {"knockout": False}, "circuits": {"n_search": 32, "max_evals": 40},
        "causality": {"n_random": 8, "null_examples": 16, "agreement_samples": 8, "curve_random": 1,
                      "n_permutations": 499}}
SCHEMA = ("sufficiency", "sufficiency_ci", "necessity", "necessity_ci", "units", "p_value", "random_sufficiency_mean",
          "random_necessity_mean")


def circuits_run(model, out, **kw):
    kw.setdefault("step_options", FAST)
    kw.setdefault("samples", 48)
    return run_pipeline(model, out, steps="5,6", **kw)


@pytest.fixture(scope="module")
def run_out(trained_model, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("circuits") / "run"
    _, summary = circuits_run(trained_model, out, figures=True)
    assert summary.exit_code == 0
    return out


@pytest.mark.slow
def test_step5_finds_the_attribution_circuit_and_evidence_circuits(run_out):
    res = read_result(run_out, "step_05_circuits")
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]["datasets"]["induction"]
    assert m["search_examples"] == 32 and m["classes"] == ["trigger", "answer", "final", "other"]
    atp = m["circuits"]["atp"]
    assert m["atp_reached_threshold"] and atp["search_sufficiency"] >= 0.9 and atp["units"] >= 1
    found = set(m["circuits"]) | set(res["metrics"]["unavailable"])  # steps 3, 4, 7 and 8 ran first
    assert {"sae", "probes", "state_probes", "hidden_attention", "temporal"} <= found
    assert {"sae", "hidden_attention", "temporal"} <= set(m["circuits"])
    saved = json.loads((run_out / "step_05_circuits" / "circuits.json").read_text())["circuits"]["induction"]
    assert [Circuit.from_dict(c).name for c in saved] == list(m["circuits"])
    assert "growth.png" in res["artifacts"] and "attribution circuit" in res["reading"]


@pytest.mark.slow
def test_step6_tests_every_circuit_against_random_controls(run_out):
    res = read_result(run_out, "step_06_causality")
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert set(m["circuits"]) == set(read_result(run_out, "step_05_circuits")["metrics"]["datasets"]["induction"][
        "circuits"])
    for name, rec in m["circuits"].items():
        for key in SCHEMA:
            assert key in rec, (name, key)
        assert rec["n_random"] == 8 and rec["null_examples"] == 16 and rec["n_examples"] == 48
        assert rec["sufficiency_ci"][0] <= rec["sufficiency"] <= rec["sufficiency_ci"][1]
    atp = m["circuits"]["atp"]
    assert atp["sufficiency"] >= 0.7 and atp["sufficiency"] > atp["random_sufficiency_mean"] + 0.3
    assert -1 <= m["atp_spearman"] <= 1 and m["atp_most_wrong"] and m["size_curve"]
    for fig in ("circuits.png", "size_curve.png", "atp_vs_exact.png"):
        assert fig in res["artifacts"] and (run_out / "step_06_causality" / fig).is_file()
    assert "random circuits" in res["reading"] and "Spearman" in res["reading"]


def test_options_are_validated():
    with pytest.raises(UsageError, match="threshold"):
        get_step("circuits").make_options({"threshold": 1.5})
    with pytest.raises(UsageError, match="hooks"):
        get_step("circuits").make_options({"hooks": ["bogus"]})
    with pytest.raises(UsageError, match="null_kinds"):
        get_step("causality").make_options({"null_kinds": ["nope"]})
    assert get_step("circuits").requires == (1, 3, 4, 7, 8)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["m2_model_dir", "lm_model_dir", "tokenizer_model_dir"])
def test_other_models_complete_or_skip_with_a_reason(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    _, summary = circuits_run(model, tmp_path / "run", samples=16)
    for folder in ("step_05_circuits", "step_06_causality"):
        res = read_result(tmp_path / "run", folder)
        assert res["status"] in ("completed", "skipped"), res.get("error")
        if res["status"] == "skipped":
            assert res["reason"]
    res = read_result(tmp_path / "run", "step_05_circuits")
    if fixture == "tokenizer_model_dir" and res["status"] == "completed":
        seen = set(res["metrics"]["datasets"]) | set(res["metrics"]["skipped_datasets"])
        assert {"ioi", "factual_recall"} <= seen
