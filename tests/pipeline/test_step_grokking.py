"""Step 15 (grokking): the issue's checks on the zoo's modadd-mamba2 through the runner, a freshly trained tiny
modular-addition folder with snapshots, the skips (no log, no snapshots, another task), options."""

from __future__ import annotations

import json
import shutil

import pytest
from pipeline_helpers import read_result, run_pipeline

from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import get_step

FIGURES = ("curves", "fourier", "fourier_final")
FAST = {"grokking": {"n_resamples": 200}}


def test_step15_on_modadd_mamba2(tmp_path):
    out = tmp_path / "run"
    _, summary = run_pipeline("modadd-mamba2", out, steps="15", figures=True, step_options=FAST)
    assert summary.exit_code == 0
    res = read_result(out, "step_15_grokking")
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert m["p"] == 31 and m["non_constant_frequencies"] == 15
    key = m["key_frequencies"]
    assert 1 <= len(key) <= 8 and all(isinstance(k, int) and 1 <= k <= 15 for k in key)
    assert m["key_fraction_final"] >= 0.85 and m["top8_fraction"]["0"] < 0.70
    assert m["phases"] == {"memorisation": [0, 150], "circuit_formation": [150, m["boundaries"]["cleanup_from"]],
                           "cleanup": [m["boundaries"]["cleanup_from"], 1625]}
    assert m["excluded_rise"]["rises"] is True and m["restricted_below_test"] is True
    assert m["log_max_abs_difference"] < 1e-4  # the measured losses are the training log's
    assert [row["step"] for row in m["snapshots"]] == [0, 150, 500, 900, 1300, 1700, 3000]
    for name in FIGURES:
        assert (out / "step_15_grokking" / f"{name}.png").is_file(), name
    assert "excluded loss rises before the test loss falls" in res["reading"]


@pytest.fixture(scope="module")
def tiny_modadd(tmp_path_factory):
    """A 1-layer Mamba-2 trained for 40 full-batch steps on modular addition mod 7, with snapshots."""
    from mamba_interp.tasks import TrainConfig, train

    folder = tmp_path_factory.mktemp("modadd7")
    train(TrainConfig(task="modular_addition", task_params={"p": 7, "frac_train": 0.6}, arch="mamba2", d_model=16,
                      n_layer=1, d_state=4, headdim=8, batch_size=0, steps=40, warmup_steps=2, lr=3e-3,
                      weight_decay=1.0, eval_every=10, snapshot_steps=(0, 20), progress=False, out_dir=str(folder)))
    return folder


def test_step15_on_a_trained_folder_is_deterministic(tiny_modadd, tmp_path):
    metrics = []
    for name in ("a", "b"):
        _, summary = run_pipeline(tiny_modadd, tmp_path / name, steps="15", step_options=FAST)
        assert summary.exit_code == 0
        res = read_result(tmp_path / name, "step_15_grokking")
        assert res["status"] == "completed", res.get("error")
        metrics.append(res["metrics"])
    assert metrics[0] == metrics[1]
    m = metrics[0]
    assert m["p"] == 7 and m["snapshot_steps"] == [0, 20, 40]
    assert all(1 <= k <= 3 for k in m["key_frequencies"])
    assert isinstance(m["phases"], dict)  # 40 steps need not reach both memorisation and generalisation


def test_step15_skips_with_a_reason(task_model_dir, tiny_modadd, tmp_path):
    cases = {"no_log": (task_model_dir, "no training_log.json")}
    no_snap = tmp_path / "no_snap"
    shutil.copytree(tiny_modadd, no_snap, ignore=shutil.ignore_patterns("snapshot_*"))
    cases["no_snap"] = (no_snap, "no snapshot_step")
    other = tmp_path / "other_task"
    shutil.copytree(task_model_dir, other)
    shutil.copy(next(tiny_modadd.glob("snapshot_step*.safetensors")), other / "snapshot_step000000.safetensors")
    (other / "training_log.json").write_text(json.dumps({"task": {"name": "induction", "params": {}}, "evals": []}))
    cases["other"] = (other, "modular addition")
    for name, (model, reason) in cases.items():
        _, summary = run_pipeline(model, tmp_path / f"out_{name}", steps="15")
        res = read_result(tmp_path / f"out_{name}", "step_15_grokking")
        assert res["status"] == "skipped" and reason in res["reason"], (name, res.get("reason"))


def test_the_analyzer_reports_the_skip(task_model_dir, tmp_path):
    from mamba_interp.experimental_framework import MambaMechanisticAnalyzer

    with MambaMechanisticAnalyzer(model=str(task_model_dir), output=str(tmp_path / "an"), quiet=True) as analyzer:
        analyzer.setup()
        with pytest.raises(RuntimeError, match="skipped"):
            analyzer.grokking()


@pytest.mark.parametrize("bad", [{"threshold": 0}, {"max_key": 0}, {"accuracy": 1.5}])
def test_options_are_validated(bad):
    with pytest.raises(UsageError):
        get_step(15).make_options(bad)
