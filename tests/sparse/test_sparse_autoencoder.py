"""SAE core: planted-feature recovery per architecture, metrics against hand-computed values, schedules, STE."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mamba_interp.sparse_autoencoder import (
    FVUAccumulator,
    SAEConfig,
    SparseAutoencoder,
    dictionary_recovery,
    fvu,
    geometric_median,
    kl_score,
    loss_recovered,
    mmcs,
    planted_features,
    sae_metrics,
    train_sae,
)
from mamba_interp.sparse_autoencoder.model import JumpReLUFn, StepFn, relu_topk_per_token, topk_per_batch, topk_per_token
from mamba_interp.sparse_autoencoder.training import coefficient_multiplier, lr_multiplier
from tests.sparse.helpers import WIDTH, D

# ---- planted features -------------------------------------------------------------

# (architecture, MMCS threshold, fraction of true features with max cos > 0.9, L0 range on fresh data)
PLANTED_THRESHOLDS = {
    "topk": (0.99, 0.95, (2.0, 3.0)),
    "relu": (0.98, 0.95, (2.0, 6.0)),
    "batchtopk": (0.98, 0.90, (2.0, 4.0)),
    "jumprelu": (0.98, 0.95, (1.5, 4.0)),
}


@pytest.mark.parametrize("arch", list(PLANTED_THRESHOLDS))
def test_planted_features_recovered(arch, planted, planted_eval, planted_sae):
    sae = planted_sae(arch)
    min_mmcs, min_frac, (l0_lo, l0_hi) = PLANTED_THRESHOLDS[arch]
    rec = dictionary_recovery(planted.features, sae.W_dec)
    m = sae_metrics(sae, planted_eval.activations)
    assert sae.W_dec.shape == (WIDTH, D)
    assert rec.mmcs >= min_mmcs, f"{arch}: MMCS {rec.mmcs:.4f} < {min_mmcs}"
    assert rec.mmcs == pytest.approx(mmcs(planted.features, sae.W_dec))
    assert rec.frac_above_0_9 >= min_frac, f"{arch}: only {rec.frac_above_0_9:.1%} of true features above cos 0.9"
    assert l0_lo <= m.l0 <= l0_hi, f"{arch}: L0 {m.l0:.2f} outside [{l0_lo}, {l0_hi}] (true E[L0] = 3)"
    assert m.fvu < 0.15, f"{arch}: FVU {m.fvu:.3f}"
    assert m.n_dense == 0


def test_relu_with_too_small_l1_gives_dense_code_and_fails(planted, planted_eval):
    """Negative control (§3.4: λ too small gives a dense code and MMCS collapses), so the recovery test can fail."""
    cfg = SAEConfig(d_in=D, d_sae=WIDTH, architecture="relu", l1_coefficient=0.1, steps=1000, seed=0)
    sae = train_sae(planted.activations, cfg)
    m = sae_metrics(sae, planted_eval.activations)
    assert mmcs(planted.features, sae.W_dec) < 0.9
    assert m.l0 > 20


def test_batchtopk_exports_a_jumprelu_threshold(planted_sae, planted_eval):
    sae = planted_sae("batchtopk")
    theta = sae.threshold
    assert theta is not None and theta.shape == (WIDTH,)
    assert torch.all(theta == theta[0]) and theta[0] > 0
    f = sae.encode(planted_eval.activations[:1000])
    assert torch.all((f == 0) | (f > theta[0]))  # inference is a JumpReLU at θ


def test_topk_decoder_rows_stay_unit_norm(planted_sae):
    sae = planted_sae("topk")
    assert sae.activation_scale != 1.0  # unfolded: W_dec is still in the training (normalised) units
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


# ---- determinism and validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_same_seed_same_weights(arch, planted):
    extra = {"k": 3} if arch in ("topk", "batchtopk") else {"l1_coefficient": 1.0}
    cfg = SAEConfig(
        d_in=D, d_sae=32, architecture=arch, steps=30, batch_size=256, seed=3, dead_window_tokens=1024, **extra
    )
    x = planted.activations[:20_000]
    a, b = train_sae(x, cfg), train_sae(x, cfg)
    c = train_sae(x, cfg.replace(seed=4))
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name
    assert not torch.equal(a.W_dec, c.W_dec)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(architecture="topk"), "needs an integer k"),
        (dict(architecture="topk", k=0), "needs an integer k"),
        (dict(architecture="batchtopk", k=300), "needs an integer k"),
        (dict(architecture="relu"), "l1_coefficient > 0"),
        (dict(architecture="jumprelu", l1_coefficient=0.0), "l1_coefficient > 0"),
        (dict(architecture="gated", k=3), "architecture='gated' is unknown"),
        (dict(architecture="topk", k=3, d_sae=0), "d_sae=0 must be a positive integer"),
        (dict(architecture="topk", k=3, lr=0.0), "lr=0.0 must be > 0"),
        (dict(architecture="topk", k=3, lr_warmup_frac=0.6, lr_decay_frac=0.6), "would overlap"),
        (dict(architecture="topk", k=3, b_dec_init="median"), "b_dec_init='median' is unknown"),
        (dict(architecture="topk", k=3, normalize_activations="layer_norm"), "is unknown"),
        (dict(architecture="topk", k=3, steps=1.5), "steps=1.5 must be a positive integer"),
    ],
)
def test_config_validation(kwargs, message):
    base = dict(d_in=8, d_sae=16)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SAEConfig(**base)


def test_config_round_trips_through_dict():
    cfg = SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2, adam_betas=(0.0, 0.99))
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SAEConfig fields"):
        SAEConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3


def test_train_sae_rejects_bad_activations():
    cfg = SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2, batch_size=64)
    with pytest.raises(ValueError, match="shape"):
        train_sae(torch.randn(100, 9), cfg)
    with pytest.raises(ValueError, match="batch_size"):
        train_sae(torch.randn(10, 8), cfg)


# ---- metrics on hand-built SAEs ---------------------------------------------------------------------------


def _identity_relu_sae(d: int, decoder_scale: float) -> SparseAutoencoder:
    """f = ReLU(x), x̂ = decoder_scale · f (b = 0), plus d dead latents."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", l1_coefficient=1.0))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, :d] = torch.eye(d)
        sae.b_enc.zero_()
        sae.b_enc[d:] = -1.0  # the second half never fires on inputs in [0, 1)
        sae.W_dec.zero_()
        sae.W_dec[:d] = decoder_scale * torch.eye(d)
        sae.b_dec.zero_()
    return sae


def test_sae_metrics_match_hand_computation():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5000, 6, generator=gen) * (torch.rand(5000, 6, generator=gen) < 0.5)
    x[:, 0] = torch.rand(5000, generator=gen) + 0.01  # latent 0 fires on every token: dense
    sae = _identity_relu_sae(6, 0.5)
    m = sae_metrics(sae, x, batch_size=777)  # uneven batches exercise the streaming sums
    xd = x.double()
    expected_l0 = (xd > 0).sum(1).double().mean().item()
    expected_fvu = ((0.5 * xd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert m.l0 == pytest.approx(expected_l0, rel=1e-12)
    assert m.fvu == pytest.approx(expected_fvu.item(), rel=1e-9)
    assert m.shrinkage == pytest.approx(0.5, rel=1e-9)  # γ = E‖x̂‖²/E[x·x̂] = 0.25/0.5
    assert m.l2_ratio == pytest.approx(0.5, rel=1e-9)
    assert m.cossim == pytest.approx(1.0, rel=1e-9)
    assert m.n_dead == 6 and m.dead_fraction == pytest.approx(0.5)
    assert m.n_dense >= 1 and m.density[0] == pytest.approx(1.0)


def test_streaming_fvu_is_the_pooled_formula_not_the_legacy_ratio():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 5, generator=gen) * torch.tensor([10.0, 1, 1, 1, 1]) + 3.0
    x_hat = x + 0.3 * torch.randn(3000, 5, generator=gen)
    acc = FVUAccumulator()
    for chunk in torch.split(torch.arange(3000), 401):
        acc.update(x[chunk], x_hat[chunk])
    xd, xh = x.double(), x_hat.double()
    pooled = ((xd - xh) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    legacy = (((xd - xh) ** 2).sum(1) / ((xd - xd.mean(0)) ** 2).sum(1)).mean()
    buggy_total = (xd**2).sum(1).mean() - ((xd**2).mean(0).mean()) ** 2  # SAELens-6.18 denominator (§1.2)
    assert acc.fvu == pytest.approx(pooled.item(), rel=1e-10)
    assert fvu(x, x_hat) == pytest.approx(pooled.item(), rel=1e-10)
    assert abs(acc.fvu - legacy.item()) > 0.01 * pooled.item()
    assert abs(acc.total_variance - buggy_total.item()) > 1.0


def test_mmcs_and_recovery_on_known_dictionaries():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(20, 16, generator=gen)
    perm = g[torch.randperm(20, generator=gen)] * 3.0  # same atoms, shuffled and rescaled
    assert mmcs(g, perm) == pytest.approx(1.0, abs=1e-12)
    assert mmcs(g, torch.cat([perm, torch.randn(10, 16, generator=gen)])) == pytest.approx(1.0, abs=1e-12)
    half = g[:10]
    rec = dictionary_recovery(g, torch.cat([half, half]))  # 10 atoms duplicated: half the features missing
    assert rec.mmcs < 0.8
    abs_mmcs = (
        (
            torch.nn.functional.normalize(g.double(), dim=1)
            @ torch.nn.functional.normalize(torch.cat([half, half]).double(), dim=1).T
        )
        .abs()
        .max(1)
        .values.mean()
    )
    assert rec.mcc <= abs_mmcs.item() + 1e-12  # one-to-one matching can only lose against the best |cos|
    assert dictionary_recovery(g, perm).mcc == pytest.approx(1.0, abs=1e-12)
    assert rec.uniqueness == pytest.approx(0.5)
    assert rec.frac_above_0_99 == pytest.approx(0.5)
    assert mmcs(g, torch.randn(20, 16, generator=gen)) < 0.7


def test_geometric_median_matches_brute_force():
    from scipy.optimize import minimize

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=gen).double()
    x[:20] += 50.0  # outliers pull the mean, not the median
    gm = geometric_median(x, max_iter=1000, tol=1e-10)
    ref = minimize(
        lambda g: (x - torch.from_numpy(g)).norm(dim=1).sum().item(),
        x.median(0).values.numpy(),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000},
    ).x
    assert torch.allclose(gm, torch.from_numpy(ref), atol=1e-4)
    assert (gm - x.mean(0)).norm() > 1.0


def test_loss_recovered_and_kl_score():
    r = loss_recovered(clean_loss=1.0, spliced_loss=1.5, zero_ablation_loss=5.0, mean_ablation_loss=3.0)
    assert r.recovered_vs_zero == pytest.approx(0.875)
    assert r.recovered_vs_mean == pytest.approx(0.75)
    assert r.delta_loss == pytest.approx(0.5)
    assert math.isnan(loss_recovered(1.0, 1.2, 1.0, 2.0).recovered_vs_zero)
    with pytest.raises(ValueError, match="finite"):
        loss_recovered(1.0, float("nan"), 2.0, 2.0)
    assert kl_score(kl_spliced=0.1, kl_ablation=0.4) == pytest.approx(0.75)


# ---- schedules and estimators -----------------------------------------------------------------------------


def test_lr_and_coefficient_schedules():
    cfg = SAEConfig(
        d_in=4, d_sae=8, architecture="topk", k=1, steps=100, lr_warmup_frac=0.1, lr_decay_frac=0.2, l1_warmup_frac=0.5
    )
    lrs = [lr_multiplier(t, cfg) for t in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80])
    assert lrs[80] == pytest.approx(1.0) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    coefs = [coefficient_multiplier(t, cfg) for t in range(100)]
    assert coefs[0] == pytest.approx(0.02) and coefs[49] == pytest.approx(1.0) and coefs[99] == 1.0


def test_jumprelu_straight_through_gradients():
    """∂f/∂θ = −(θ/ε)·1[|h−θ| < ε/2], ∂H/∂θ = −(1/ε)·1[...], ∂f/∂h = H(h−θ) (Rajamanoharan et al. 2024b)."""
    h = torch.tensor([[0.05, 0.45, 0.55, 1.0], [0.48, 0.3, 0.7, -1.0]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    eps = 0.2
    f = JumpReLUFn.apply(h, theta, eps)
    assert torch.equal(f.detach(), torch.tensor([[0.0, 0.0, 0.55, 1.0], [0.0, 0.0, 0.7, 0.0]]))
    f.sum().backward()
    assert torch.equal(h.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]]))
    near = torch.tensor([[0.0, 1, 1, 0], [1, 0, 0, 0]])  # |h − θ| < 0.1
    assert torch.allclose(theta.grad, -(0.5 / eps) * near.sum(0))
    theta.grad = None
    StepFn.apply(h, theta, eps).sum().backward()
    assert torch.allclose(theta.grad, -(1 / eps) * near.sum(0))


def test_batch_topk_keeps_k_per_token_on_average():
    acts = torch.rand(8, 50, generator=torch.Generator().manual_seed(0))
    out = topk_per_batch(acts, 3)
    assert int((out != 0).sum()) == 24
    kept = out[out != 0]
    assert kept.min() >= acts[out == 0].max()


@pytest.mark.slow
@pytest.mark.parametrize("arch, kwargs, min_mmcs", [("topk", {"k": 5}, 0.99), ("relu", {"l1_coefficient": 3.0}, 0.98)])
def test_planted_features_sharkey_size(arch, kwargs, min_mmcs):
    """d = 256, n = 512, E[L0] = 5, m = 1024, batch 256, 2000 steps (512k tokens; §3.4 second table).

    Measured: TopK k = 5 MMCS 0.9994 (L0 4.9, FVU 0.056); L1 λ = 3 MMCS 0.9976 (L0 9.4, FVU 0.073); ~25 CPU-s each.
    """
    data = planted_features(512, 256, 200_000, l0=5, seed=0)
    cfg = SAEConfig(d_in=256, d_sae=1024, architecture=arch, steps=2000, batch_size=256, seed=0, **kwargs)
    sae = train_sae(data.activations, cfg)
    rec = dictionary_recovery(data.features, sae.W_dec)
    assert rec.mmcs >= min_mmcs and rec.frac_above_0_9 >= 0.95, rec


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu", "jumprelu"])
def test_fast_training_loss_matches_the_dense_reference_in_values_and_gradients(arch):
    """The default training loss (pre-activations without a [t, m] x [m, d] product for b_dec, TopK decoding
    only its k rows) against the dense reference, with AuxK active on a third of the latents."""
    from mamba_interp.sparse_autoencoder.training import training_loss

    torch.manual_seed(0)
    d, m = 12, 48
    cfg = SAEConfig(d_in=d, d_sae=m, architecture=arch, k=4 if arch in ("topk", "batchtopk") else None,
                    l1_coefficient=0.0 if arch in ("topk", "batchtopk") else 0.5, seed=0)
    sae = SparseAutoencoder(cfg).double()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.0, 0.3)
    x = torch.randn(64, d, dtype=torch.float64)
    dead = torch.arange(m) % 3 == 0
    out = {}
    for dense in (True, False):
        sae.zero_grad(set_to_none=True)
        loss, f, parts = training_loss(sae, x, 0.3, dead, dense=dense)
        loss.backward()
        out[dense] = (loss.detach(), f.detach(), {k: v.clone() for k, v in parts.items()},
                      {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
    (l_ref, f_ref, p_ref, g_ref), (l_fast, f_fast, p_fast, g_fast) = out[True], out[False]
    assert torch.allclose(l_fast, l_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(f_fast != 0, f_ref != 0) and torch.allclose(f_fast, f_ref, rtol=1e-10, atol=1e-12)
    for key in p_ref:
        assert torch.allclose(p_fast[key], p_ref[key], rtol=1e-10, atol=1e-12), key
    if cfg.uses_auxk:
        assert float(p_ref["aux"]) > 0  # the AuxK branch ran
    assert set(g_fast) == set(g_ref) and {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(g_ref)
    for name in g_ref:
        assert torch.allclose(g_fast[name], g_ref[name], rtol=1e-9, atol=1e-11), name


def test_decoder_gradient_projection_matches_the_unit_row_formula():
    """remove_parallel_decoder_grad (no [m, d] temporaries) against g − (g·ŵ)ŵ with ŵ = w / |w| (Bricken et al.)."""
    from mamba_interp.sparse_autoencoder import SAEConfig, SparseAutoencoder

    sae = SparseAutoencoder(SAEConfig(d_in=12, d_sae=30, architecture="topk", k=4, seed=3)).double()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(30, 1, dtype=torch.float64) + 0.5)  # rows of different norms
    g = torch.randn(30, 12, dtype=torch.float64)
    sae.W_dec.grad = g.clone()
    sae.remove_parallel_decoder_grad()
    w_hat = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    expected = g - (g * w_hat).sum(1, keepdim=True) * w_hat
    assert torch.allclose(sae.W_dec.grad, expected, rtol=1e-12, atol=1e-12)
    assert (sae.W_dec.grad * w_hat).sum(1).abs().max() < 1e-12


def test_relu_topk_equals_topk_of_relu_in_values_and_gradients():
    """The inference TopK takes the top k of the pre-activations and ReLUs only those; the reference ReLUs all of
    them first. Rows with fewer than k positive entries (where the two pick different zeros) included."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(64, 40, generator=gen, dtype=torch.float64)
    h[:8] = -h[:8].abs()  # no positive entry
    h[8:16, 3:] = -h[8:16, 3:].abs()  # three positive entries, fewer than k
    weights = torch.randn(64, 40, generator=gen, dtype=torch.float64)
    h_fast, h_ref = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    fast, ref = relu_topk_per_token(h_fast, 5), topk_per_token(torch.relu(h_ref), 5)
    assert torch.equal(fast, ref)
    assert int((ref != 0).sum(1).max()) == 5 and int((ref[:8] != 0).sum()) == 0
    (fast * weights).sum().backward()
    (ref * weights).sum().backward()
    assert torch.equal(h_fast.grad, h_ref.grad)
