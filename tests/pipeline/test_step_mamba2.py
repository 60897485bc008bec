"""Step 20 (mamba2): skipped on Mamba-1 with a reason; on a tiny Mamba-2 writes the methodology's files for every
layer; options; and (slow) the zoo's induction-mamba2."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import read_result, run_pipeline

from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import get_step

FILES = ("mamba2_baseline_stats.json", "mamba2_comprehensive_report.json")


def test_step20_skips_mamba1(task_model_dir, tmp_path):
    _, summary = run_pipeline(task_model_dir, tmp_path / "m1", steps="20")
    res = read_result(tmp_path / "m1", "step_20_mamba2")
    assert summary.exit_code == 0 and res["status"] == "skipped" and "Mamba-1" in res["reason"]


def test_step20_writes_every_layer(m2_model_dir, tmp_path):
    out = tmp_path / "m2"
    _, summary = run_pipeline(m2_model_dir, out, steps="20", figures=True)
    res = read_result(out, "step_20_mamba2")
    assert summary.exit_code == 0 and res["status"] == "completed", res.get("error")
    folder = out / "step_20_mamba2"
    names = list(FILES) + [f"mamba2_{k}_layer_{i}.json" for i in (0, 1)
                           for k in ("ssm_parameters", "sequence_dynamics")]
    for name in names + ["gates.png", "decay_spectrum.png", "state_rank.png", "attention_sparsity.png"]:
        assert (folder / name).is_file() and name in res["artifacts"], name
    params = json.loads((folder / "mamba2_ssm_parameters_layer_1.json").read_text())
    assert len(params["A"]) == 4 and len(params["decay_q10_q50_q90"]) == 4 and len(params["group"]) == 4
    dyn = json.loads((folder / "mamba2_sequence_dynamics_layer_0.json").read_text())
    assert len(dyn["effective_rank_by_position"]) == 4 and len(dyn["effective_rank_by_position"][0]) == 24
    for key in ("gini", "entropy", "top_mass"):
        assert all(0 <= v <= 1 for v in dyn["attention_sparsity"][key]), key
    m = res["metrics"]
    assert sum(g["count"] for g in m["timescale_groups"]) == 8  # 2 layers x 4 heads
    assert 1 <= m["token_efficiency"]["tokens"]["value"] <= 24
    report = json.loads((folder / "mamba2_comprehensive_report.json").read_text())
    assert report["reading"] == res["reading"] and len(report["head_groups"]) == 2


@pytest.mark.parametrize("bad, message", [({"samples": 0}, "positive"), ({"closed": 1.5}, r"\(0, 1\)"),
                                          ({"mass": 0}, r"\(0, 1\]")])
def test_step20_options_are_validated(bad, message):
    with pytest.raises(UsageError, match=message):
        get_step(20).make_options(bad)


@pytest.mark.slow
def test_induction_mamba2_all_layers(tmp_path):
    from mamba_interp import zoo

    if "induction-mamba2" not in zoo.names():
        pytest.skip("induction-mamba2 is not built")
    out = tmp_path / "zoo"
    _, summary = run_pipeline("induction-mamba2", out, steps="20", samples=256, batch_size=64)
    assert summary.exit_code == 0
    folder = out / "step_20_mamba2"
    for name in list(FILES) + [f"mamba2_{k}_layer_{i}.json" for i in (0, 1)
                               for k in ("ssm_parameters", "sequence_dynamics")]:
        assert (folder / name).is_file(), name
    m = read_result(out, "step_20_mamba2")["metrics"]
    assert sum(g["count"] for g in m["timescale_groups"]) == 64
