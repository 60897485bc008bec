"""SPD/APD through a HookedMamba's own mixers: every decomposed matrix is really masked (Mamba-1 and Mamba-2),
per-token masks act causally, the KL loss, position classes, and a short decomposition run."""

from __future__ import annotations

import copy

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.parameter_decomposition.mamba import (
    kl_loss,
    mamba_modules,
    mamba_target,
    masked_logits,
    position_classes,
    repeated_token_sampler,
    task_sampler,
)
from mamba_interp.parameter_decomposition.spd import ComponentModel, SPDConfig
from mamba_interp.tasks import get_task


def tiny(arch: str) -> HookedMamba:
    torch.manual_seed(0)
    extra = {"headdim": 8} if arch == "mamba2" else {}
    return HookedMamba(MambaConfig(arch=arch, d_model=16, n_layer=2, vocab_size=12, d_state=4, **extra)).eval()


def exact_svd_model(model: HookedMamba) -> tuple[ComponentModel, object]:
    """Subcomponents that sum exactly to each matrix (its SVD, C = rank)."""
    target = mamba_target(model, repeated_token_sampler(12, 8))
    C = {}
    for n in target.modules:
        o, i = model.get_submodule(n).weight.shape
        C[n] = min(o, i)
    cm = ComponentModel(target, SPDConfig(C=C))
    with torch.no_grad():
        for n in target.modules:
            P, S, Qh = torch.linalg.svd(model.get_submodule(n).weight.double(), full_matrices=False)
            cm.comp(n)._U.copy_((P * S).T.float())
            cm.comp(n)._V.copy_(Qh.float())
    return cm, target


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_every_decomposed_matrix_is_masked(arch):
    model = tiny(arch)
    cm, target = exact_svd_model(model)
    expected = {"mamba1": 8, "mamba2": 4}[arch]
    assert len(target.modules) == expected
    batch = target.sample(3, torch.Generator().manual_seed(0))
    b, l = batch.tokens.shape
    with torch.no_grad():
        ref = model(batch.tokens)
        ones = {n: None for n in target.modules}
        torch.testing.assert_close(cm.forward_with(target.forward, batch, ones), ref, atol=1e-4, rtol=1e-4)
        gen = torch.Generator().manual_seed(1)
        for name in target.modules:
            C = cm.n_components(name)
            m = torch.rand(C, generator=gen)
            out = cm.forward_with(target.forward, batch, {name: m.expand(b, l, C)})
            # brute force: a copy of the model whose weight is U diag(m) V
            other = copy.deepcopy(model)
            c = cm.comp(name)
            other.get_submodule(name).weight.copy_(torch.einsum("co,c,ci->oi", c.U, m, c.V))
            torch.testing.assert_close(out, other(batch.tokens), atol=1e-4, rtol=1e-4)
            zero = cm.forward_with(target.forward, batch, {name: torch.zeros(b, l, C)})
            other.get_submodule(name).weight.zero_()
            torch.testing.assert_close(zero, other(batch.tokens), atol=1e-4, rtol=1e-4)
            # (float32 noise is ~1e-7; dt_proj of a random init moves the logits by ~1e-5)
            assert (zero - ref).abs().max() > 1e-6, f"zeroing {name} changed nothing: it is not on the path"
    for name in target.modules:  # gradients reach every matrix's subcomponents through the model
        C = cm.n_components(name)
        out = cm.forward_with(target.forward, batch, {name: torch.full((b, l, C), 0.5)})
        (gU,) = torch.autograd.grad(out.pow(2).sum(), [cm.comp(name)._U])
        assert gU.abs().sum() > 0, name


def test_per_token_masks_are_causal():
    model = tiny("mamba1")
    cm, target = exact_svd_model(model)
    batch = target.sample(2, torch.Generator().manual_seed(3))
    b, l = batch.tokens.shape
    name = "blocks.0.mixer.in_proj"
    C = cm.n_components(name)
    m = torch.ones(b, l, C)
    m[:, 3] = 0.0
    with torch.no_grad():
        ref = model(batch.tokens)
        out = cm.forward_with(target.forward, batch, {name: m})
    torch.testing.assert_close(out[:, :3], ref[:, :3], atol=1e-4, rtol=1e-4)
    assert (out[:, 3:] - ref[:, 3:]).abs().amax(-1).min() > 1e-5  # position 3 and every later one change


def test_modules_and_errors():
    m1, m2 = tiny("mamba1"), tiny("mamba2")
    assert mamba_modules(m1, [1], ["x_proj"]) == ("blocks.1.mixer.x_proj",)
    assert mamba_modules(m2) == tuple(f"blocks.{i}.mixer.{m}" for i in range(2) for m in ("in_proj", "out_proj"))
    with pytest.raises(ValueError, match="not a Linear of a mamba2"):
        mamba_modules(m2, None, ["dt_proj"])
    with pytest.raises(ValueError, match="does not exist"):
        mamba_modules(m1, [5])


def test_kl_loss_and_position_classes():
    task = get_task("induction", vocab_size=12, seq_len=10)
    batch = task.sample(4, seed=0)
    logits = torch.randn(4, 10, 12)
    assert float(kl_loss(logits, logits, batch)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(4, 10, 12)
    p, q = torch.log_softmax(other, -1), torch.log_softmax(logits, -1)
    manual = (q.exp() * (q - p)).sum(-1).mean()
    torch.testing.assert_close(kl_loss(other, logits, batch), manual)
    classes = position_classes(batch)
    assert set(classes) == {"trigger", "value", "query/answer", "other"}
    total = sum(c.long() for c in classes.values())
    assert bool((total == 1).all())  # a partition of the positions
    rows = torch.arange(4)
    assert bool(classes["trigger"][rows, batch.metadata["trigger_pos"]].all())
    assert bool(classes["query/answer"][:, -1].all())


def test_masked_logits_modes_and_ablation():
    model = tiny("mamba1")
    cm, target = exact_svd_model(model)
    from mamba_interp.parameter_decomposition.decomposition import Decomposition

    dec = Decomposition("spd", cm, target, SPDConfig())
    batch = target.sample(2, torch.Generator().manual_seed(4))
    ref = masked_logits(dec, batch, "target")
    torch.testing.assert_close(masked_logits(dec, batch, "ones"), ref, atol=1e-4, rtol=1e-4)
    name = "blocks.1.mixer.out_proj"
    pos = torch.zeros(2, batch.tokens.shape[1], dtype=torch.bool)
    pos[:, -1] = True
    abl = masked_logits(dec, batch, "ones", ablate={name: torch.arange(cm.n_components(name))}, positions=pos)
    torch.testing.assert_close(abl[:, :-1], ref[:, :-1], atol=1e-4, rtol=1e-4)
    assert (abl[:, -1] - ref[:, -1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="mode"):
        masked_logits(dec, batch, "nope")


def test_the_training_sampler_is_deterministic():
    sample = task_sampler(get_task("induction", vocab_size=12, seq_len=10))
    a, b = sample(3, torch.Generator().manual_seed(0)), sample(3, torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens)


def test_short_spd_and_apd_runs_on_mamba2():
    from mamba_interp.parameter_decomposition.mamba import decompose_mamba, evaluate_modes

    model = tiny("mamba2")
    task = get_task("induction", vocab_size=12, seq_len=8)
    for method, kw in (("spd", {"C": 4, "faithfulness_warmup_steps": 2}), ("apd", {"C": 3, "topk": 1.0})):
        dec = decompose_mamba(model, task_sampler(task), method, layers=[1], steps=2, batch_size=3,
                              progress=False, **kw)
        assert dec.target.modules == ("blocks.1.mixer.in_proj", "blocks.1.mixer.out_proj")
        res = evaluate_modes(dec, task.sample(4, seed=1, split="test"), 2)
        assert set(res) == {"target", "ones", "importance"}
        assert float(res["target"]["kl"].abs().max()) < 1e-6
        assert model.scan_impl == "auto"
