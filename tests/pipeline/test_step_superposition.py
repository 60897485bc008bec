"""Step 12 (superposition): the TMS reproduction through the runner, SAE decoder geometry, determinism, and a
resumed run that takes step 3's SAEs from disk."""

from __future__ import annotations

import pytest
import torch
from pipeline_helpers import read_result
from test_step_sae import FAST_SAE, sae_run, tiny_model_dir

from mamba_interp.pipeline import RunConfig, Runner
from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import get_step
from mamba_interp.pipeline.steps.s12_superposition import classify_toy
from mamba_interp.superposition import polytope, tegum_product

FIGURES = ("toy_features", "toy_dimensionality", "toy_interference", "sae_decoder_geometry", "sae_interference")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Steps 0–3, then a second run with --resume that adds step 12 (figures on): step 3 must come from disk."""
    model = tiny_model_dir(tmp_path_factory)
    out = tmp_path_factory.mktemp("superposition") / "run"
    _, first = sae_run(model, out, figures=True)
    assert first.exit_code == 0
    sae_file = out / "step_03_sae" / "sae_L0_x" / "sae_weights.safetensors"
    before = (sae_file.stat().st_mtime_ns, read_result(out, "step_03_sae")["started_at"])
    runner = Runner(RunConfig(model=str(model), output=str(out), samples=64, batch_size=8, quiet=True, figures=True,
                              steps="3,12", resume=True, step_options={"sae": FAST_SAE}))
    try:
        summary = runner.run()
    finally:
        runner.close()
    after = (sae_file.stat().st_mtime_ns, read_result(out, "step_03_sae")["started_at"])
    return out, summary, before, after


def test_step12_reproduces_the_toy_model_geometry(resumed):
    out, summary, _, _ = resumed
    res = read_result(out, "step_12_superposition")
    assert res["status"] == "completed", res.get("error")
    toy = res["metrics"]["toy"]
    assert list(toy) == ["S=0", "S=0.8", "S=0.9", "S=0.95"]
    # Elhage et al. 2022, n=5 m=2: dense -> 2 orthogonal features; S = 0.8 -> 2 antipodal pairs; S >= 0.9 -> pentagon
    dense = toy["S=0"]
    assert dense["geometry"] == "orthogonal" and dense["n_represented"] == 2
    assert sorted(dense["dimensionality"], reverse=True)[:2] == pytest.approx([1.0, 1.0], abs=0.05)
    pairs = toy["S=0.8"]
    assert pairs["geometry"] == "antipodal pairs" and pairs["n_antipodal_pairs"] == 2
    assert all(0.45 <= d <= 0.55 for d, n in zip(pairs["dimensionality"], pairs["norms"]) if n > 0.5)
    for s in ("S=0.9", "S=0.95"):
        pent = toy[s]
        assert pent["geometry"] == "pentagon" and pent["n_represented"] == 5, s
        assert all(0.35 <= d <= 0.45 for d in pent["dimensionality"]), s
        assert pent["max_gap_deviation_deg"] < 6 and all(b < 0 for b in pent["bias"]), s
    for fig in FIGURES:
        assert (out / "step_12_superposition" / f"{fig}.png").is_file(), fig
    assert "pentagon" in res["reading"]


def test_resume_takes_step3_saes_from_disk(resumed):
    out, summary, before, after = resumed
    assert summary.records[3].resumed and summary.records[3].status == "completed"
    assert before == after  # step 3's folder was not rewritten: its SAEs were loaded, not retrained
    from safetensors.torch import load_file

    density = load_file(str(out / "step_03_sae" / "latent_density.safetensors"))
    dec = read_result(out, "step_12_superposition")["metrics"]["sae_decoders"]
    assert set(dec) == set(density)
    for key, m in dec.items():
        assert m["n_alive"] == int((density[key] > 1e-4).sum())
        assert 0 < m["mean_dimensionality"] <= 1 and m["sum_dimensionality"] <= m["d"] + 1e-6


def test_step12_is_deterministic(resumed, tmp_path_factory, tmp_path):
    """A fresh run (SAEs trained in memory) gives the same metrics as the resumed one (SAEs loaded from disk)."""
    out, _, _, _ = resumed
    _, summary = sae_run(tiny_model_dir(tmp_path_factory), tmp_path / "fresh", steps="12")
    assert summary.exit_code == 0
    assert read_result(tmp_path / "fresh", "step_12_superposition")["metrics"] == \
        read_result(out, "step_12_superposition")["metrics"]


def test_classify_toy_on_exact_polytopes():
    pent = polytope("pentagon").float()
    assert classify_toy(pent, pent.norm(dim=0))["geometry"] == "pentagon"
    pairs = torch.tensor([[1.0, -1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0, 0.0]])
    shape = classify_toy(pairs, pairs.norm(dim=0))
    assert shape["geometry"] == "antipodal pairs" and shape["n_antipodal_pairs"] == 2
    ortho = tegum_product([polytope("dedicated"), polytope("dedicated")]).float()
    ortho = torch.cat([ortho, torch.zeros(2, 3)], 1)
    assert classify_toy(ortho, ortho.norm(dim=0))["geometry"] == "orthogonal"


@pytest.mark.parametrize("bad", [{"sparsities": [1.0]}, {"n_hidden": 5}, {"n_init": 0}, {"lr": 0}])
def test_superposition_options_are_validated(bad):
    with pytest.raises(UsageError):
        get_step(12).make_options(bad)
