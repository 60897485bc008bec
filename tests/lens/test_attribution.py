"""Direct logit attribution: contributions plus bias terms sum to the logit (difference) for both architectures,
with and without final-norm / unembedding biases; a hand-run decomposition of the residual agrees; the per-unit
split sums to each mixer; shapes, chunking and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mamba_interp.lens import direct_logit_attribution, dla_at
from mamba_interp.models.norms import RMSNorm
from tests.lens.helpers import VOCAB, tiny_model, tokens

REL_TOL = 1e-4


class BiasedRMSNorm(RMSNorm):
    """An RMSNorm with a bias (as a LayerNorm-style final norm would have), to exercise the bias term."""

    def __init__(self, base: RMSNorm, seed: int) -> None:
        super().__init__(base.weight.numel(), base.eps)
        self.weight = base.weight
        self.bias = nn.Parameter(torch.randn(base.weight.numel(), generator=torch.Generator().manual_seed(seed)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.bias


def _with_biases(model):
    d, v = model.cfg.d_model, model.cfg.padded_vocab_size
    model.norm_f = BiasedRMSNorm(model.norm_f, seed=5)
    head = nn.Linear(d, v, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(torch.randn(v, generator=torch.Generator().manual_seed(6)))
    model.lm_head = head
    return model


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("biased", [False, True])
@pytest.mark.parametrize("wrong", ["none", "ids", "mean"])
def test_contributions_sum_to_the_logit_difference(arch, biased, wrong):
    model = tiny_model(arch, seed=3)
    if biased:
        model = _with_biases(model)
    ids = tokens(b=8, seed=4)
    g = torch.Generator().manual_seed(7)
    answer = torch.randint(0, VOCAB, (8,), generator=g)
    wrong_arg = {"none": None, "ids": (answer + 1) % VOCAB, "mean": "mean"}[wrong]
    res = direct_logit_attribution(model, ids, answer, wrong_arg, units=True)
    stack, names = res.stacked()
    assert names == ["embed", "blocks.0.mixer", "blocks.1.mixer"]
    err = (stack.sum(0) + res.bias - res.total).abs() / res.total.abs().max()
    assert float(err.max()) <= REL_TOL
    assert bool((res.bias != 0).all()) == biased
    with torch.no_grad():
        logits = model(ids)[:, -1].double()
    expected = logits[torch.arange(8), answer]
    if wrong == "ids":
        expected = expected - logits[torch.arange(8), wrong_arg]
    elif wrong == "mean":
        expected = expected - logits[:, :VOCAB].mean(-1)
    torch.testing.assert_close(res.total, expected)
    for name, per_unit in res.units.items():
        assert per_unit.shape[-1] == (model.cfg.nheads if arch == "mamba2" else model.cfg.d_inner)
        torch.testing.assert_close(per_unit.sum(-1), res.contributions[name], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@torch.no_grad()
def test_matches_a_hand_run_decomposition(arch):
    """Run the blocks by hand (no hooks): r = embed + Σ mixer outputs; DLA_c = lm_head(γ ⊙ r_c / s)[answer]."""
    model = tiny_model(arch, seed=8)
    ids = tokens(b=4, seed=9)
    answer = torch.tensor([1, 5, 7, 11])
    parts = [model.embed(ids)]
    resid = parts[0]
    for block in model.blocks:
        out = block.mixer(block.norm(resid))
        parts.append(out)
        resid = resid + out
    final = resid[:, -1].double()
    s = torch.sqrt(final.pow(2).mean(-1, keepdim=True) + model.norm_f.eps)
    gamma = model.norm_f.weight.double()
    w_u = model.lm_head.weight.double()
    res = direct_logit_attribution(model, ids, answer)
    for name, part in zip(res.contributions, parts):
        ref = ((gamma * part[:, -1].double() / s) @ w_u.T)[torch.arange(4), answer]
        torch.testing.assert_close(res.contributions[name], ref, atol=1e-6, rtol=1e-5)


def test_several_positions_and_chunking():
    model = tiny_model("mamba2", seed=10)
    ids = tokens(b=5, seed=11)
    positions = torch.tensor([[2, 7], [0, 11], [3, 3], [5, 9], [10, 1]])
    answer = ids.gather(1, (positions + 1).clamp(max=11))
    res = direct_logit_attribution(model, ids, answer, "mean", position=positions, units=True)
    assert res.total.shape == (5, 2) and res.units["blocks.0.mixer"].shape == (5, 2, model.cfg.nheads)
    rows = torch.arange(5)[:, None].expand(5, 2).reshape(-1)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    flat = dla_at(model, ids, rows[order], positions.reshape(-1)[order], answer.reshape(-1)[order], "mean",
                  units=True, batch_size=2)
    for name in res.contributions:
        torch.testing.assert_close(flat.contributions[name], res.contributions[name].reshape(-1)[order])
    torch.testing.assert_close(flat.units["blocks.1.mixer"], res.units["blocks.1.mixer"].reshape(10, -1)[order])


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("mamba1", seed=12)
    ids = tokens(b=3)
    with pytest.raises(ValueError, match="must both be"):
        direct_logit_attribution(model, ids, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="wrong="):
        direct_logit_attribution(model, ids, torch.tensor([1, 2, 3]), "median")
    with pytest.raises(ValueError, match="one token per pair"):
        dla_at(model, ids, torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([1, 2]), torch.tensor([4]))
