"""SAE save/load (SAELens layout), normalisation folding, feature–variable correlation, top examples, figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mamba_interp.sparse_autoencoder import (
    SAEConfig,
    encode_activations,
    feature_variable_correlation,
    load_sae,
    one_hot_variables,
    plot_feature_density,
    plot_feature_variable_matches,
    plot_training_history,
    sae_metrics,
    save_sae,
    top_activating_examples,
    train_sae,
)
from mamba_interp.sparse_autoencoder.io import folded_copy
from tests.sparse.helpers import D

SMALL = {
    "relu": dict(architecture="relu", l1_coefficient=1.0),
    "topk": dict(architecture="topk", k=3),
    "batchtopk": dict(architecture="batchtopk", k=3),
    "jumprelu": dict(architecture="jumprelu", l1_coefficient=1.0),
}


@pytest.fixture(scope="module")
def raw_activations(planted):
    """Planted activations with a large offset and scale, like a residual stream (so s and b_dec matter)."""
    return planted.activations[:30_000] * 7.0 + 2.0


@pytest.fixture(scope="module")
def small_saes(raw_activations):
    out = {}
    for arch, kw in SMALL.items():
        cfg = SAEConfig(d_in=D, d_sae=96, steps=150, batch_size=256, seed=1, dead_window_tokens=5000, **kw)
        out[arch] = train_sae(raw_activations, cfg)
    return out


@pytest.mark.parametrize("arch", list(SMALL))
def test_save_load_round_trip(arch, small_saes, raw_activations, tmp_path):
    sae = small_saes[arch]
    folder = save_sae(
        sae, tmp_path / arch, hook_name="blocks.1.hook_resid_post", model_name="zoo-default", extra={"note": "x"}
    )
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    expected_arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[arch]
    assert cfg["architecture"] == expected_arch
    assert (cfg["d_in"], cfg["d_sae"], cfg["normalize_activations"], cfg["apply_b_dec_to_input"]) == (
        D,
        96,
        "none",
        True,
    )
    assert cfg["metadata"] == {"sae_lens_version": "6.0.0", "sae_lens_training_version": None,
                               "hook_name": "blocks.1.hook_resid_post", "model_name": "zoo-default"}
    assert cfg["mamba_interp"]["architecture"] == arch and cfg["mamba_interp"]["extra"] == {"note": "x"}
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    expected_keys = {"W_enc", "W_dec", "b_enc", "b_dec"} | (
        {"threshold"} if arch in ("batchtopk", "jumprelu") else set()
    )
    assert set(tensors) == expected_keys
    assert tensors["W_enc"].shape == (D, 96) and tensors["W_dec"].shape == (96, D)
    if arch == "topk":
        assert cfg["k"] == 3 and cfg["rescale_acts_by_decoder_norm"] is False

    loaded = load_sae(folder)
    assert loaded.cfg == sae.cfg and loaded.activation_scale == 1.0
    x = raw_activations[:2000]
    folded = folded_copy(sae)
    assert torch.equal(loaded.encode(x), folded.encode(x))  # bit-exact round trip of the saved weights
    assert torch.equal(loaded(x), folded(x))
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(SMALL))
def test_normalisation_is_folded_into_saved_weights(arch, small_saes, raw_activations, tmp_path):
    """The saved SAE takes raw activations and gives the reconstructions of the unfolded one."""
    sae = small_saes[arch]
    assert sae.activation_scale == pytest.approx(
        np.sqrt(D) / raw_activations.double().norm(dim=1).mean().item(), rel=1e-6
    )
    assert abs(sae.activation_scale - 1.0) > 0.1
    loaded = load_sae(save_sae(sae, tmp_path / arch))
    x = raw_activations[:2000]
    before, after = sae(x), loaded(x)
    rel = ((before - after).norm() / before.norm()).item()
    assert rel < 1e-5, f"folded reconstruction differs by {rel:.2e}"
    assert (sae.encode(x) != 0).eq(loaded.encode(x) != 0).float().mean() > 0.999  # same active latents
    m_before, m_after = sae_metrics(sae, x), sae_metrics(loaded, x)
    assert m_after.fvu == pytest.approx(m_before.fvu, rel=1e-4)


def test_legacy_weights_name_and_foreign_folders(small_saes, tmp_path):
    sae = small_saes["topk"]
    folder = save_sae(sae, tmp_path / "both")
    # a folder written before the rename (sae.safetensors) still loads; saving again replaces the old file
    (folder / "sae_weights.safetensors").rename(folder / "sae.safetensors")
    assert torch.equal(load_sae(folder).W_dec, folded_copy(sae).W_dec)
    save_sae(sae, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    # a folder as SAELens writes it: its own cfg.json without our block
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.pop("mamba_interp")
    (folder / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_sae(folder)
    x = torch.randn(100, D)
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 3
    assert torch.equal(loaded.encode(x), folded_copy(sae).encode(x))
    # SAELens TopK trained with rescale_acts_by_decoder_norm: it ranks h·‖W_dec,i‖ and decodes f/‖W_dec,i‖
    cfg["rescale_acts_by_decoder_norm"] = True
    t = load_file(str(folder / "sae_weights.safetensors"))
    norms = torch.linspace(0.5, 2.0, 96)
    t["W_dec"] = t["W_dec"] * norms[:, None]
    save_file(t, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    h = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    ranked = torch.relu(h * norms)
    top = ranked.topk(3, dim=-1)
    f = torch.zeros_like(ranked).scatter(-1, top.indices, top.values)
    reference = (f / norms) @ t["W_dec"] + t["b_dec"]  # SAELens TopKSAE forward with rescaling
    torch.testing.assert_close(load_sae(folder)(x), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path / "missing")


def test_feature_variable_correlation_finds_planted_feature(planted, planted_sae, planted_eval):
    sae = planted_sae("topk")
    f = encode_activations(sae, planted_eval.activations.view(100, 200, D))  # [b, l, m]
    assert f.shape == (100, 200, sae.cfg.d_sae)
    # ground-truth variables: the coefficients of two true features, and one with NaNs (undefined positions)
    v5 = planted_eval.codes[:, 5].view(100, 200)
    v9 = planted_eval.codes[:, 9].clone().view(100, 200)
    v9[:, :50] = float("nan")
    noise = torch.randn(100, 200, generator=torch.Generator().manual_seed(0))
    corr = feature_variable_correlation(f, {"c5": v5, "c9": v9, "noise": noise}, n_shuffles=3, seed=0)
    matches = {m["variable"]: m for m in corr.matches()}
    for name, j in (("c5", 5), ("c9", 9)):
        assert matches[name]["r"] >= 0.9, matches[name]
        assert matches[name]["shuffled_best_abs_r"] < 0.1
        cos = torch.nn.functional.cosine_similarity(sae.W_dec[matches[name]["latent"]], planted.features[j], dim=0)
        assert cos > 0.99  # the best-correlated latent is the one aligned with that true feature
    assert matches["c9"]["n_tokens"] == 100 * 150
    assert matches["noise"]["abs_r"] < 0.1
    # the null baseline is of the same order as the noise variable's best |r| (both are max over latents of noise)
    assert matches["noise"]["abs_r"] < 3 * matches["noise"]["shuffled_best_abs_r_max"] + 0.02


def test_correlating_a_subset_of_latents_equals_correlating_their_copy(planted_sae, planted_eval):
    """``latents=`` (the live latents, gathered a chunk at a time) gives what the copy ``f[..., latents]`` gives,
    for a variable defined on all tokens and one with undefined (NaN) positions."""
    sae = planted_sae("topk")
    f = encode_activations(sae, planted_eval.activations[:4000])  # [t, m]
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(4000, generator=gen, dtype=torch.float64) + f[:, 7].double()
    partial = v.clone()
    partial[::3] = float("nan")
    variables = {"v": v, "partial": partial}
    latents = torch.randperm(f.shape[1], generator=gen)[:37]
    subset = feature_variable_correlation(f, variables, n_shuffles=2, seed=3, latents=latents)
    copied = feature_variable_correlation(f[:, latents], variables, n_shuffles=2, seed=3)
    for name in ("r", "best_latent", "best_r", "shuffled_best_abs_r", "shuffled_best_abs_r_max", "n_tokens"):
        assert torch.allclose(getattr(subset, name).double(), getattr(copied, name).double(), rtol=0, atol=1e-12), name
    assert subset.r.shape == (2, 37)


def test_one_hot_variables():
    labels = torch.tensor([0.0, 2.0, float("nan"), 2.0])
    out = one_hot_variables("y", labels)
    assert list(out) == ["y=0", "y=2"]
    assert torch.equal(out["y=2"][[0, 1, 3]], torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.isnan(out["y=0"][2])


def test_top_activating_examples():
    f = torch.zeros(3, 4, 5)
    f[1, 2, 0], f[2, 3, 0], f[0, 0, 0] = 5.0, 4.0, 1.0
    f[0, 1, 3] = 2.0
    top = top_activating_examples(f, latents=[0, 3, 4], k=3)
    assert top.indices[0].tolist() == [1 * 4 + 2, 2 * 4 + 3, 0]
    assert top.values[0].tolist() == [5.0, 4.0, 1.0]
    assert top.indices[1].tolist() == [1, -1, -1] and top.values[1].tolist() == [2.0, 0.0, 0.0]
    assert top.indices[2].tolist() == [-1, -1, -1]
    coords = top.coords()
    assert coords[0].tolist() == [[1, 2], [2, 3], [0, 0]]
    assert coords[1, 1].tolist() == [-1, -1]
    assert top_activating_examples(f, k=20).indices.shape == (5, 20)


def test_figures_are_written(planted_sae, planted_eval, tmp_path):
    sae = planted_sae("topk")
    m = sae_metrics(sae, planted_eval.activations)
    f = encode_activations(sae, planted_eval.activations[:5000])
    variables = {"c5": planted_eval.codes[:5000, 5], "c9": planted_eval.codes[:5000, 9]}
    corr = feature_variable_correlation(f, variables, n_shuffles=1)
    paths = [
        plot_feature_density({"topk": m.density, "uniform": torch.full((10,), 0.3)}, tmp_path / "density.png"),
        plot_feature_variable_matches(f, variables, corr, tmp_path / "matches.png"),
        plot_training_history(sae.training_history, tmp_path / "history.png"),
    ]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"
