"""Logit lens: the final entry is the model itself; every entry equals a hand-run prefix of the model decoded by
norm_f + lm_head; target ranks and accuracies; chunking and padding."""

from __future__ import annotations

import pytest
import torch

from mamba_interp.lens import logit_lens
from tests.lens.helpers import VOCAB, tiny_model, tokens


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def model(request):
    return tiny_model(request.param)


def test_last_entry_equals_the_model(model):
    ids = tokens()
    res = logit_lens(model, ids, targets=ids.roll(-1, 1))
    assert res.labels == ["resid_pre 0", "resid_pre 1", "final_post"]
    assert float(res.kl[-1].max()) <= 1e-6
    with torch.no_grad():
        ref = torch.log_softmax(model(ids)[..., :VOCAB].double(), -1)
    torch.testing.assert_close(res.logits[-1].double(), ref.float().double(), atol=1e-5, rtol=0)
    assert float(res.kl_by_layer()[0]) > 1e-3  # the embedding alone is not the model


@torch.no_grad()
def test_every_entry_matches_a_hand_run_prefix(model):
    ids = tokens(seed=1)
    res = logit_lens(model, ids)
    final = torch.log_softmax(model(ids)[..., :VOCAB].double(), -1)
    for i in range(model.cfg.n_layer):
        resid = model(ids, stop_at_layer=i)  # the residual entering block i
        ref = torch.log_softmax(model.lm_head(model.norm_f(resid))[..., :VOCAB].double(), -1)
        torch.testing.assert_close(res.logits[i].double(), ref, atol=1e-5, rtol=0)
        kl = (final.exp() * (final - ref)).sum(-1)
        torch.testing.assert_close(res.kl[i], kl, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_target_rank_and_accuracy(model):
    ids = tokens(seed=2)
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    res = logit_lens(model, ids, targets=targets)
    logits = model(ids)[..., :VOCAB]
    scored = targets != -100
    acc = float((logits.argmax(-1) == targets)[scored].double().mean())
    assert float(res.accuracy_by_layer()[-1]) == pytest.approx(acc)
    assert bool((res.target_rank[:, ~scored] == -1).all()) and bool(res.target_logprob[:, ~scored].isnan().all())
    lp = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(res.target_logprob[-1][scored], lp[scored], atol=1e-5, rtol=0)


def test_chunking_and_padding_do_not_change_the_lens(model):
    ids = tokens(b=5, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding of one sequence
    whole = logit_lens(model, ids, attention_mask=mask, return_logits=False)
    parts = logit_lens(model, ids, attention_mask=mask, batch_size=2, return_logits=False)
    assert whole.logits is None and parts.kl.shape == (3, 5, 12)
    torch.testing.assert_close(whole.kl, parts.kl, atol=1e-7, rtol=1e-6)
    assert not bool(whole.mask[1, :4].any())
    assert float(whole.kl_by_layer()[-1]) <= 1e-6
