"""SAEs in the loop: run_with_saes against hand-written hooks, the error term's exactness, latent edits, steering,
and latent attribution against a finite difference."""

from __future__ import annotations

import pytest
import torch

from mamba_interp import HookedMamba, HookError, MambaConfig
from mamba_interp.sparse_autoencoder import (
    SAEConfig,
    SparseAutoencoder,
    ablate_latents,
    latent_attribution,
    run_with_saes,
    saes_spliced,
    steer_latents,
    steering_hook,
)

HOOK = "blocks.0.mixer.hook_x"


def _sae(d_in: int, seed: int, arch: str = "relu") -> SparseAutoencoder:
    cfg = SAEConfig(d_in=d_in, d_sae=2 * d_in, architecture=arch, k=4 if arch == "topk" else None,
                    l1_coefficient=1.0 if arch == "relu" else 0.0, seed=seed)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():  # a random SAE whose latents fire often (relu of a random projection, bias up)
        sae.b_enc.fill_(0.05)
    return sae.eval()


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def setup(request):
    torch.manual_seed(0)
    kw = {"headdim": 8} if request.param == "mamba2" else {}
    model = HookedMamba(MambaConfig(arch=request.param, d_model=16, n_layer=2, vocab_size=12, d_state=4, **kw)).eval()
    ids = torch.randint(0, 12, (3, 10), generator=torch.Generator().manual_seed(1))
    return model, ids, _sae(model.cfg.d_inner, seed=2)


def test_error_term_keeps_the_model_exact(setup):
    model, ids, sae = setup
    clean = model(ids)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            spliced = model.run_with_saes(ids, saes={HOOK: sae, "blocks.1.hook_resid_post": _sae(16, 3)},
                                          use_error_term=True)
        assert torch.equal(spliced.detach(), clean), grad


def test_reconstruction_splice_equals_a_hand_written_hook(setup):
    model, ids, sae = setup

    def by_hand(act, hook):
        flat = act.reshape(*act.shape[:2], -1)
        return sae.decode(sae.encode(flat)).reshape(act.shape)

    with torch.no_grad():
        expected = model.run_with_hooks(ids, fwd_hooks=[(HOOK, by_hand)])
        got = run_with_saes(model, ids, saes={HOOK: sae})
    assert torch.equal(got, expected) and not torch.allclose(got, model(ids))


def test_ablation_moves_the_activation_by_the_decoder_rows(setup):
    model, ids, sae = setup
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=HOOK)
        x = cache[HOOK].reshape(3, 10, -1)
        f = sae.encode(x)
        fired = (f > 0).float().sum((0, 1))
        latents = fired.topk(2).indices
        positions = torch.tensor([1, 4, 9])
        with saes_spliced(model, {HOOK: sae}, use_error_term=True,
                          latent_edits={HOOK: ablate_latents(latents, positions=positions)}):
            _, edited = model.run_with_cache(ids, names_filter=HOOK)
    delta = torch.zeros_like(f)
    rows = torch.arange(3)
    delta[rows[:, None], positions[:, None], latents[None, :]] = -f[rows[:, None], positions[:, None], latents[None, :]]
    expected = x + delta @ sae.W_dec
    torch.testing.assert_close(edited[HOOK].reshape(3, 10, -1), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(edited[HOOK].reshape(3, 10, -1), x)


def test_steering_edits_and_hook(setup):
    model, ids, sae = setup
    f = torch.rand(2, 5, sae.cfg.d_sae)
    added = steer_latents({3: 2.0}, positions=[0, 4])(f)
    assert torch.equal(added[:, [0, 4], 3], f[:, [0, 4], 3] + 2.0) and torch.equal(added[:, 1:4], f[:, 1:4])
    clamped = steer_latents({1: -1.0, 2: 0.5}, mode="set")(f)
    assert bool((clamped[..., 1] == -1).all() and (clamped[..., 2] == 0.5).all())
    with pytest.raises(ValueError, match="one position per sequence"):
        ablate_latents([0], positions=torch.tensor([[1]]))(f)
    with pytest.raises(ValueError, match="'add' or 'set'"):
        steer_latents({0: 1.0}, mode="mul")
    # steering_hook adds coefficient * W_dec[i] to the activation itself
    with torch.no_grad():
        _, clean = model.run_with_cache(ids, names_filter=HOOK)
        _, steered = model.run_with_cache(ids, names_filter=HOOK, fwd_hooks=[(HOOK, steering_hook(sae, 5, 3.0))])
    diff = (steered[HOOK] - clean[HOOK]).reshape(3, 10, -1)
    torch.testing.assert_close(diff, (3.0 * sae.W_dec[5]).expand(3, 10, -1), rtol=1e-5, atol=1e-6)


def test_latent_attribution_matches_a_hand_written_gradient(setup):
    """Δ_i = −Σ_t f_i(t) · (∂L/∂x(t) · W_dec[i]), with ∂L/∂x taken by a hand-written hook that makes the hooked
    activation a leaf; the model's parameters get no gradient as a side effect."""
    model, ids, sae = setup
    vocab = model.cfg.vocab_size

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))

    att = latent_attribution(model, loss, ids, saes={HOOK: sae})[HOOK]
    assert att.shape == (sae.cfg.d_sae,) and all(p.grad is None for p in model.parameters())
    leaf = {}

    def grab(act, hook):
        leaf["x"] = act.detach().requires_grad_(True)
        return leaf["x"]

    (grad,) = torch.autograd.grad(loss(model.run_with_hooks(ids, fwd_hooks=[(HOOK, grab)])), leaf["x"])
    with torch.no_grad():
        x, g = leaf["x"].reshape(3, 10, -1), grad.reshape(3, 10, -1)
        expected = -torch.einsum("blm,blm->m", sae.encode(x), g @ sae.W_dec.T)
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(att, expected, rtol=1e-4, atol=1e-7)


def test_bad_splices_are_clear_errors(setup):
    model, ids, sae = setup
    with pytest.raises(HookError, match="unknown hook name"):
        run_with_saes(model, ids, saes={"blocks.0.mixer.hook_xx": sae})
    with pytest.raises(ValueError, match="d_in"):
        run_with_saes(model, ids, saes={"blocks.0.hook_resid_post": sae})
    with pytest.raises(ValueError, match="has no SAE"):
        run_with_saes(model, ids, saes={HOOK: sae}, latent_edits={"blocks.1.mixer.hook_x": ablate_latents([0])})
    with pytest.raises(TypeError, match="SparseAutoencoder"):
        run_with_saes(model, ids, saes={HOOK: "sae"})
    assert not any(hp.active for hp in model.hook_dict.values())
