"""Step 13 (dictionary): dictionary learning next to step 3's SAEs through the runner; a resumed run takes the SAEs
from disk; determinism; timings stay out of the metrics; skipped when no SAE matches."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import read_result
from test_step_sae import FAST_SAE, sae_run, tiny_model_dir

from mamba_interp.pipeline import RunConfig, Runner
from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import get_step

FAST_DICT = {"fit_tokens": 600, "eval_tokens": 300, "gap_tokens": 300, "max_iter": 3}
OPTIONS = {"sae": FAST_SAE, "dictionary": FAST_DICT}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Steps 0–3, then a resumed run adding step 13 (figures on both times, so step 3's result matches)."""
    model = tiny_model_dir(tmp_path_factory)
    out = tmp_path_factory.mktemp("dictionary") / "run"
    _, first = sae_run(model, out, figures=True, step_options=OPTIONS)
    assert first.exit_code == 0
    sae_file = out / "step_03_sae" / "sae_L1_resid_post" / "sae_weights.safetensors"
    before = sae_file.stat().st_mtime_ns
    runner = Runner(RunConfig(model=str(model), output=str(out), samples=64, batch_size=8, quiet=True, figures=True,
                              steps="13", resume=True, step_options=OPTIONS))
    try:
        summary = runner.run()
    finally:
        runner.close()
    return out, summary, before, sae_file.stat().st_mtime_ns


def test_step13_compares_dictionary_learning_with_the_saes(resumed):
    out, summary, before, after = resumed
    res = read_result(out, "step_13_dictionary")
    assert res["status"] == "completed", res.get("error")
    comps = res["metrics"]["comparisons"]
    assert set(comps) == {"L0_resid_post", "L1_resid_post"}  # default: the residual-stream SAEs only
    for key, c in comps.items():
        assert c["atoms"] == 4 * 32 and c["fit_tokens"] == 600 and c["n_tokens"] == 300 == c["gap_tokens"]
        assert 0 <= c["fvu_sae"] < 0.5 and 0 <= c["fvu_dictionary"] < 0.5 and c["l0_dictionary"] > 0
        assert c["l0_sae"] == pytest.approx(8.0, abs=0.1)
        for name in ("mmcs_sae_to_dictionary", "mmcs_dictionary_to_sae", "weighted_mmcs_sae_to_dictionary"):
            assert 0 < c[name] <= 1 + 1e-9, name
        # least squares on the SAE's own support can only lower its reconstruction error
        assert c["gap_fvu_support_refit"] <= c["gap_fvu_sae"] + 1e-9
        assert c["gap"] == pytest.approx(c["gap_fvu_sae"] - c["gap_fvu_sparse_coding"])
        assert c["gap_l0_sparse_coding"] <= c["gap_l0_sae"] + 1e-9  # OMP's budget is the SAE's L0 per token
        assert not any("seconds" in k for k in c), "timings must stay out of the metrics"
    timings = json.loads((out / "step_13_dictionary" / "timings.json").read_text())
    assert set(timings) == set(comps) and all(t["fit_seconds_dictionary"] > 0 for t in timings.values())
    for key in comps:
        assert (out / "step_13_dictionary" / f"comparison_{key}.png").is_file()
    assert "amortisation gap" in res["reading"]


def test_resume_reuses_step3_saes(resumed):
    out, summary, before, after = resumed
    assert summary.records[3].resumed and before == after


def test_step13_is_deterministic(resumed, tmp_path_factory, tmp_path):
    """A fresh run (SAEs in memory) gives the same metrics as the resumed one (SAEs loaded from disk)."""
    out = resumed[0]
    _, summary = sae_run(tiny_model_dir(tmp_path_factory), tmp_path / "fresh", steps="13", step_options=OPTIONS)
    assert summary.exit_code == 0
    assert read_result(tmp_path / "fresh", "step_13_dictionary")["metrics"] == \
        read_result(out, "step_13_dictionary")["metrics"]


def test_step13_is_skipped_without_a_matching_sae(tmp_path_factory, tmp_path):
    opts = {"sae": {**FAST_SAE, "hooks": ["x"], "layers": [0]}, "dictionary": {**FAST_DICT, "hooks": ["y"]}}
    _, summary = sae_run(tiny_model_dir(tmp_path_factory), tmp_path / "skip", steps="13", step_options=opts)
    res = read_result(tmp_path / "skip", "step_13_dictionary")
    assert res["status"] == "skipped" and "no SAE on y" in res["reason"]
    assert summary.exit_code == 0


@pytest.mark.parametrize("bad", [{"hooks": ["state_norm"]}, {"alpha": 0}, {"fit_tokens": 0},
                                 {"gap_algorithm": "lasso"}, {"n_components": 0}])
def test_dictionary_options_are_validated(bad):
    with pytest.raises(UsageError):
        get_step(13).make_options(bad)
