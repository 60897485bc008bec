"""Layer / component ablation: zero ablation equals a hand-run model without that mixer; every mixer zeroed
equals decoding the embedding; per-position means and resampling replace what they should; per-example scores
of ``evaluate``; validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mamba_interp.lens import layer_ablation
from mamba_interp.lens.ablation import _replacement
from mamba_interp.pipeline.datasets import evaluate
from mamba_interp.tasks.base import TaskBatch
from tests.lens.helpers import tiny_model, tokens


def _batch(b: int = 8, seed: int = 0) -> TaskBatch:
    ids = tokens(b=b, seed=seed)
    targets = ids.roll(-1, 1)
    targets[:, :6] = -100  # score the second half only
    targets[:, -1] = -100
    return TaskBatch(ids, targets)


@torch.no_grad()
def _hand_loss(model, batch, skip: set[int]) -> float:
    resid = model.embed(batch.tokens)
    for i, block in enumerate(model.blocks):
        if i not in skip:
            resid = resid + block.mixer(block.norm(resid))
    logits = model.lm_head(model.norm_f(resid))
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1), ignore_index=-100))


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_zero_ablation_equals_a_hand_run_without_the_mixer(arch):
    model, batch = tiny_model(arch, seed=2), _batch()
    res = layer_ablation(model, batch, "zero", components=("mixer", "gate"), batch_size=3, n_resamples=200)
    effects = {e.target: e for e in res["effects"]}
    assert list(effects) == ["blocks.0.mixer", "blocks.0.gate", "blocks.1.mixer", "blocks.1.gate", "all mixers"]
    assert res["clean"]["loss"] == pytest.approx(_hand_loss(model, batch, set()), rel=1e-5)
    for i in range(2):
        assert effects[f"blocks.{i}.mixer"].loss == pytest.approx(_hand_loss(model, batch, {i}), rel=1e-5)
    assert effects["all mixers"].loss == pytest.approx(_hand_loss(model, batch, {0, 1}), rel=1e-5)
    for e in effects.values():
        d = e.delta_loss
        assert d["ci"][0] <= d["value"] <= d["ci"][1] and d["n"] == len(batch)
        assert d["value"] == pytest.approx(e.loss - res["clean"]["loss"], abs=1e-5)  # equal targets per example
    assert effects["all mixers"].normalised is None and effects["blocks.0.mixer"].normalised is not None


def test_mean_and_resample_replacements():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 5, 3, generator=g)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, :2] = False  # padding is left out of the per-position mean
    mean_hook = _replacement("mean", ref, mask, b=4, seed=0, own_batch=False)
    out = mean_hook(torch.zeros(4, 5, 3), None)
    expected = torch.stack([ref[mask[:, t], t].mean(0) for t in range(5)])
    torch.testing.assert_close(out, expected.expand(4, 5, 3))
    own = _replacement("resample", ref, mask, b=6, seed=3, own_batch=True)
    first, second = own(ref[:4], None), own(ref[4:], None)  # the batch arrives in chunks
    got = torch.cat([first, second])
    sources = [int(torch.nonzero((ref == got[j]).all(-1).all(-1))[0]) for j in range(6)]
    assert sorted(sources) == list(range(6)) and all(s != j for j, s in enumerate(sources))  # a derangement


def test_mean_and_resample_ablation_run_with_a_reference():
    model, batch, ref = tiny_model("mamba1", seed=4), _batch(seed=1), _batch(b=10, seed=2)
    for kind in ("mean", "resample"):
        res = layer_ablation(model, batch, kind, layers=[1], components=("conv", "ssm"), reference=ref,
                             n_resamples=200)
        assert [e.target for e in res["effects"]] == ["blocks.1.conv", "blocks.1.ssm", "all mixers"]
        assert all(e.kind == kind for e in res["effects"])
    with pytest.raises(ValueError, match="length"):
        layer_ablation(model, batch, "mean", reference=TaskBatch(ref.tokens[:, :6], ref.targets[:, :6]))
    with pytest.raises(ValueError, match="kind="):
        layer_ablation(model, batch, "noise")
    with pytest.raises(ValueError, match="component"):
        layer_ablation(model, batch, components=("mlp",))


def test_evaluate_reports_per_example_loss_and_accuracy():
    model, batch = tiny_model("mamba2", seed=5), _batch()
    ev = evaluate(model, batch, batch_size=3)
    assert ev["example_loss"].shape == (8,) and float(ev["example_loss"].mean()) == pytest.approx(ev["loss"])
    assert float(ev["example_accuracy"].mean()) == pytest.approx(ev["accuracy"])
