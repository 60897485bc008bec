"""Executors: the local one keeps the order of the units; Ray (when installed) gives identical SAEs."""

from __future__ import annotations

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.pipeline.activation_stats import collect_activations
from mamba_interp.pipeline.executor import LocalExecutor, make_executor
from mamba_interp.pipeline.sae_support import SAETrainUnit, train_unit
from mamba_interp.sparse_autoencoder import SAEConfig


def _units(tmp_path):
    from mamba_interp.pipeline.activation_store import ActivationWriter

    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(d_model=32, n_layer=2, vocab_size=20, d_state=8)).eval()
    tokens = torch.randint(0, 20, (16, 12))
    mem = collect_activations(model, tokens, [0, 1], ("resid_post", "x"), 8)
    disk = collect_activations(model, tokens, [0, 1], ("resid_post", "x"), 8, writer=ActivationWriter(tmp_path, 16, 12))
    units = []
    for i, acts in enumerate((mem, disk, mem)):
        short, layer = [("resid_post", 0), ("x", 1), ("x", 0)][i]
        d = acts.width(short, layer)
        cfg = SAEConfig(d_in=d, d_sae=2 * d, k=4, steps=30, batch_size=32, seed=i, log_every=10)
        units.append(SAETrainUnit(f"L{layer}_{short}", short, layer, acts.only(short, layer), cfg,
                                  buffer_tokens=64 if i == 1 else 10_000))  # unit 1 streams through a buffer
    return model, units


def test_local_executor_keeps_the_order_of_the_units():
    ex = LocalExecutor(None, torch.device("cpu"))
    assert ex.map(lambda w, u: u * 2, [3, 1, 2]) == [6, 2, 4]


@pytest.mark.slow
def test_ray_executor_gives_the_local_results(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mamba-interp[distributed]')")
    model, units = _units(tmp_path)
    local = LocalExecutor(model, torch.device("cpu")).map(train_unit, units)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ex = make_executor("ray", model, torch.device("cpu"))
        assert len(ex.actors) == 2
        remote = ex.map(train_unit, units)
        ex.close()
    finally:
        ray.shutdown()
    for a, b in zip(local, remote):
        for name, t in a.state_dict().items():
            assert torch.equal(t, b.state_dict()[name]), name
        assert a.training_history.loss == b.training_history.loss


@pytest.mark.slow
def test_step3_on_ray_equals_step3_local(tmp_path_factory):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'mamba-interp[distributed]')")
    import ray
    from pipeline_helpers import read_result, run_pipeline
    from test_step_sae import tiny_model_dir

    model = tiny_model_dir(tmp_path_factory)
    opts = {"sae": {"hooks": ["resid_post", "x"], "epochs": 2.0, "batch_size": 64, "k": 8}}
    out = {}
    try:
        for kind in ("local", "ray"):
            out[kind] = tmp_path_factory.mktemp(kind) / "run"
            _, summary = run_pipeline(model, out[kind], steps="0-3", samples=16, executor=kind, step_options=opts)
            assert summary.exit_code == 0
    finally:
        ray.shutdown()
    local, remote = (read_result(out[k], "step_03_sae") for k in ("local", "ray"))
    assert remote["status"] == "completed", remote.get("error")
    assert local["metrics"] == remote["metrics"]
