"""LEACE erasure of a planted concept, and the amnesic test against a hand-written hook loop on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.probing import amnesic_effect, amnesic_test, erase_concept, fit_probe, run_model
from mamba_interp.tasks import get_task
from mamba_interp.tasks.base import IGNORE


def test_leace_leaves_every_linear_probe_at_chance_and_changes_x_little():
    """A balanced binary concept shifts X [N, 32] along one direction; after erasure no probe beats 0.55 balanced
    accuracy (measured: 0.40-0.41, below chance on held-out rows since the erasure is fitted on all of them), and X
    moves by about the concept's share of its variance (relative change measured here: 0.31)."""
    rng = np.random.default_rng(0)
    n, d = 2000, 32
    z = rng.integers(0, 2, n)
    direction = rng.standard_normal(d)
    direction /= np.linalg.norm(direction)
    x = rng.standard_normal((n, d)) + 1.5 * np.outer(2 * z - 1, direction)
    groups = np.repeat(np.arange(n // 10), 10)
    assert fit_probe(x, z, "ridge", groups=groups, cv=3).score > 0.9  # decodable before
    erased, eraser = erase_concept(x, z)
    assert isinstance(erased, np.ndarray) and erased.shape == x.shape
    for method in ("ksparse", "ridge", "logistic"):
        assert fit_probe(erased, z, method, groups=groups, cv=3).score <= 0.55, method
    means = [erased[z == c].mean(0) for c in (0, 1)]
    assert np.abs(means[0] - means[1]).max() < 1e-8  # LEACE: equal class-conditional means
    rel = np.linalg.norm(erased - x) / np.linalg.norm(x - x.mean(0))
    assert rel < 0.35
    # the eraser applies the same edit to new rows (torch in, torch out)
    t = torch.as_tensor(x[:5])
    assert torch.allclose(eraser(t.double()), torch.as_tensor(erased[:5]), atol=1e-10)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(d_model=16, n_layer=2, vocab_size=8, d_state=4)).eval()
    batch = get_task("induction", vocab_size=8, seq_len=12).sample(12, seed=0)
    return model, batch


class Scale:
    """A stand-in eraser: multiplies the activation (a LeaceEraser is any callable on [..., k])."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def _loss_by_hand(model, batch, name, factor, positions):
    """Reference: one forward, a hook that scales the activation at ``positions`` only."""

    def hook(t, hp):
        return torch.where(positions[..., None], t * factor, t)

    logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(name, hook)])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.targets.reshape(-1),
                                             ignore_index=IGNORE).item()


def test_amnesic_effect_matches_a_hand_written_hook_loop(tiny):
    model, batch = tiny
    name = "blocks.0.mixer.hook_x"
    identity = amnesic_effect(model, batch, name, Scale(1.0), batch_size=5)
    assert identity.erased_loss == pytest.approx(identity.clean_loss, abs=1e-6)
    assert identity.example_accuracy_change.value == 0.0
    positions = torch.zeros(batch.tokens.shape, dtype=torch.bool)
    positions[:, 3:7] = True
    effect = amnesic_effect(model, batch, name, Scale(0.0), positions=positions, batch_size=5)
    assert effect.erased_loss == pytest.approx(_loss_by_hand(model, batch, name, 0.0, positions), rel=1e-5)
    assert effect.erased_positions == int(positions.sum()) and effect.loss_change != 0.0
    clean = run_model(model, batch, 12)
    assert clean.loss == pytest.approx(effect.clean_loss, rel=1e-6) and clean.p_correct.shape == (12,)
    with pytest.raises(ValueError, match="does not exist"):
        amnesic_effect(model, batch, "blocks.9.mixer.hook_x", Scale(0.0))


def test_amnesic_test_fits_leace_and_a_permuted_control_of_the_same_rank(tiny):
    model, batch = tiny
    _, cache = model.run_with_cache(batch.tokens, names_filter="blocks.1.hook_resid_post")
    x = cache["blocks.1.hook_resid_post"].reshape(-1, 16)
    y = batch.tokens.reshape(-1).numpy()  # the current token: K classes, a rank K - 1 eraser
    test = amnesic_test(model, x, y, 1, "resid_post", batch, None, variable="token", batch_size=6)
    assert test.rank == np.unique(y).size - 1 and test.variable == "token"
    assert test.erased.hook_name == "blocks.1.hook_resid_post"
    assert 0 < test.relative_change <= 1.0 + 1e-6 and 0 < test.control_relative_change < test.relative_change
    assert test.erased.clean_accuracy == test.control.clean_accuracy
    d = test.to_dict()
    assert set(d) >= {"erased", "control", "rank", "relative_change"} and "ci" in d["erased"]["p_correct_change"]


def test_passes_from_the_erased_layer_equal_the_full_model_passes(tiny):
    """``start``: the clean and erased runs begin at the erased layer from its cached input (what step 4 does)."""
    from mamba_interp.pipeline.sae_support import layer_inputs

    model, batch = tiny
    positions = torch.zeros(batch.tokens.shape, dtype=torch.bool)
    positions[:, 2:9] = True
    start = (1, layer_inputs(model, batch, 1, 5))
    for name, factor in (("blocks.1.mixer.hook_x", 0.0), ("blocks.1.hook_resid_pre", 0.5)):
        full = amnesic_effect(model, batch, name, Scale(factor), positions=positions, batch_size=5)
        cached = amnesic_effect(model, batch, name, Scale(factor), positions=positions, batch_size=5, start=start)
        assert cached.erased_loss == pytest.approx(full.erased_loss, rel=1e-6) and full.loss_change != 0.0
        assert cached.clean_loss == pytest.approx(full.clean_loss, rel=1e-6)
        assert cached.erased_accuracy == full.erased_accuracy
        np.testing.assert_allclose(cached.to_dict()["p_correct_change"]["value"],
                                   full.to_dict()["p_correct_change"]["value"], rtol=1e-5)
