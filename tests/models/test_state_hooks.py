"""hook_ssm_state substitution and hook_h0 equal a step-by-step loop that overwrites the state."""

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from tests.models.helpers import perturb

CFGS = {
    "mamba1": MambaConfig(arch="mamba1", d_model=16, n_layer=2, vocab_size=11, d_state=4),
    "mamba2": MambaConfig(arch="mamba2", d_model=16, n_layer=2, vocab_size=11, d_state=4, headdim=8, ngroups=2),
}
LAYER = 1


def _model(arch):
    torch.manual_seed(0)
    model = HookedMamba(CFGS[arch])
    perturb(model)
    return model


def _step_loop_y(model, cache, h0, overwrite):
    """y of layer LAYER from a plain loop: h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t; then h_t <- overwrite(t, h_t)."""
    cfg, mixer = model.cfg, model.blocks[LAYER].mixer
    u, dt, B, C = (cache[k, LAYER].double() for k in ("x", "dt", "B", "C"))
    A = -torch.exp(mixer.A_log.detach().double())
    D = mixer.D.detach().double()
    if cfg.arch == "mamba2":  # broadcast heads/groups to Mamba-1-like per-channel shapes
        k = cfg.nheads // cfg.ngroups
        B, C = B.repeat_interleave(k, 2), C.repeat_interleave(k, 2)  # (b, l, h, n)
    h, ys = h0, []
    for t in range(u.shape[1]):
        if cfg.arch == "mamba1":
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None]
        else:
            h = torch.exp(dt[:, t] * A)[..., None, None] * h + \
                (dt[:, t, :, None] * u[:, t])[..., None] * B[:, t, :, None, :]
        h = overwrite(t, h)
        if cfg.arch == "mamba1":
            ys.append((h * C[:, t, None]).sum(-1) + D * u[:, t])
        else:
            ys.append((h * C[:, t, :, None, :]).sum(-1) + D[:, None] * u[:, t])
    return torch.stack(ys, 1)


def _state_shape(model, b):
    cfg = model.cfg
    if cfg.arch == "mamba1":
        return (b, cfg.d_inner, cfg.d_state)
    return (b, cfg.nheads, cfg.headdim, cfg.d_state)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("edit", ["replace-two-positions", "steer-from-5"])
def test_state_substitution_equals_overwriting_loop(arch, edit):
    model = _model(arch)
    ids = torch.randint(0, 11, (2, 12), generator=torch.Generator().manual_seed(1))
    _, clean = model.run_with_cache(ids)
    clean_states = clean["ssm_state", LAYER].double()
    g = torch.Generator().manual_seed(2)
    new_at = {(0, 3): torch.randn(_state_shape(model, 1)[1:], generator=g),
              (1, 7): torch.randn(_state_shape(model, 1)[1:], generator=g)}
    v = torch.randn(_state_shape(model, 1)[1:], generator=g)

    def hook(states, hook):
        states = states.clone()
        if edit == "replace-two-positions":
            for (bi, t), value in new_at.items():
                states[bi, t] = value
        else:
            states[:, 5:] += v
        return states

    def overwrite(t, h):
        h = h.clone()
        if edit == "replace-two-positions":
            for (bi, tt), value in new_at.items():
                if tt == t:
                    h[bi] = value.double()
        elif t >= 5:
            h = clean_states[:, t] + v.double()  # what the hook returned at t: clean state + v
        return h

    y_ref = _step_loop_y(model, clean, torch.zeros(_state_shape(model, 2), dtype=torch.float64), overwrite)
    name = f"blocks.{LAYER}.mixer.hook_ssm_state"
    logits, patched = model.run_with_cache(ids, fwd_hooks=[(name, hook)], names_filter=lambda n: "hook_y" in n)
    y = patched["y", LAYER].double()
    assert ((y - y_ref).abs().max() / y_ref.abs().max()) < 1e-5
    # downstream: the same logits as patching y itself with the loop's value
    expected = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_y", lambda t, h: y_ref.float())])
    assert ((logits - expected).abs().max() / expected.abs().max()) < 1e-5
    # positions before the first edit are untouched
    first = 3 if edit == "replace-two-positions" else 5
    assert torch.allclose(logits[:, :first], model(ids)[:, :first], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_h0_sets_initial_state(arch):
    model = _model(arch)
    ids = torch.randint(0, 11, (2, 10), generator=torch.Generator().manual_seed(3))
    h0 = torch.randn(_state_shape(model, 2), generator=torch.Generator().manual_seed(4))
    _, clean = model.run_with_cache(ids)
    y_ref = _step_loop_y(model, clean, h0.double(), lambda t, h: h)
    name = f"blocks.{LAYER}.mixer.hook_h0"
    seen = {}

    def set_h0(zeros, hook):
        seen["in"] = zeros
        return h0

    for scan in ("auto", "reference"):  # the fast scans take h0 too
        model.set_scan_impl(scan)
        _, cache = model.run_with_cache(ids, fwd_hooks=[(name, set_h0)], names_filter=f"blocks.{LAYER}.mixer.hook_y")
        assert torch.count_nonzero(seen["in"]) == 0
        y = cache["y", LAYER].double()
        assert ((y - y_ref).abs().max() / y_ref.abs().max()) < 1e-5
    # and with the materialised path (states hooked) too
    _, cache = model.run_with_cache(ids, fwd_hooks=[(name, set_h0)], names_filter=[f"blocks.{LAYER}.mixer.hook_y",
                                                                                   f"blocks.{LAYER}.mixer.hook_ssm_state"])
    assert ((cache["y", LAYER].double() - y_ref).abs().max() / y_ref.abs().max()) < 1e-5


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_gradient_flows_into_substituted_state(arch):
    """d logits / d (substituted state) equals the gradient through the overwriting step loop."""
    model = _model(arch)
    ids = torch.randint(0, 11, (1, 8), generator=torch.Generator().manual_seed(5))
    _, clean = model.run_with_cache(ids)
    value = torch.randn(_state_shape(model, 1), generator=torch.Generator().manual_seed(6), requires_grad=True)

    def hook(states, hook):
        return torch.cat([states[:, :4], value.unsqueeze(1), states[:, 5:]], dim=1)

    _, cache = model.run_with_cache(ids, fwd_hooks=[(f"blocks.{LAYER}.mixer.hook_ssm_state", hook)],
                                    names_filter=f"blocks.{LAYER}.mixer.hook_y", detach=False)
    cache["y", LAYER].sum().backward()
    ours = value.grad.clone()
    value.grad = None
    v64 = value.detach().double().requires_grad_(True)
    y_ref = _step_loop_y(model, clean, torch.zeros(_state_shape(model, 1), dtype=torch.float64),
                         lambda t, h: v64 if t == 4 else h)
    y_ref.sum().backward()
    assert ((ours.double() - v64.grad).abs().max() / v64.grad.abs().max()) < 1e-5


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_dA_hook_feeds_the_recurrence(arch):
    """Zeroing exp(ΔA) at position t makes the state forget everything before t."""
    model = _model(arch)
    ids = torch.randint(0, 11, (1, 10), generator=torch.Generator().manual_seed(7))

    def forget_at_6(dA, hook):
        dA = dA.clone()
        dA[:, 6] = 0
        return dA

    name = f"blocks.{LAYER}.mixer.hook_dA"
    out = model.run_with_hooks(ids, fwd_hooks=[(name, forget_at_6)])
    # with decay 0 at position 6, the state after token 6 is its input term alone
    _, cache = model.run_with_cache(ids, fwd_hooks=[(name, forget_at_6)], names_filter=f"blocks.{LAYER}.mixer.hook_ssm_state")
    _, clean = model.run_with_cache(ids, names_filter=[f"blocks.{LAYER}.mixer.hook_ssm_state", f"blocks.{LAYER}.mixer.hook_dA"])
    s6 = cache["ssm_state", LAYER][:, 6]
    states, dA6 = clean["ssm_state", LAYER], clean["dA", LAYER][:, 6]
    if arch == "mamba2":
        dA6 = dA6[..., None, None]  # (b, h) -> (b, h, 1, 1) against (b, h, p, n)
    direct = states[:, 6] - dA6 * states[:, 5]  # the input term Δ_6 u_6 B_6 alone
    assert torch.allclose(s6, direct, atol=1e-5)
    assert not torch.allclose(out[:, 6:], model(ids)[:, 6:])
    assert torch.allclose(out[:, :6], model(ids)[:, :6], rtol=0, atol=1e-6)
