"""SAE folders written by the project load in the real SAELens (``pip install -e ".[interop]"``; skipped without it):
``sae_lens.SAE.load_from_disk`` with its default file names, ``hook_name`` and ``model_name`` intact, and the same
encode / decode as the project's SAE to 1e-6. Includes a folder written by pipeline step 3."""

from __future__ import annotations

import json

import pytest
import torch

from mamba_interp.sparse_autoencoder import SAEConfig, load_sae, save_sae, train_sae

sae_lens = pytest.importorskip("sae_lens",
                               reason="sae-lens is not installed (optional extra: pip install -e .[interop])")

TOL = 1e-6
ARCHS = {
    "relu": dict(architecture="relu", l1_coefficient=1.0),
    "topk": dict(architecture="topk", k=4),
    "batchtopk": dict(architecture="batchtopk", k=4),
    "jumprelu": dict(architecture="jumprelu", l1_coefficient=1.0),
}


def agreement(folder, x: torch.Tensor) -> dict[str, float]:
    """Max |difference| of SAELens' encode / decode and ours on x [t, d], relative to the largest value."""
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    ours = load_sae(folder)
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(x), theirs.encode(x)
        d_ours, d_theirs = ours.decode(f_ours), theirs.decode(f_ours)
    return {
        "encode": float((f_ours - f_theirs).abs().max() / f_ours.abs().max().clamp_min(1e-12)),
        "decode": float((d_ours - d_theirs).abs().max() / d_ours.abs().max().clamp_min(1e-12)),
        "active_same": float(((f_ours != 0) == (f_theirs != 0)).float().mean()),
        "hook_name": theirs.cfg.metadata.hook_name,
        "model_name": theirs.cfg.metadata.model_name,
    }


@pytest.mark.parametrize("arch", list(ARCHS))
def test_saved_folders_load_in_saelens(arch, tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 24, generator=gen) * 3 + 1
    sae = train_sae(x, SAEConfig(d_in=24, d_sae=48, steps=60, batch_size=200, seed=0, **ARCHS[arch]))
    folder = save_sae(sae, tmp_path / arch, hook_name="blocks.0.hook_resid_post", model_name="tiny")
    got = agreement(folder, x[:500])
    assert got["hook_name"] == "blocks.0.hook_resid_post" and got["model_name"] == "tiny"
    assert got["encode"] <= TOL and got["decode"] <= TOL and got["active_same"] == 1.0, got


def test_pipeline_written_folder_loads_in_saelens(tmp_path):
    from mamba_interp import HookedMamba, MambaConfig
    from mamba_interp.pipeline import RunConfig, Runner

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    HookedMamba(MambaConfig(d_model=16, n_layer=1, vocab_size=12, d_state=4)).save_pretrained(model_dir)
    (model_dir / "card.json").write_text(json.dumps({"task": "induction", "task_params": {"vocab_size": 12,
                                                                                          "seq_len": 16}}))
    out = tmp_path / "run"
    runner = Runner(RunConfig(model=str(model_dir), output=str(out), samples=16, batch_size=8, quiet=True,
                              figures=False, steps="0-3",
                              step_options={"sae": {"hooks": ["resid_post", "x"], "epochs": 1.0}}))
    try:
        assert runner.run().exit_code == 0
    finally:
        runner.close()
    for key, width in (("L0_resid_post", 16), ("L0_x", 32)):
        x = torch.randn(300, width, generator=torch.Generator().manual_seed(1))
        got = agreement(out / "step_03_sae" / f"sae_{key}", x)
        assert got["hook_name"] == f"blocks.0.{'hook_resid_post' if width == 16 else 'mixer.hook_x'}"
        assert got["model_name"] == "model"
        assert got["encode"] <= TOL and got["decode"] <= TOL, (key, got)
