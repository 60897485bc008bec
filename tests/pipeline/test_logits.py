"""Scoring at chosen positions against the full-vocabulary forward pass, with hooks and from a cached layer input."""

from __future__ import annotations

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.pipeline.logits import layer_input, score_positions


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_score_positions_equals_the_full_logits(arch):
    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(arch=arch, d_model=32, n_layer=3, vocab_size=40, d_state=8, headdim=16)).eval()
    ids = torch.randint(0, 40, (5, 9))
    targets = torch.randint(0, 40, (5, 9))
    select = torch.rand(5, 9) > 0.4
    mask = torch.ones(5, 9, dtype=torch.long)
    mask[1, :2] = 0

    def hook(t, hook):  # a change at layer 1's SSM input
        return t * 0.5

    hooks = [("blocks.1.mixer.hook_x", hook)]
    with torch.no_grad():
        full = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks)  # (b, l, v)
    lp_ref = torch.log_softmax(full, -1).gather(-1, targets[..., None])[..., 0][select]
    pred_ref = full.argmax(-1)[select]
    lp, pred = score_positions(model, ids, targets, select, attention_mask=mask, fwd_hooks=hooks, chunk=7)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(pred, pred_ref)
    start = (1, layer_input(model, ids, mask, 1))  # reuse the residual stream entering layer 1
    lp2, pred2 = score_positions(model, ids, targets, select, attention_mask=mask, fwd_hooks=hooks, start=start)
    torch.testing.assert_close(lp2, lp_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(pred2, pred_ref)
    lp3, pred3 = score_positions(model, ids, targets, select, attention_mask=mask, fwd_hooks=hooks, chunk=7,
                                 predict=False)  # the same chunks as lp: only the argmax is skipped
    assert pred3 is None and torch.equal(lp3, lp)
