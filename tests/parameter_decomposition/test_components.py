"""Rank-one subcomponents, CI functions and the masked stand-in, against brute-force computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mamba_interp.parameter_decomposition.components import (
    CIFunction,
    LinearComponents,
    MaskedLinear,
    lower_leaky_hard_sigmoid,
    stand_in,
    upper_leaky_hard_sigmoid,
)


def test_masked_apply_matches_per_sample_weights_values_and_grads():
    torch.manual_seed(0)
    comps = LinearComponents(d_in=5, d_out=3, C=7)
    x = torch.randn(4, 6, 5)
    m = torch.rand(4, 6, 7, requires_grad=True)
    fast = comps.apply(x, m)
    # slow reference: build U diag(m) V for every token and multiply
    W_tok = torch.einsum("co,blc,ci->bloi", comps.U, m, comps.V)
    slow = torch.einsum("bloi,bli->blo", W_tok, x)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(fast)
    grads_fast = torch.autograd.grad((fast * g).sum(), [comps.U, comps.V, m])
    grads_slow = torch.autograd.grad((slow * g).sum(), [comps.U, comps.V, m])
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(comps.apply(x, None), x @ comps.weight().T, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(comps.norms(), torch.stack([torch.outer(comps.U[c], comps.V[c]).norm()
                                                           for c in range(7)]))


def test_tied_components_are_the_transpose_and_share_gradients():
    src = LinearComponents(d_in=5, d_out=2, C=4)
    tied = LinearComponents(d_in=2, d_out=5, C=4, tied_to=src)
    assert list(tied.parameters()) == []
    torch.testing.assert_close(tied.weight(), src.weight().T)
    x = torch.randn(3, 2)
    tied.apply(x, torch.rand(3, 4)).sum().backward()
    assert src.U.grad is not None and src.V.grad is not None and src.U.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="transposed shape"):
        LinearComponents(d_in=5, d_out=2, C=4, tied_to=src)


def test_init_from_scales_by_overlap():
    W = torch.randn(3, 6)
    comps = LinearComponents(6, 3, 10)
    comps.init_from(W, torch.Generator().manual_seed(0))
    assert torch.allclose(comps.V.norm(dim=1), torch.ones(10))
    overlap = torch.einsum("co,ci,oi->c", comps.U / comps.U.norm(dim=1, keepdim=True), comps.V, W)
    torch.testing.assert_close(comps.U.norm(dim=1), overlap.abs(), atol=1e-5, rtol=1e-5)


def test_hard_sigmoids():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 3.0], requires_grad=True)
    lo = lower_leaky_hard_sigmoid(x)
    up = upper_leaky_hard_sigmoid(x)
    torch.testing.assert_close(lo, torch.tensor([-0.02, -0.005, 0.0, 0.3, 1.0, 1.0]))
    torch.testing.assert_close(up, torch.tensor([0.0, 0.0, 0.0, 0.3, 1.0, 1.02]))
    (g,) = torch.autograd.grad(lo.sum(), x)
    torch.testing.assert_close(g, torch.tensor([0.01, 0.01, 0.01, 1.0, 1.0, 0.0]))  # clamp passes the grad at 1


def test_ci_function_matches_a_loop_over_subcomponents():
    torch.manual_seed(1)
    fn = CIFunction(C=5, d_gate=4)
    h = torch.randn(3, 7, 5, requires_grad=True)
    fast = fn(h)
    slow = torch.stack([F.gelu(h[..., c, None] * fn.w_in[c] + fn.b_in[c]) @ fn.w_out[c] + fn.b_out[c]
                        for c in range(5)], dim=-1)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    g1 = torch.autograd.grad(fast.sum(), [h, fn.w_in, fn.w_out])
    g2 = torch.autograd.grad(slow.sum(), [h, fn.w_in, fn.w_out])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.proj = nn.Linear(4, 3)
        self.other = nn.Conv1d(1, 1, 1)

    def forward(self, x):
        return self.block.proj(x)


def test_stand_in_swaps_and_restores_even_after_an_error():
    net = _Net()
    original = net.block.proj
    comps = LinearComponents(4, 3, 6)
    with stand_in(net, {"block.proj": comps}) as stands:
        assert isinstance(net.block.proj, MaskedLinear) and stands["block.proj"] is net.block.proj
        stand = stands["block.proj"]
        x = torch.randn(2, 4)
        torch.testing.assert_close(net(x), original(x))  # target mode by default
        stand.use_components, stand.mask = True, torch.zeros(2, 6)
        torch.testing.assert_close(net(x), original.bias.expand(2, 3))  # every subcomponent masked: bias only
        with pytest.raises(AttributeError):
            _ = net.block.proj.weight  # code reading the weight directly fails instead of using the target's
    assert net.block.proj is original
    with pytest.raises(RuntimeError, match="boom"):
        with stand_in(net, {"block.proj": comps}):
            raise RuntimeError("boom")
    assert net.block.proj is original
    with pytest.raises(ValueError, match="not an nn.Linear"):
        with stand_in(net, {"other": comps}):
            pass
    with pytest.raises(ValueError, match="does not exist"):
        with stand_in(net, {"block.nope": comps}):
            pass


def test_routes_and_probes():
    net = _Net()
    comps = LinearComponents(4, 3, 6)
    x = torch.randn(5, 4)
    route = torch.tensor([True, False, True, False, False])
    with stand_in(net, {"block.proj": comps}) as stands:
        s = stands["block.proj"]
        s.use_components, s.mask, s.route = True, None, route
        out = net(x)
        s.route, s.probes, s.record = None, {}, {}
        full = net(x)
    ref_target = F.linear(x, net.block.proj.weight, net.block.proj.bias)
    torch.testing.assert_close(out[route], full[route])
    torch.testing.assert_close(out[~route], ref_target[~route])
    assert s.probes["block.proj"].shape == full.shape and s.record["block.proj"] is x
    (g,) = torch.autograd.grad(full.pow(2).sum(), s.probes["block.proj"])
    torch.testing.assert_close(g, 2 * full.detach())


def test_separately_stepped_tied_components_alias_the_source():
    src = LinearComponents(d_in=5, d_out=2, C=4)
    tied = LinearComponents(d_in=2, d_out=5, C=4, tied_to=src, separate_steps=True)
    assert tied.U.data_ptr() == src.V.data_ptr() and tied.V.data_ptr() == src.U.data_ptr()
    opt = torch.optim.Adam(list(src.parameters()) + list(tied.parameters()), lr=0.1)
    x = torch.randn(3, 2)
    tied.apply(x, None).pow(2).sum().backward()
    assert src.U.grad is None and tied.U.grad is not None  # each matrix has its own gradient
    before = src.weight().detach().clone()
    opt.step()
    torch.testing.assert_close(tied.weight(), src.weight().T)  # still tied after the step
    assert not torch.allclose(before, src.weight())
