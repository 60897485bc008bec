"""Step 7 (ssm_dynamics) on tiny random models of both architectures and a language model; its loader, options,
determinism; and (slow) the default zoo model's lookup layer."""

from __future__ import annotations

import pytest
from pipeline_helpers import load_step_data, read_result, run_pipeline

from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import get_step

FIGURES = ("delta_selectivity", "timescales", "hidden_attention", "lookup")


@pytest.fixture(scope="module")
def m1_run(task_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("s7") / "run"
    _, summary = run_pipeline(task_model_dir, out, steps="7", figures=True, hooks=["dt"])  # few step-2 figures
    assert summary.exit_code == 0
    return out


def test_step7_metrics_files_and_figures(m1_run):
    res = read_result(m1_run, "step_07_ssm_dynamics")
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert m["unit"] == "channel" and m["layers"] == [0, 1]
    assert set(m["induction_score"]) == set(m["knockout_accuracy_drop"]) == {"0", "1"}
    for i in ("0", "1"):
        assert 0 <= m["induction_score"][i] <= 1 and -1 <= m["knockout_accuracy_drop"][i] <= 1
        assert len(m["top_channels"][i]) == 8
        sc = m["induction_score_ci"][i]
        assert sc["ci"][0] <= sc["value"] <= sc["ci"][1] and "control" in sc
        assert {"clean", "knocked", "control", "drop", "control_drop", "p_vs_control"} <= set(m["knockout"][i])
        assert set(m["timescales"][i]["longer_than"]) == {"1x", "4x", "16x"}
    assert m["delta_selectivity"]["relevant"] == "trigger tokens"
    for fig in FIGURES:
        assert f"{fig}.png" in res["artifacts"], fig
    for art in res["artifacts"]:
        assert (m1_run / "step_07_ssm_dynamics" / art).is_file(), art
    assert "induction score" in res["reading"] and "timescale" in res["reading"]


def test_step7_loader_gives_the_contracted_data(m1_run, task_model_dir):
    data = load_step_data(task_model_dir, m1_run, 7, hooks=["dt"])
    m = read_result(m1_run, "step_07_ssm_dynamics")["metrics"]
    assert set(data) == {"induction_score", "knockout_accuracy_drop", "top_channels"}
    assert data["induction_score"] == {int(k): v for k, v in m["induction_score"].items()}
    assert sorted(data["top_channels"][1]) == list(range(64))  # every channel, ranked
    assert data["top_channels"][1][:8] == m["top_channels"]["1"]


def test_step7_is_deterministic(m1_run, task_model_dir, tmp_path):
    _, summary = run_pipeline(task_model_dir, tmp_path / "again", steps="7", hooks=["dt"])
    assert summary.exit_code == 0
    a = read_result(m1_run, "step_07_ssm_dynamics")["metrics"]
    b = read_result(tmp_path / "again", "step_07_ssm_dynamics")["metrics"]
    assert a == b


def test_step7_on_mamba2_ranks_heads(m2_model_dir, tmp_path):
    _, summary = run_pipeline(m2_model_dir, tmp_path / "m2", steps="7", step_options={"ssm_dynamics": {
        "knockout": False}})
    res = read_result(tmp_path / "m2", "step_07_ssm_dynamics")
    assert summary.exit_code == 0 and res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert m["unit"] == "head" and "knockout_accuracy_drop" not in m
    assert all(0 <= h < 4 for h in m["top_channels"]["0"])


def test_step7_on_a_language_model_uses_repeated_tokens(lm_model_dir, tmp_path):
    _, summary = run_pipeline(lm_model_dir, tmp_path / "lm", steps="7", hooks=["x", "y"])  # no Δ from step 2
    res = read_result(tmp_path / "lm", "step_07_ssm_dynamics")
    assert summary.exit_code == 0 and res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert set(m["induction_score"]) == {"0", "1", "2"}
    assert m["delta_selectivity"]["relevant"] == "second-copy tokens"


@pytest.mark.parametrize("bad, message", [({"top_channels": 0}, "positive integer"),
                                          ({"knockout": "yes"}, "true or false"), ({"maps": 2}, "unknown option")])
def test_step7_options_are_validated(bad, message):
    with pytest.raises(UsageError, match=message):
        get_step(7).make_options(bad)


@pytest.mark.slow
def test_default_model_looks_up_in_layer_0(tmp_path):
    """The issue's check on the default zoo model. Measured: layer 0 induction score 1.00, knockout drop 0.90
    (control 0.00); layer 1 score 0.01, drop 0.00."""
    from mamba_interp import zoo

    if zoo.DEFAULT not in zoo.names():
        pytest.skip("the default zoo model is not built")
    _, summary = run_pipeline("default", tmp_path / "zoo", steps="7", samples=256, batch_size=64)
    assert summary.exit_code == 0
    m = read_result(tmp_path / "zoo", "step_07_ssm_dynamics")["metrics"]
    assert m["induction_score"]["0"] >= 0.95 and m["induction_score"]["1"] < 0.2
    assert m["knockout_accuracy_drop"]["0"] > 0.5 and m["knockout"]["0"]["control_drop"]["value"] < 0.05
