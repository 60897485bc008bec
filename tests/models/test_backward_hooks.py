"""Backward hooks and the gradient cache: ``bwd_hooks=`` in ``hooks()`` / ``run_with_hooks`` and
``run_with_cache(..., incl_bwd=True)`` against plain autograd (``retain_grad``)."""

import pytest
import torch

from mamba_interp import HookedMamba, HookError, MambaConfig
from tests.models.helpers import perturb

CFGS = {
    "mamba1": MambaConfig(arch="mamba1", d_model=16, n_layer=2, vocab_size=11, d_state=4),
    "mamba2": MambaConfig(arch="mamba2", d_model=16, n_layer=2, vocab_size=11, d_state=4, headdim=8, ngroups=2),
}


@pytest.fixture(scope="module", params=list(CFGS))
def model(request):
    torch.manual_seed(0)
    m = HookedMamba(CFGS[request.param])
    perturb(m)
    return m


def ids():
    return torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(3))


def loss_fn(logits):
    return logits[:, -1, 3].sum() - logits[:, 2, 5].sum()


def _autograd_grads(model, names):
    acts = {}

    def keep(x, hook):
        x.retain_grad()
        acts[hook.name] = x

    with model.hooks(fwd_hooks=[(names, keep)]):
        loss_fn(model(ids())).backward()
    model.zero_grad(set_to_none=True)
    return {k: v.grad for k, v in acts.items()}


def test_incl_bwd_caches_the_gradient_of_every_activation(model):
    # the initial states (zeros, no grad: see the last test) and the lazy per-token internals are left out
    names = [n for n in model.hook_dict if not n.endswith(("hook_h0", "hook_conv_state", "hook_dA", "hook_ssm_state"))]
    ref = _autograd_grads(model, names)
    logits, cache = model.run_with_cache(ids(), names_filter=names, incl_bwd=True, backward_fn=loss_fn)
    assert not logits.requires_grad or logits.grad_fn is not None
    for n in names:
        g = cache[n + "_grad"]
        assert g.shape == cache[n].shape
        assert torch.allclose(g, ref[n], atol=1e-6, rtol=1e-5), n
    assert all(p.grad is None for p in model.parameters()), "incl_bwd must not accumulate parameter gradients"


def test_state_gradient_is_the_readout_gradient(model):
    """The cached state's gradient is dLoss/dh_t through y_t = C_t·h_t only (the recurrence is inside the scan)."""
    _, cache = model.run_with_cache(ids(), names_filter=["blocks.1.mixer.hook_ssm_state", "blocks.1.mixer.hook_C",
                                                         "blocks.1.mixer.hook_y"], incl_bwd=True, backward_fn=loss_fn)
    gy, C = cache["blocks.1.mixer.hook_y_grad"], cache["blocks.1.mixer.hook_C"]
    if model.cfg.arch == "mamba1":
        expected = gy[..., None] * C[:, :, None, :]
    else:
        k = model.cfg.nheads // model.cfg.ngroups
        expected = gy[..., None] * C.repeat_interleave(k, 2)[:, :, :, None, :]
    assert torch.allclose(cache["blocks.1.mixer.hook_ssm_state_grad"], expected, atol=1e-6, rtol=1e-5)


def test_bwd_hooks_fire_modify_and_are_removed(model):
    ref = _autograd_grads(model, ["blocks.0.mixer.hook_x", "blocks.1.mixer.hook_x"])
    seen = {}

    def double(g, hook):
        seen[hook.name] = g.clone()
        return 2 * g

    model.run_with_hooks(ids(), bwd_hooks=[("blocks.*.mixer.hook_x", double)], backward_fn=loss_fn)
    assert torch.allclose(seen["blocks.1.mixer.hook_x"], ref["blocks.1.mixer.hook_x"], atol=1e-6)
    # the doubled gradient of layer 1 flows into layer 0 (through the residual only partly), so it differs
    assert not torch.allclose(seen["blocks.0.mixer.hook_x"], ref["blocks.0.mixer.hook_x"], atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    # outside the context nothing fires
    seen.clear()
    loss_fn(model(ids())).backward()
    model.zero_grad(set_to_none=True)
    assert not seen
    assert all(not hp._fns for hp in model.hook_dict.values())


def test_hooks_context_with_bwd_hooks(model):
    got = []
    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_post", lambda g, hook: got.append(g.shape))]):
        loss_fn(model(ids())).backward()
    model.zero_grad(set_to_none=True)
    assert got == [torch.Size([2, 7, 16])]


def test_backward_errors_are_clear(model):
    with pytest.raises(HookError, match="scalar"):
        model.run_with_cache(ids(), names_filter="blocks.0.hook_resid_pre", incl_bwd=True)
    with pytest.raises(HookError, match="shape"):
        model.run_with_hooks(ids(), bwd_hooks=[("blocks.0.mixer.hook_x", lambda g, h: g[:, :1])], backward_fn=loss_fn)
    assert all(not hp._fns for hp in model.hook_dict.values())


def test_incl_bwd_works_under_no_grad_and_for_initial_states(model):
    names = ["blocks.0.mixer.hook_h0", "blocks.0.mixer.hook_conv_state", "hook_embed"]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids(), names_filter=names, incl_bwd=True, backward_fn=loss_fn)
    assert cache["blocks.0.mixer.hook_h0_grad"].abs().sum() > 0
    assert cache["blocks.0.mixer.hook_conv_state_grad"].abs().sum() > 0
    assert cache["hook_embed_grad"].shape == (2, 7, 16)
