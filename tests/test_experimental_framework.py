"""MambaMechanisticAnalyzer: the same steps as the CLI, driven from Python."""

from __future__ import annotations

import json

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.experimental_framework import ExperimentConfig, MambaMechanisticAnalyzer
from mamba_interp.pipeline import RunConfig, StepResult, register_step
from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import unregister_step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fw_model")
    torch.manual_seed(0)
    HookedMamba(MambaConfig(d_model=32, n_layer=2, vocab_size=16, d_state=8)).save_pretrained(folder)
    (folder / "card.json").write_text(json.dumps({"task": "induction", "task_params": {"seq_len": 16}}))
    return folder


def _config(model_dir, out, **kw):
    return ExperimentConfig(model=str(model_dir), output=str(out), samples=8, batch_size=4, quiet=True,
                            figures=False, **kw)


def test_experiment_config_is_the_run_config():
    assert ExperimentConfig is RunConfig


def test_analyzer_runs_steps_like_the_cli(model_dir, tmp_path):
    with MambaMechanisticAnalyzer(_config(model_dir, tmp_path / "a")) as an:
        with pytest.raises(RuntimeError, match="setup"):
            _ = an.model
        setup = an.setup()
        assert setup.metrics["instrumentation_ok"] and an.layers == (0, 1)
        tasks = an.tasks()
        batch = an.data(1)["batch"]
        assert tasks.metrics["datasets"]["induction"]["sequences"] == 8 and batch.tokens.shape == (8, 16)
        acts = an.activations()
        assert set(acts.metrics["stats"]) == {"0", "1"}
        assert an.tasks() is tasks  # already ran in this session: not recomputed
        # collect_activations shares step 2's code: the same numbers on the same batch (up to rounding: step 2
        # also hooked layer 0's states, which switches that layer to the materialised scan)
        again = an.collect_activations(layers=[1], hooks=["x", "state_norm"])
        stored = an.data("activations")["activations"]
        torch.testing.assert_close(again[("x", 1)], stored[("x", 1)], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again[("state_norm", 1)], stored[("state_norm", 1)], rtol=1e-5, atol=1e-6)
        exact = an.collect_activations(hooks=list(an.config.hooks))
        assert torch.equal(exact[("y", 1)], stored[("y", 1)])
        custom = an.collect_activations(tokens=torch.tensor([[1, 2, 3, 15]]), layers=[0], hooks=["dt"])
        assert custom[("dt", 0)].shape == (1, 4, 64)
        with pytest.raises(UsageError, match="tokenizer"):
            an.collect_activations(texts=["hello"])
        with pytest.raises(UsageError, match="out of range"):
            an.collect_activations(layers=[7])
        report = an.report()
    assert report is not None and "Step 2" in report.read_text()
    for folder in ("step_00_setup", "step_01_tasks", "step_02_activations"):
        assert json.loads((tmp_path / "a" / folder / "result.json").read_text())["status"] == "completed"


def test_every_registered_step_is_a_method(model_dir, tmp_path):
    @register_step(88, "custom_probe", requires=(1,))
    def custom(ctx):
        return StepResult(metrics={"n": len(ctx.data(1)["batch"])}, reading="counted")

    try:
        an = MambaMechanisticAnalyzer(_config(model_dir, tmp_path / "b"))
        assert "custom_probe" in dir(an)
        an.setup()
        assert an.custom_probe().metrics == {"n": 8}
        assert an.run_step("custom_probe") is an.results[88]
        with pytest.raises(UsageError, match="not implemented"):
            an.run_step(77)
        with pytest.raises(AttributeError):
            an.no_such_thing  # noqa: B018
        an.close()
    finally:
        unregister_step(88)


def test_failed_step_raises_with_the_reason(model_dir, tmp_path):
    @register_step(89, "broken", requires=(0,))
    def broken(ctx):
        raise ValueError("planted")

    try:
        an = MambaMechanisticAnalyzer(_config(model_dir, tmp_path / "c"))
        an.setup()
        with pytest.raises(RuntimeError, match="step 89 \\(broken\\) failed: ValueError: planted"):
            an.run_step(89)
        an.close()
    finally:
        unregister_step(89)


def test_bad_config_is_a_usage_error(model_dir, tmp_path):
    with pytest.raises(UsageError, match="samples"):
        MambaMechanisticAnalyzer(model=str(model_dir), samples=0)
    an = MambaMechanisticAnalyzer(_config(model_dir, tmp_path / "d", layers="4"))
    with pytest.raises(UsageError, match="layer 4 is out of range"):
        an.setup()
    assert not (tmp_path / "d").exists()
