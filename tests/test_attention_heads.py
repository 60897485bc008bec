"""Head scores on planted attention patterns; head patching against an independent linear-algebra reference
(a head's contribution to the attention output is z_h W_O[h]); restored fraction identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mamba_interp import attention_heads as AH
from mamba_interp.tasks import TransformerBaseline, get_task


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return TransformerBaseline.build(vocab_size=12, d_model=16, n_layer=2, n_head=2, n_positions=32).eval()


@pytest.fixture(scope="module")
def pair():
    task = get_task("induction", vocab_size=12, seq_len=12)
    batch = task.sample(6, 0)
    return task, batch, task.corrupt(batch, 1)


def test_scores_on_planted_patterns():
    b, length = 3, 6
    p = torch.zeros(2, b, 2, length, length)
    p[0, :, 0] = torch.diag(torch.ones(length - 1), -1)  # layer 0 head 0: previous token
    p[0, :, 0, 0, 0] = 1.0
    p[0, :, 1] = torch.eye(length)  # layer 0 head 1: self
    query, value = torch.tensor([5, 5, 5]), torch.tensor([2, 3, 1])
    p[1, torch.arange(b), :, query, value] = 1.0  # layer 1: the query looks at p + 1
    prev = AH.previous_token_score(p)
    assert prev[0, 0] == pytest.approx(1.0) and prev[0, 1] == 0.0
    ind = AH.induction_score(p, query, value)
    assert torch.allclose(ind[1], torch.ones(2)) and ind[0, 1] == 0.0
    # duplicate-shift: repeated block "a b c a b c": an induction head at i attends to i − 2
    tokens = torch.tensor([[1, 2, 3, 1, 2, 3]])
    ideal = torch.zeros(1, 1, 1, 6, 6)
    for i in range(3, 6):
        ideal[0, 0, 0, i, i - 2] = 1.0
    for i in range(3):
        ideal[0, 0, 0, i, i] = 1.0  # rows without an earlier copy are ignored
    assert AH.duplicate_shift_score(ideal, tokens)[0, 0] == pytest.approx(1.0)


def test_attention_patterns_are_causal_distributions(gpt, pair):
    _, batch, _ = pair
    p = AH.attention_patterns(gpt, batch.tokens, batch_size=4)
    assert p.shape == (2, 6, 2, 12, 12)
    assert torch.allclose(p.sum(-1), torch.ones(2, 6, 2, 12), atol=1e-5)
    assert float(torch.triu(p, diagonal=1).abs().max()) == 0.0
    assert gpt.hf_model.config._attn_implementation == "sdpa"  # eager only inside attention_patterns


def _metric(batch, corrupt):
    answer, wrong = batch.metadata["answer"], corrupt.metadata["answer"]

    def metric(logits, index):
        last = logits[:, -1]
        rows = torch.arange(last.shape[0])
        return last[rows, answer[index]] - last[rows, wrong[index]]
    return metric


@torch.no_grad()
def _reference_head_patch(gpt, clean, corrupt, metric, layer, head, positions):
    """Corrupted run with the attention output shifted by (z_clean − z_corrupt)_h W_O[h] at the positions."""
    attn = gpt.hf_model.transformer.h[layer].attn
    hd = gpt.config.n_embd // gpt.config.n_head
    cols = slice(head * hd, (head + 1) * hd)
    zs = {}
    for name, ids in (("clean", clean), ("corrupt", corrupt)):
        h = attn.c_proj.register_forward_pre_hook(lambda m, a, n=name: zs.__setitem__(n, a[0].clone()))
        gpt(ids)
        h.remove()
    delta = (zs["clean"][..., cols] - zs["corrupt"][..., cols]) @ attn.c_proj.weight[cols]  # Conv1D: x @ W
    mask = torch.zeros(clean.shape, dtype=torch.bool)
    if positions is None:
        mask[:] = True
    else:
        mask[torch.arange(clean.shape[0]), positions] = True
    delta = delta * mask[..., None]

    def add(m, a, o):
        return (o[0] + delta, *o[1:]) if isinstance(o, tuple) else o + delta
    h = attn.register_forward_hook(add)
    try:
        return metric(gpt(corrupt), slice(None)).double().numpy()
    finally:
        h.remove()


@pytest.mark.parametrize("at_query", [False, True])
def test_head_patch_equals_linear_reference(gpt, pair, at_query):
    _, batch, corrupt = pair
    metric = _metric(batch, corrupt)
    positions = batch.metadata["query_pos"] if at_query else None
    comps = [("head", layer, h) for layer in range(2) for h in range(2)]
    res = AH.patch_components(gpt, batch.tokens, corrupt.tokens, metric, comps, positions=positions, batch_size=4)
    for layer, h in ((0, 0), (0, 1), (1, 0), (1, 1)):
        ref = _reference_head_patch(gpt, batch.tokens, corrupt.tokens, metric, layer, h, positions)
        assert np.allclose(res["patched"][("head", layer, h)], ref, atol=1e-4)


def test_patch_identities(gpt, pair):
    _, batch, corrupt = pair
    metric = _metric(batch, corrupt)
    comps = [("block", 1), ("attn", 0), ("mlp", 0)]
    res = AH.patch_components(gpt, batch.tokens, corrupt.tokens, metric, comps, batch_size=4)
    # the last block's output at every position is the whole clean residual: full restoration
    assert np.allclose(res["patched"][("block", 1)], res["clean"], atol=1e-5)
    same = AH.patch_components(gpt, corrupt.tokens, corrupt.tokens, metric, comps, batch_size=4)
    for comp in comps:  # clean == corrupt: patching changes nothing
        assert np.allclose(same["patched"][comp], same["corrupt"], atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        AH.patch_components(gpt, batch.tokens, corrupt.tokens[:, :5], metric, comps)
    with pytest.raises(ValueError, match="unknown"):
        AH.patch_components(gpt, batch.tokens, corrupt.tokens, metric, [("neuron", 0)])


def test_restored_fraction():
    rng = np.random.default_rng(0)
    clean, corrupt = rng.normal(5, 1, 50), rng.normal(-5, 1, 50)
    est = AH.restored_fraction(0.25 * clean + 0.75 * corrupt, clean, corrupt, n_resamples=200)
    assert est.value == pytest.approx(0.25) and est.ci_low <= 0.25 <= est.ci_high
    assert AH.restored_fraction(clean, clean, corrupt, n_resamples=50).value == pytest.approx(1.0)
    assert AH.component_label(("head", 1, 3)) == "1.3" and AH.component_label(("mlp", 0)) == "mlp0"
