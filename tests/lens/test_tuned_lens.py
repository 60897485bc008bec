"""Tuned lens: zero-initialised translators are the logit lens exactly; after training on the default zoo model
the final entry stays the model (KL ≤ 1e-3) and every layer's KL on its training tokens is ≤ the logit lens's
(held-out KL is only reported); save / load round trip; validation."""

from __future__ import annotations

import pytest
import torch

from mamba_interp import zoo
from mamba_interp.lens import TunedLens, TunedLensConfig, logit_lens
from tests.lens.helpers import tiny_model, tokens


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_zero_initialised_lens_is_the_logit_lens(arch):
    model = tiny_model(arch, seed=1)
    ids = tokens(seed=5)
    tuned = TunedLens.for_model(model).lens(model, ids, ids, return_logits=True)
    plain = logit_lens(model, ids, ids)
    assert torch.equal(tuned.kl, plain.kl)
    assert torch.equal(tuned.logits, plain.logits)
    assert torch.equal(tuned.target_rank, plain.target_rank)


@pytest.fixture(scope="module")
def trained():
    model = zoo.load(zoo.DEFAULT)
    task = zoo.load_task(zoo.DEFAULT)
    train = task.sample(48, seed=0, split="test").tokens
    test = task.sample(48, seed=1, split="test").tokens
    lens = TunedLens.for_model(model)
    fit = lens.fit(model, train, config=TunedLensConfig(steps=120, seed=0))
    return model, lens, fit, train, test


def test_training_lowers_kl_on_its_tokens_and_keeps_the_final_entry(trained):
    model, lens, fit, train, test = trained
    assert fit.tokens == train.numel() and len(fit.history) == 120
    assert fit.history[-1] < fit.history[0]
    before = logit_lens(model, train, return_logits=False).kl_by_layer()
    after = lens.kl_by_layer(model, train)
    torch.testing.assert_close(fit.kl_before, before, atol=1e-5, rtol=1e-4)  # zero init = the logit lens
    torch.testing.assert_close(fit.kl_after, after, atol=1e-5, rtol=1e-4)
    assert float(after[-1]) <= 1e-3
    assert bool((after <= before + 1e-9).all()), (after, before)
    assert float(after[0]) < 0.5 * float(before[0])  # the embedding's lens improves a lot (5.9 -> 0.9 nats)
    held_out = lens.kl_by_layer(model, test)  # reported, not required to beat the logit lens
    assert torch.isfinite(held_out).all() and float(held_out[-1]) <= 1e-3


def test_save_and_load_round_trip(trained, tmp_path):
    model, lens, _, _, test = trained
    lens.save(tmp_path / "lens")
    again = TunedLens.load(tmp_path / "lens")
    assert torch.equal(again.kl_by_layer(model, test), lens.kl_by_layer(model, test))
    with pytest.raises(FileNotFoundError, match="tuned_lens.json"):
        TunedLens.load(tmp_path)


def test_validation():
    with pytest.raises(ValueError, match="steps"):
        TunedLensConfig(steps=0)
    with pytest.raises(ValueError, match="momentum"):
        TunedLensConfig(momentum=1.0)
    with pytest.raises(ValueError, match="residual stack"):
        TunedLens(8, 2).translate(torch.zeros(2, 4, 8))
