"""The disk-backed activation store against the in-memory path: the same values, the same statistics, the same
step-2, step-3 and step-4 metrics; its files are plain safetensors."""

from __future__ import annotations

import pickle

import pytest
import torch
from pipeline_helpers import read_result, run_pipeline

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.pipeline.activation_stats import baseline_stats, collect_activations, delta_stats
from mamba_interp.pipeline.activation_store import ActivationWriter, DiskActivationSet

HOOKS = ("resid_post", "x", "dt", "B", "y", "state_norm")


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def both(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = MambaConfig(arch=request.param, d_model=32, n_layer=2, vocab_size=20, d_state=8, headdim=16)
    model = HookedMamba(cfg).eval()
    tokens = torch.randint(1, 20, (9, 13))
    mask = torch.ones(9, 13, dtype=torch.long)
    mask[2, :4] = 0  # left padding
    mem = collect_activations(model, tokens, [0, 1], HOOKS, batch_size=4, attention_mask=mask)
    folder = tmp_path_factory.mktemp(f"store_{request.param}")
    disk = collect_activations(model, tokens, [0, 1], HOOKS, batch_size=4, attention_mask=mask,
                               writer=ActivationWriter(folder, 9, 13))
    return mem, disk


def test_disk_store_holds_the_same_values_in_plain_safetensors(both):
    from safetensors import safe_open

    mem, disk = both
    assert isinstance(disk, DiskActivationSet) and not list(disk.folder.glob("*.partial"))
    assert torch.equal(disk.mask, mem.mask) and disk.shapes == mem.shapes
    for key in mem.acts:
        assert torch.equal(disk[key], mem[key])  # the memory-mapped view
        assert torch.equal(disk.rows(key, 3, 7), mem[key][3:7])  # a chunked file read
        assert torch.equal(disk.tokens(*key), mem.tokens(*key))
        with safe_open(str(disk.folder / f"{_name(key)}.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor(_name(key)), mem[key])
    sub, msub = disk.subset(slice(2, 8)), mem.subset(slice(2, 8))
    assert torch.equal(sub.token_source("x", 1).read_all(), msub.tokens("x", 1))
    back = pickle.loads(pickle.dumps(sub.only("x", 1)))  # what a Ray worker receives: the folder, not the data
    assert len(pickle.dumps(sub)) < 2000 and torch.equal(back.token_source("x", 1).read_all(), msub.tokens("x", 1))
    reopened = DiskActivationSet.open(disk.folder)
    assert torch.equal(reopened[("y", 0)], mem[("y", 0)])


def _name(key):
    from mamba_interp.pipeline.activation_stats import hook_name

    return hook_name(*key)


def test_streamed_statistics_are_identical_and_match_the_one_pass_reference(both):
    import numpy as np
    from scipy import stats

    mem, disk = both
    for key in mem.acts:
        a = baseline_stats(mem.token_source(*key))
        b = baseline_stats(disk.token_source(*key))
        assert a.summary == b.summary
        for name in a.per_dim:
            np.testing.assert_array_equal(a.per_dim[name], b.per_dim[name])
        x = mem.tokens(*key).double().numpy()  # the reference: one pass over all tokens with scipy
        np.testing.assert_allclose(a.per_dim["std"], x.std(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(a.per_dim["kurtosis"], stats.kurtosis(x, axis=0, bias=True), rtol=1e-7,
                                   atol=1e-9)
        assert a.summary["kurtosis"] == pytest.approx(float(stats.kurtosis(x.ravel(), bias=True)), rel=1e-8)
    A = -torch.ones(mem[("dt", 0)].shape[-1], 4)
    assert delta_stats(mem.token_source("dt", 0), A, 13).summary == delta_stats(disk.token_source("dt", 0), A,
                                                                                13).summary


def test_writer_refuses_a_misshapen_batch_and_leaves_no_partial_file(tmp_path):
    w = ActivationWriter(tmp_path, 4, 5)
    w.write(("x", 0), 0, torch.zeros(2, 5, 3), (3,))
    with pytest.raises(ValueError, match="does not fit"):
        w.write(("x", 0), 3, torch.zeros(2, 5, 3), (3,))
    w.abort()
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory):
    from test_step_sae import tiny_model_dir

    model = tiny_model_dir(tmp_path_factory)
    # a shuffle buffer of 102 rows of x, against 256 training tokens: SAE training streams in both runs
    opts = {"sae": {"hooks": ["x"], "epochs": 2.0, "batch_size": 32, "k": 8, "shuffle_buffer_mb": 0.025},
            "probes": {"hooks": ["x"], "max_tokens": 200, "state_max_tokens": 200,
                       "n_resamples": 100, "state_random": 2, "amnesic_sequences": 8, "ks": [1, 4]}}
    outs = {}
    for store in ("memory", "disk"):
        out = tmp_path_factory.mktemp(store) / "run"
        _, summary = run_pipeline(model, out, steps="0-4", samples=16, activation_store=store, step_options=opts,
                                  figures=store == "disk")  # the disk run draws from streamed histograms
        assert summary.exit_code == 0
        outs[store] = out
    return outs


@pytest.mark.parametrize("folder", ["step_02_activations", "step_03_sae", "step_04_probes"])
def test_disk_store_gives_the_memory_path_metrics(store_runs, folder):
    mem, disk = (read_result(store_runs[s], folder) for s in ("memory", "disk"))
    assert mem["status"] == disk["status"] == "completed", (mem.get("error"), disk.get("error"))
    assert mem["metrics"] == disk["metrics"]
    # where activations live does not change what is computed, so it is in no resume key
    assert "activation_store" not in mem["key_inputs"]["fields"]


def test_disk_store_run_writes_the_store_and_resume_loads_it(store_runs):
    res = read_result(store_runs["disk"], "step_02_activations")
    assert any(a.startswith("activations/") for a in res["artifacts"])
    assert not (store_runs["disk"] / "step_02_activations" / "activations.safetensors").exists()
    assert (store_runs["disk"] / "step_02_activations" / "activations" / "index.json").is_file()
    assert res["peak_rss_mb"] is None or res["peak_rss_mb"] > 50
