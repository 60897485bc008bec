"""Step 2's numerics against planted ground truth and against the model's own cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.pipeline.activation_stats import (
    ActivationSet,
    baseline_stats,
    collect_activations,
    delta_stats,
    norm_by_position,
    per_head,
)


def test_baseline_stats_finds_planted_outlier_and_dead_dims():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 64, generator=gen)
    x[:, 3] *= 12.0  # outlier: 12x the median RMS
    x[:, 40] *= 7.0  # outlier
    x[:, 5] *= 1e-4  # near-dead
    st = baseline_stats(x, dead_threshold=0.01, outlier_ratio=5.0)
    s = st.summary
    assert s["n_outlier"] == 2 and s["outlier_dims"] == [3, 40]
    assert s["n_dead"] == 1 and s["dead_fraction"] == pytest.approx(1 / 64)
    assert s["max_rms_ratio"] == pytest.approx(12.0, rel=0.05)
    a = x.double().numpy()
    assert s["mean"] == pytest.approx(a.mean()) and s["std"] == pytest.approx(a.std())
    assert s["rms"] == pytest.approx(math.sqrt((a**2).mean()))
    np.testing.assert_allclose(st.per_dim["rms"], np.sqrt((a**2).mean(0)), rtol=1e-12)
    # per-dimension kurtosis of Gaussian columns is ~0; the pooled one is huge (mixed scales = heavy tails)
    assert abs(s["kurtosis_dim_median"]) < 0.1
    assert s["kurtosis"] > 20


@pytest.mark.parametrize("dist,expected", [("normal", 0.0), ("laplace", 3.0), ("uniform", -1.2)])
def test_kurtosis_matches_known_distributions(dist, expected):
    rng = np.random.default_rng(1)
    draw = {"normal": rng.standard_normal, "laplace": rng.laplace, "uniform": lambda size: rng.uniform(-1, 1, size)}
    x = torch.from_numpy(draw[dist](size=(200000, 4)))
    s = baseline_stats(x).summary
    assert s["kurtosis"] == pytest.approx(expected, abs=0.15)
    assert s["n_outlier"] == 0 and s["n_dead"] == 0


def test_delta_stats_constant_channels_give_exact_timescales():
    k, n = 6, 4
    dt_values = torch.tensor([0.01, 0.02, 0.05, 0.1, 0.5, 1.0])
    dt = dt_values.expand(1000, k).clone()
    A = -torch.arange(1, n + 1, dtype=torch.float32).expand(k, n).clone()  # slowest |A| = 1 per channel
    st = delta_stats(dt, A, seq_len=64)
    np.testing.assert_allclose(st.per_dim["timescale"], 1.0 / dt_values.double().numpy(), rtol=1e-6)
    np.testing.assert_allclose(st.per_dim["cv"], 0.0, atol=1e-9)
    np.testing.assert_allclose(st.per_dim["quantiles"][2], dt_values.numpy(), rtol=1e-6)
    # 1/Δ > 64 tokens only for Δ = 0.01 (100 tokens)
    assert st.summary["long_memory_fraction"] == pytest.approx(1 / 6)
    # Mamba-2: one A per head
    st2 = delta_stats(dt[:, :3], torch.tensor([-2.0, -4.0, -8.0]), seq_len=10)
    np.testing.assert_allclose(st2.per_dim["timescale"], [50.0, 12.5, 2.5], rtol=1e-6)


def test_delta_stats_selectivity_ranks_the_varying_channel():
    gen = torch.Generator().manual_seed(0)
    dt = torch.full((5000, 4), 0.1)
    dt[:, 2] = torch.rand(5000, generator=gen) * 0.2 + 1e-3  # input-dependent Δ
    st = delta_stats(dt, -torch.ones(4, 2), seq_len=16)
    assert st.summary["most_selective"][0] == 2 and st.summary["cv_max"] > 0.5


def test_per_head_and_norm_by_position():
    x = torch.zeros(10, 6)
    x[:, 0:3] = 2.0  # head 0: RMS 2, head 1: RMS 0
    np.testing.assert_allclose(per_head(x, 2), [2.0, 0.0])
    norm = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[True, True, True], [False, True, True]])
    got = norm_by_position(norm, mask)
    # position 0 only from sequence 0: mean(0, 1) = 0.5; position 1: mean(2, 3, 8, 9) = 5.5
    np.testing.assert_allclose(got, [0.5, 5.5, 7.5])


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_collect_activations_equals_the_cache(arch):
    torch.manual_seed(0)
    cfg = MambaConfig(arch=arch, d_model=32, n_layer=3, vocab_size=20, d_state=8, headdim=16)
    model = HookedMamba(cfg).eval()
    tokens = torch.randint(0, 20, (7, 11))
    hooks = ("resid_post", "x", "dt", "B", "y", "gate", "state_norm")
    acts = collect_activations(model, tokens, [0, 1], hooks, batch_size=3)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(("blocks.0.", "blocks.1.")))
    for layer in (0, 1):
        for short in hooks[:-1]:
            ref = cache[short, layer].float()
            got = acts[(short, layer)]
            assert got.shape == (7, 11, ref[0, 0].numel())
            torch.testing.assert_close(got, ref.reshape(7, 11, -1), rtol=1e-5, atol=1e-6)
            assert acts.shapes[(short, layer)] == tuple(ref.shape[2:])
        state = cache["ssm_state", layer].float()
        dims = (-1,) if arch == "mamba1" else (-2, -1)
        expected = torch.linalg.vector_norm(state, dim=dims).reshape(7, 11, -1)
        torch.testing.assert_close(acts[("state_norm", layer)], expected, rtol=1e-5, atol=1e-6)
    width = cfg.d_inner if arch == "mamba1" else cfg.nheads
    assert acts[("state_norm", 0)].shape[-1] == width


def test_extra_hooks_read_the_collection_passes_and_seed_the_layer_starts(monkeypatch):
    """Step 3 keeps the first SAE layer's input from the held-out collection pass: it equals ``layer_inputs``
    (padding included), and a ``LayerStarts`` seeded with it runs no pass of its own for that layer."""
    from mamba_interp.pipeline import sae_support

    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(arch="mamba2", d_model=32, n_layer=3, vocab_size=20, d_state=8,
                                    headdim=16)).eval()
    tokens = torch.randint(0, 20, (7, 11))
    mask = torch.ones(7, 11, dtype=torch.long)
    mask[2, :3] = 0
    parts = []
    keep = ("blocks.1.hook_resid_pre", lambda t, hook: parts.append(t.detach().cpu()))
    acts = collect_activations(model, tokens, [1], ["x"], batch_size=3, attention_mask=mask, extra_hooks=[keep])
    batch = type("Batch", (), {"tokens": tokens, "attention_mask": mask, "__len__": lambda self: 7})()
    ref = sae_support.layer_inputs(model, batch, 1, 4)
    torch.testing.assert_close(torch.cat(parts), ref, rtol=1e-5, atol=1e-6)
    assert acts[("x", 1)].shape == (7, 11, model.cfg.d_inner)  # the collection itself is unchanged
    monkeypatch.setattr(sae_support, "layer_inputs", lambda *a: pytest.fail("recomputed a cached layer"))
    starts = sae_support.LayerStarts(model, batch, 4, cached={1: torch.cat(parts)})
    assert starts(1, 5)[0] == 1 and torch.equal(starts(1, 5)[1], torch.cat(parts)[:5])


def test_collect_activations_with_padding_mask_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(d_model=32, n_layer=2, vocab_size=20, d_state=8)).eval()
    tokens = torch.randint(1, 20, (4, 9))
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    acts = collect_activations(model, tokens, [1], ("x", "dt"), batch_size=2, attention_mask=mask)
    assert acts.tokens("x", 1).shape == (4 * 9 - 3, 64)
    coords = acts.coords()
    assert coords.shape == (33, 2) and coords[9].tolist() == [1, 3]  # sequence 1 starts after 3 padding tokens
    assert torch.equal(acts.tokens("x", 1)[9], acts[("x", 1)][1, 3])
    path = tmp_path / "acts.safetensors"
    acts.save(path)
    back = ActivationSet.load(path)
    assert back.layers == (1,) and back.hooks == ("x", "dt") and torch.equal(back.mask, acts.mask)
    for key in acts.acts:
        assert torch.equal(back[key], acts[key]) and back.shapes[key] == acts.shapes[key]
