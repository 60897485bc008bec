"""MambaMechanisticAnalyzer: the same steps as the CLI, driven from Python; the methodology's names; the
top-level modules of a checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.experimental_framework import ExperimentConfig, MambaMechanisticAnalyzer
from mamba_interp.pipeline import RunConfig, StepResult, register_step
from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline import registry
from mamba_interp.pipeline.registry import unregister_step

ROOT = Path(__file__).resolve().parents[1]


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


def test_experiment_config_is_the_run_config_with_model_name():
    cfg = ExperimentConfig(model_name="induction-mamba1", samples=8)
    assert isinstance(cfg, RunConfig) and cfg.model == cfg.model_name == "induction-mamba1"
    assert cfg.to_dict() == RunConfig(model="induction-mamba1", samples=8).to_dict()
    again = cfg.replace(samples=4)
    assert type(again) is ExperimentConfig and again.model_name == "induction-mamba1" and again.samples == 4
    assert ExperimentConfig(model="x").model_name == "x"
    with pytest.raises(UsageError, match="not both"):
        ExperimentConfig(model="a", model_name="b")
    with pytest.raises(UsageError, match="samples"):
        ExperimentConfig(model_name="a", samples=0)


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


@pytest.fixture
def private_registry(monkeypatch):
    """The step registry as a copy for one test: steps registered or removed in it vanish afterwards."""
    registry.all_steps()  # discover the real steps first
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry._REGISTRY


def test_methodology_names_name_the_missing_step(model_dir, tmp_path, private_registry):
    private_registry.pop(5, None)
    private_registry.pop(6, None)
    with MambaMechanisticAnalyzer(_config(model_dir, tmp_path / "m")) as an:
        an.setup()
        with pytest.raises(NotImplementedError, match=r"select_candidate_circuits\(\) runs step 5 \(circuits\)"):
            an.select_candidate_circuits()
        with pytest.raises(NotImplementedError, match=r"test_circuit_causality\(\) runs step 6 \(causality\)"):
            an.test_circuit_causality()


def test_methodology_names_run_their_steps_once_registered(model_dir, tmp_path, private_registry):
    private_registry.pop(5, None)
    private_registry.pop(6, None)
    calls = []

    @register_step(5, "circuits", requires=(1,))
    def circuits(ctx):
        calls.append(5)
        return StepResult(metrics={"n_circuits": 2}, reading="two candidates", data={"circuits": ["a", "b"]})

    @register_step(6, "causality", requires=(5,))
    def causality(ctx):
        calls.append(6)
        return StepResult(metrics={"tested": len(ctx.data(5)["circuits"])}, reading="tested")

    with MambaMechanisticAnalyzer(_config(model_dir, tmp_path / "n")) as an:
        an.setup()
        assert an.select_candidate_circuits().metrics == {"n_circuits": 2}
        assert an.test_circuit_causality().metrics == {"tested": 2}
        assert calls == [5, 6]  # step 6 reused step 5 of this session


SEED_EXAMPLE = """
from experimental_framework import ExperimentConfig, MambaMechanisticAnalyzer
from sparse_autoencoder import SparseAutoencoder, load_sae

config = ExperimentConfig(model_name="induction-mamba1", output={out!r}, samples=16, batch_size=16, quiet=True,
                          figures=False, step_options={{"sae": {{"hooks": ["resid_post"], "epochs": 1.0}},
                                                        # steps 4-8 on few hooks and controls (time budget)
                                                        "probes": {{"hooks": ["resid_post"], "amnesic": False}},
                                                        "ssm_dynamics": {{"knockout": False}},
                                                        "temporal": {{"lengths": []}},
                                                        "circuits": {{"hooks": ["resid_pre", "ssm_state"],
                                                                      "max_evals": 20}},
                                                        "causality": {{"n_random": 10, "agreement_samples": 4,
                                                                       "n_permutations": 999}}}})
analyzer = MambaMechanisticAnalyzer(config)
analyzer.setup()
activations = analyzer.collect_activations()
features = analyzer.discover_interpretable_features()
try:
    circuits = analyzer.select_candidate_circuits()
    results = analyzer.test_circuit_causality()
except NotImplementedError as exc:
    print("NOT YET:", exc)
sae = analyzer.data(3)["saes"]["L1_resid_post"].sae
assert isinstance(sae, SparseAutoencoder)
print("ACTIVATIONS", sorted(activations.hooks))
print(features)
print("REPORT", analyzer.report())
"""


def test_the_seed_usage_example_runs_from_the_repository_root(tmp_path):
    """The methodology's usage, from a checkout (no install, no PYTHONPATH), with a zoo model for the hub id."""
    from mamba_interp import zoo

    if "induction-mamba1" not in zoo.names():
        pytest.skip("the zoo model induction-mamba1 is not shipped")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    script = textwrap.dedent(SEED_EXAMPLE.format(out=str(tmp_path / "run")))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "ACTIVATIONS" in out and "StepResult(reading='2 topk" in out and "REPORT" in out
    if "NOT YET" in out:
        assert "runs step 5 (circuits)" in out
    assert (tmp_path / "run" / "step_03_sae" / "sae_L1_resid_post" / "sae_weights.safetensors").is_file()
