"""Step 11 (diagnostics) through the runner on tiny random models of both architectures and a language-model
folder: lens, attribution and ablation metrics, figures, determinism, the analyzer method, options."""

from __future__ import annotations

import pytest
from pipeline_helpers import read_result, run_pipeline

from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import get_step

FAST = {"lens_steps": 20, "ablation_samples": 6, "n_resamples": 100, "ablation_components": ["mixer", "ssm"]}
FIGURES = ("lens_kl", "lens_accuracy", "dla", "ablation")


def _run(model, out, **kw):
    kw.setdefault("step_options", {"diagnostics": FAST})
    return run_pipeline(model, out, steps="11", **kw)


@pytest.fixture(scope="module")
def m1_run(task_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("diag") / "m1"
    _, summary = _run(task_model_dir, out, figures=True)
    assert summary.exit_code == 0
    return out


def _check(res: dict, n_layer: int) -> dict:
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]
    lens = m["lens"]
    assert lens["labels"] == [f"resid_pre {i}" for i in range(n_layer)] + ["final_post"]
    assert lens["logit_lens"]["kl"][-1]["value"] <= 1e-6  # the last entry is the model
    assert lens["tuned_lens"]["kl_train"][-1] <= 1e-3
    assert all(t <= lg + 1e-9 for t, lg in zip(lens["tuned_lens"]["kl_train"], lens["logit_lens"]["kl_train"]))
    dla = m["dla"]
    assert dla["max_relative_error"] <= 1e-4 and dla["pairs"] == lens["scored_positions"]
    assert list(dla["components"]) == ["embed"] + [f"blocks.{i}.mixer" for i in range(n_layer)]
    assert set(dla["top_units"]) == {f"blocks.{i}.mixer" for i in range(n_layer)}
    for kind in ("zero", "mean", "resample"):
        effects = m["ablation"]["kinds"][kind]["effects"]
        assert [e["target"] for e in effects] == [f"blocks.{i}.{c}" for i in range(n_layer) for c in ("mixer", "ssm")
                                                  ] + ["all mixers"]
    assert "decodable" in res["reading"] and "ablation" in res["reading"]
    return m


def test_step11_on_mamba1_writes_metrics_figures_and_the_lens(m1_run):
    res = read_result(m1_run, "step_11_diagnostics")
    _check(res, 2)
    folder = m1_run / "step_11_diagnostics"
    for name in FIGURES:
        assert (folder / f"{name}.png").is_file(), name
    for art in res["artifacts"]:
        assert (folder / art).is_file(), art
    from mamba_interp.lens import TunedLens

    assert TunedLens.load(folder / "tuned_lens").n_layer == 2


def test_step11_on_mamba2_and_a_language_model(m2_model_dir, lm_model_dir, tmp_path):
    _, summary = _run(m2_model_dir, tmp_path / "m2")
    assert summary.exit_code == 0
    m = _check(read_result(tmp_path / "m2", "step_11_diagnostics"), 2)
    assert m["dla"]["unit_kind"] == "head" and len(m["dla"]["top_units"]["blocks.0.mixer"]) == 4  # 4 heads
    _, summary = _run(lm_model_dir, tmp_path / "lm")
    assert summary.exit_code == 0
    m = _check(read_result(tmp_path / "lm", "step_11_diagnostics"), 3)
    assert m["dataset"] == "repeated_tokens"


def test_step11_is_deterministic(task_model_dir, m1_run, tmp_path):
    _, summary = _run(task_model_dir, tmp_path / "again")
    assert summary.exit_code == 0
    assert read_result(tmp_path / "again", "step_11_diagnostics")["metrics"] == \
        read_result(m1_run, "step_11_diagnostics")["metrics"]


def test_the_analyzer_runs_step11(task_model_dir, tmp_path):
    from mamba_interp.experimental_framework import MambaMechanisticAnalyzer

    with MambaMechanisticAnalyzer(model=str(task_model_dir), output=str(tmp_path / "an"), samples=12, batch_size=8,
                                  quiet=True, figures=False, step_options={"diagnostics": FAST}) as analyzer:
        analyzer.setup()
        result = analyzer.diagnostics()
    assert result.metrics["dla"]["max_relative_error"] <= 1e-4


@pytest.mark.parametrize("bad", [{"ablation_kinds": ["noise"]}, {"lens_steps": 0}, {"decodable_fraction": 0},
                                 {"ablation_components": "mlp"}])
def test_options_are_validated(bad):
    with pytest.raises(UsageError):
        get_step(11).make_options(bad)
