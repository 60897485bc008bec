"""Cross-model helpers on tiny random models: residual streams match the models' own read-outs, input influence
matches a brute-force autograd Jacobian, summaries on planted influence maps, length curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp import cross_model as XM
from mamba_interp.tasks import TransformerBaseline, get_task


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    mamba = HookedMamba(MambaConfig(arch="mamba1", d_model=16, n_layer=2, vocab_size=12, d_state=4)).eval()
    torch.manual_seed(1)
    gpt = TransformerBaseline.build(vocab_size=12, d_model=16, n_layer=2, n_head=2, n_positions=48).eval()
    return mamba, gpt


@pytest.fixture(scope="module")
def task():
    return get_task("induction", vocab_size=12, seq_len=12)


def test_residual_streams_match_the_models(models, task):
    mamba, gpt = models
    tokens = task.sample(5, 0).tokens
    streams = XM.residual_streams(mamba, tokens, batch_size=2)
    assert len(streams) == XM.n_streams(mamba) == 3
    _, cache = mamba.run_with_cache(tokens)
    assert torch.equal(streams[0], cache["hook_embed"])
    assert torch.allclose(streams[2], cache["blocks.1.hook_resid_post"], atol=1e-6)  # batches of 2 vs 5
    ts = XM.residual_streams(gpt, tokens, batch_size=2)
    with torch.no_grad():
        hidden = gpt.hidden_states(tokens)  # embeddings, block 0, ln_f(block 1)
        final = gpt.hf_model.transformer.ln_f(ts[2])
    assert torch.allclose(ts[0], hidden[0], atol=1e-6) and torch.allclose(ts[1], hidden[1], atol=1e-6)
    assert torch.allclose(final, hidden[2], atol=1e-5)


@pytest.mark.parametrize("which", [0, 1])
def test_embedding_influence_equals_autograd_jacobian(models, task, which):
    """step 8's influence_on_answer, pointed at embedding_source, on both architectures (GPT-2 through its
    embedding module) against the brute-force Jacobian of the answer's log-prob w.r.t. the token embeddings."""
    from mamba_interp.temporal_causality import influence_on_answer

    model = models[which]
    batch = task.sample(3, 1)
    emb = model.hf_model.transformer.wte if which else model.embed
    with torch.no_grad():
        e0 = emb(batch.tokens)

    def score(e):
        handle = emb.register_forward_hook(lambda module, inputs, output: e)
        try:
            return XM.scored_logprob(model(batch.tokens), batch)
        finally:
            handle.remove()

    jac = torch.autograd.functional.jacobian(score, e0)  # [b, b, l, d]
    expected = torch.stack([jac[i, i].norm(dim=-1) for i in range(len(batch))])
    src = XM.embedding_source(model)
    got = influence_on_answer(model, batch, sources=(src,), batch_size=2)[src]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_length_curve_skips_unembeddable_lengths(models, task):
    mamba, gpt = models
    m = XM.length_curve(mamba, task, [12, 96], n=4, seed=0)
    t = XM.length_curve(gpt, task, [12, 96], n=4, seed=0)
    assert set(m) == {12, 96} and set(t) == {12}
    assert 0 <= m[96]["accuracy"] <= 1 and m[12]["n"] == 4


def test_sae_features_shapes():
    torch.manual_seed(0)
    x = torch.randn(300, 8)
    feats, metrics, _ = XM.sae_features(x, x[:100], expansion=2, k=3, steps=20, seed=0)
    assert feats.shape == (100, 16) and metrics["l0"] == pytest.approx(3.0)
    assert XM.live_features(feats, min_active=1).shape[1] <= 16


@pytest.mark.parametrize("which", [0, 1])
def test_example_scores_agree_with_evaluate(models, task, which):
    from mamba_interp.tasks.training import evaluate

    model = models[which]
    batch = task.sample(10, 3)
    sc = XM.example_scores(model, batch, batch_size=4)
    ref = evaluate(model, task, batch)
    assert sc["hits"].sum() / sc["scored"].sum() == pytest.approx(ref["acc"])
    assert sc["loss"].mean() == pytest.approx(ref["loss"], rel=1e-5)  # one scored position per example
    assert set(np.unique(sc["correct"])) <= {0.0, 1.0}
