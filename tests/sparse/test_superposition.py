"""Toy Models of Superposition (Elhage et al. 2022) and the geometry measures."""

from __future__ import annotations

import math

import pytest
import torch

from mamba_interp.superposition import (
    POLYTOPE_DIMENSIONALITY,
    angle_gaps_deg,
    decoder_geometry,
    dimensions_per_feature,
    feature_dimensionality,
    interference,
    plot_decoder_geometry,
    plot_dimensionality,
    plot_feature_arrows,
    plot_interference,
    polytope,
    sample_toy_batch,
    tegum_product,
    toy_forward,
    toy_geometry,
    train_toy_model,
    train_toy_models,
)

# ---- exact geometry (§4.4) --------------------------------------------------------------------------------


def test_feature_dimensionality_exact_on_polytopes():
    names = list(POLYTOPE_DIMENSIONALITY)
    blocks = [polytope(n) for n in names]
    W = tegum_product(blocks, total_dim=20)  # disjoint coordinates of R^20
    assert W.shape == (20, 1 + 2 + 3 + 4 + 5 + 8)
    dims = feature_dimensionality(W)
    expected = torch.cat(
        [torch.full((b.shape[1],), POLYTOPE_DIMENSIONALITY[n], dtype=torch.float64) for n, b in zip(names, blocks)]
    )
    assert dims.dtype == torch.float64
    assert (dims - expected).abs().max().item() < 1e-12
    assert [POLYTOPE_DIMENSIONALITY[n] for n in names] == [1.0, 1 / 2, 2 / 3, 3 / 4, 2 / 5, 3 / 8]
    for b in blocks:
        assert torch.allclose(b.norm(dim=0), torch.ones(b.shape[1], dtype=torch.float64), atol=1e-15)


def test_dimensionality_is_scale_invariant_and_zero_for_unrepresented_features():
    W = tegum_product([polytope("pentagon") * 1.7, polytope("antipodal") * 0.3, torch.zeros(1, 1, dtype=torch.float64)])
    dims = feature_dimensionality(W)
    assert torch.allclose(dims[:5], torch.full((5,), 0.4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(dims[5:7], torch.full((2,), 0.5, dtype=torch.float64), atol=1e-12)
    assert dims[7] == 0.0
    batched = feature_dimensionality(torch.stack([W, 2 * W]))
    assert torch.allclose(batched[0], batched[1], atol=1e-12)


def test_dims_per_feature_and_interference():
    W = tegum_product([polytope("pentagon"), polytope("dedicated")])  # 3 dims, 6 unit features
    assert float(dimensions_per_feature(W)) == pytest.approx(3 / 6)
    inter = interference(W)
    # pentagon: Σ_{j≠i} cos² = 5/2 − 1 (tight frame in 2-D); dedicated feature: 0
    assert torch.allclose(inter[:5], torch.full((5,), 1.5, dtype=torch.float64), atol=1e-12)
    assert inter[5] == pytest.approx(0.0, abs=1e-15)
    gaps = angle_gaps_deg(polytope("pentagon"))
    assert torch.allclose(gaps, torch.full((5,), 72.0, dtype=torch.float64), atol=1e-9)


def test_decoder_geometry_matches_the_column_formula():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(40, 8, generator=gen) * torch.rand(40, 1, generator=gen)  # arbitrary row norms
    g = decoder_geometry(rows)
    unit = rows / rows.norm(dim=1, keepdim=True)
    assert torch.allclose(g.dimensionality, feature_dimensionality(unit.T), atol=1e-12)
    assert g.dims_per_feature == pytest.approx(8 / 40)
    raw = decoder_geometry(rows, normalize=False)
    assert torch.allclose(raw.dimensionality, feature_dimensionality(rows.T), atol=1e-12)
    assert torch.allclose(raw.interference, interference(rows.T), atol=1e-10)
    assert raw.dims_per_feature == pytest.approx(float(dimensions_per_feature(rows.T)))
    assert g.sum_dimensionality <= 8 + 1e-9 and raw.sum_dimensionality <= 8 + 1e-9  # Σ D_i ≤ D
    ortho = decoder_geometry(torch.eye(6), alive=torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool), chunk=3)
    assert ortho.n_features == 4 and torch.allclose(ortho.dimensionality, torch.ones(4, dtype=torch.float64))
    assert ortho.max_abs_cos.abs().max() == 0.0 and ortho.feature_ids.tolist() == [0, 1, 2, 3]
    # a tight frame of 2d unit vectors: every D_i = 1/2 (the true planted dictionary is close to it only on average)
    frame = torch.cat([torch.eye(6), torch.linalg.qr(torch.randn(6, 6, generator=gen)).Q.T])
    tight = decoder_geometry(frame)
    assert torch.allclose(tight.dimensionality, torch.full((12,), 0.5, dtype=torch.float64), atol=1e-12)
    assert tight.sum_dimensionality == pytest.approx(6.0, abs=1e-12)  # equality for a tight frame


def test_decoder_geometry_of_a_trained_sae(planted_sae, planted):
    """The SAE atoms matched to the 128 true features reproduce the true dictionary's superposition geometry."""
    sae = planted_sae("topk")
    cos = (
        torch.nn.functional.normalize(planted.features, dim=1)
        @ torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).T
    )
    matched = cos.argmax(1)
    assert matched.unique().numel() == 128
    g, truth = decoder_geometry(sae.W_dec[matched]), decoder_geometry(planted.features)
    assert truth.dims_per_feature == pytest.approx(0.5) and g.dims_per_feature == pytest.approx(0.5)
    assert (g.dimensionality - truth.dimensionality).abs().max() < 0.02
    assert (g.interference - truth.interference).abs().max() < 0.1
    alive = (sae.encode(planted.activations[:20_000]) != 0).any(0)
    assert decoder_geometry(sae.W_dec, alive=alive).n_features == int(alive.sum()) >= 128


# ---- Toy Models of Superposition, n = 5, m = 2, importance 0.9^i (§4.3a) -----------------------------------

SEEDS_PER_LEVEL = 4
LEVELS = {"dense": 1.0, "S=0.8": 0.2, "S=0.9": 0.1, "S=0.95": 0.05}


def _train_levels(steps: int, lr: float, seed: int):
    probs = [p for p in LEVELS.values() for _ in range(SEEDS_PER_LEVEL)]
    models = train_toy_models(5, 2, probs, importance=0.9, steps=steps, seed=seed, lr=lr)
    # expected loss of each instance on one large shared-seed batch, to pick the best seed per level
    x = sample_toy_batch(100_000, models.feature_probability, 5, torch.Generator().manual_seed(99))
    loss = (models.importance * (x - toy_forward(models.W, models.b, x)) ** 2).mean(dim=(0, 2))
    out = {}
    for j, name in enumerate(LEVELS):
        idx = list(range(j * SEEDS_PER_LEVEL, (j + 1) * SEEDS_PER_LEVEL))
        best = min(idx, key=lambda i: float(loss[i]))
        out[name] = (
            [toy_geometry(models.W[i], models.b[i]) for i in idx],
            toy_geometry(models.W[best], models.b[best]),
            models.W[best],
        )
    return out


def _is_orthogonal_pair(g) -> bool:
    rep = (g.norms > 0.5).nonzero().flatten().tolist()
    if rep != [0, 1]:
        return False
    angle = abs(float(g.angles_deg[0] - g.angles_deg[1])) % 360
    return abs(math.cos(math.radians(angle))) < 0.05 and bool((g.dimensionality[:2] > 0.95).all())


def _is_two_antipodal_pairs(g, W) -> bool:
    rep = (g.norms > 0.5).nonzero().flatten().tolist()
    if rep != [0, 1, 2, 3] or g.norms[4] > 0.1:
        return False
    Wn = W[:, rep] / W[:, rep].norm(dim=0)
    cos = Wn.T @ Wn
    paired = all(float(cos[i].min()) < -0.95 for i in range(4))
    return paired and bool(((g.dimensionality[:4] >= 0.45) & (g.dimensionality[:4] <= 0.55)).all())


def _is_pentagon(g, W) -> bool:
    if not bool((g.norms > 0.9).all()):
        return False
    gaps = angle_gaps_deg(W)
    return bool(
        ((g.dimensionality >= 0.35) & (g.dimensionality <= 0.45)).all()
        and ((gaps - 72).abs() <= 6).all()
        and (g.bias < 0).all()
    )


def _check_tms(results):
    seeds, best, W = results["dense"]
    assert _is_orthogonal_pair(best), best.to_dict()
    assert sum(_is_orthogonal_pair(g) for g in seeds) >= 3
    assert torch.allclose(best.bias[2:], torch.full((3,), 0.5, dtype=torch.float64), atol=0.05)  # = E[x_i] of dropped

    seeds, best, W = results["S=0.8"]
    assert _is_two_antipodal_pairs(best, W), best.to_dict()
    assert sum(g.n_represented == 4 for g in seeds) >= SEEDS_PER_LEVEL // 2  # the boundary is close (§4.3)

    for level in ("S=0.9", "S=0.95"):
        seeds, best, W = results[level]
        assert _is_pentagon(best, W), (level, best.to_dict())
        assert sum(g.n_represented == 5 for g in seeds) >= SEEDS_PER_LEVEL // 2
    assert sum(g.n_represented == 5 for g in results["S=0.95"][0]) >= 3


def test_tms_intro_geometry_fast():
    """Same model and data at lr 1e-2 for 2000 steps (the paper's lr 1e-3 / 10k steps is the slow test)."""
    _check_tms(_train_levels(steps=2000, lr=1e-2, seed=1))


@pytest.mark.slow
def test_tms_intro_geometry_paper_recipe():
    """AdamW lr 1e-3, weight decay 0.01, batch 1024, 10k steps (notebook cell 4)."""
    _check_tms(_train_levels(steps=10_000, lr=1e-3, seed=1))


def test_train_toy_model_is_deterministic_and_shaped():
    W, b = train_toy_model(5, 2, feature_probability=0.1, importance=0.9, steps=20, seed=7)
    W2, b2 = train_toy_model(5, 2, feature_probability=0.1, importance=0.9, steps=20, seed=7)
    W3, _ = train_toy_model(5, 2, feature_probability=0.1, importance=0.9, steps=20, seed=8)
    assert W.shape == (2, 5) and b.shape == (5,)
    assert torch.equal(W, W2) and torch.equal(b, b2) and not torch.equal(W, W3)
    with pytest.raises(ValueError, match="feature_probability"):
        train_toy_model(5, 2, feature_probability=0.0, importance=1.0, steps=1, seed=0)
    with pytest.raises(ValueError, match="importance has 3 entries"):
        train_toy_model(5, 2, feature_probability=0.5, importance=[1.0, 1.0, 1.0], steps=1, seed=0)


def test_superposition_figures(tmp_path):
    models = train_toy_models(5, 2, [1.0, 0.2, 0.05], importance=0.9, steps=300, seed=0, lr=1e-2)
    Ws = list(models.W)
    paths = [
        plot_feature_arrows(
            Ws, tmp_path / "arrows.png", titles=["S=0", "S=0.8", "S=0.95"], importance=models.importance
        ),
        plot_dimensionality([1.0, 0.2, 0.05], Ws, tmp_path / "dims.png"),
        plot_interference(Ws[2], tmp_path / "wtw.png"),
        plot_decoder_geometry({"frame": decoder_geometry(torch.randn(30, 8))}, tmp_path / "geom.png"),
    ]
    for p in paths:
        assert p.is_file() and p.read_bytes()[:4] == b"\x89PNG"
