"""Steps 17 (spd), 18 (apd) and 19 (clusters) end to end on tiny models: metrics, files, resume, Mamba-2,
language models, options."""

from __future__ import annotations

import pytest
from pipeline_helpers import read_result, run_pipeline

from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import default_steps, get_step

FAST_SPD = {"steps": 4, "batch_size": 4, "n_eval": 8, "C": 4, "faithfulness_warmup_steps": 3, "train_len": 8,
            "top_k": 2}
FAST_APD = {"steps": 3, "batch_size": 4, "n_eval": 8, "C": 3, "topk": 1.0, "train_len": 8}
FAST_CLUSTERS = {"n_eval": 8, "n_random": 4, "n_top": 2, "max_clusters": 6}
OPTIONS = {"spd": FAST_SPD, "apd": FAST_APD, "clusters": FAST_CLUSTERS}


@pytest.fixture(scope="module")
def spd_out(task_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("spd") / "run"
    _, summary = run_pipeline(task_model_dir, out, steps="17-19", step_options=OPTIONS, samples=8, figures=True)
    assert summary.exit_code == 0
    return out


def test_spd_step_metrics_and_files(spd_out):
    res = read_result(spd_out, "step_17_spd")
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert len(m["modules"]) == 8 and set(m["by_module"]) == set(m["modules"])
    assert set(m["by_length"]) == {"1x", "4x"}
    assert m["by_length"]["4x"]["seq_len"] == 4 * m["by_length"]["1x"]["seq_len"]
    for mode in ("target", "ones", "importance"):
        acc = m["by_length"]["1x"][mode]["accuracy"]
        assert acc["ci"][0] <= acc["value"] <= acc["ci"][1]
    assert set(m["by_position_class"]) == {"trigger", "value", "query/answer", "other"}
    row = m["by_position_class"]["trigger"][0]
    assert {"module", "subcomponent", "mean_importance", "best_variable"} <= set(row)
    for art in ("decomposition.safetensors", "history.json", "training.png", "accuracy_by_mode.png",
                "importance_by_position.png"):
        assert art in res["artifacts"] and (spd_out / "step_17_spd" / art).is_file(), art
    assert "accuracy" in res["reading"]


def test_spd_steps_are_not_default_and_validate_options():
    assert not {17, 18, 19} & set(default_steps())
    with pytest.raises(UsageError, match="routing"):
        get_step("spd").make_options({"routing": "nope"})
    with pytest.raises(UsageError, match="steps"):
        get_step("spd").make_options({"steps": 0})


def test_apd_step_reports_the_same_figures(spd_out):
    res = read_result(spd_out, "step_18_apd")
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert m["method"] == "apd" and m["layer"] == 1 and len(m["modules"]) == 4
    assert all(k.startswith("blocks.1.") for k in m["by_module"])
    assert "importance" in m["by_length"]["1x"] and "minimality" in m["final_losses"]


def test_clusters_step_ablates_against_random_controls(spd_out):
    res = read_result(spd_out, "step_19_clusters")
    assert res["status"] in ("completed", "skipped"), res.get("error")
    if res["status"] == "skipped":
        pytest.skip(res.get("reason"))
    m = res["metrics"]
    assert m["n_clusters"] >= 1 and m["n_alive"] <= m["n_subcomponents"]
    t = m["top_clusters"][0]
    assert set(t["by_position_class"]) == {"trigger", "value", "query/answer", "other"}
    assert 0 <= t["p_value"] <= 1 and t["p_value_holm"] >= t["p_value"]
    assert (m["answer_cluster"] is None) == (m["answer_cluster_reason"] is not None)
    assert (spd_out / "step_19_clusters" / "clusters.json").is_file()


def test_spd_on_a_language_model_without_task(lm_model_dir, tmp_path):
    out = tmp_path / "lm"
    _, summary = run_pipeline(lm_model_dir, out, steps="17", layers="2", samples=6,
                              step_options={"spd": {**FAST_SPD, "matrices": ["in_proj", "out_proj"],
                                                    "eval_multiples": [1, 2]}})
    assert summary.exit_code == 0
    res = read_result(out, "step_17_spd")
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert m["modules"] == ["blocks.2.mixer.in_proj", "blocks.2.mixer.out_proj"]
    assert set(m["by_length"]) == {"1x", "2x"} and "by_position_class" not in m


def test_spd_trains_by_default_at_the_longest_evaluated_length_with_1024_tokens_per_step():
    from mamba_interp.pipeline.steps.s17_spd import TOKENS_PER_STEP, Options, train_batch_size

    opts = Options()
    assert opts.train_len is None and opts.batch_size is None and max(opts.eval_multiples) == 4
    assert train_batch_size(opts, 256) == TOKENS_PER_STEP // 256 == 4
    assert train_batch_size(opts, 4096) == 1  # at least one sequence
    assert train_batch_size(Options(batch_size=7), 256) == 7
    assert opts.spd_config({"m": 1}, batch_size=4).batch_size == 4
    with pytest.raises(ValueError, match="batch_size"):
        Options(batch_size=0)
