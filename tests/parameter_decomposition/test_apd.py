"""APD: attributions against autograd Jacobians, batch top-k, losses, tied components, a short TMS run, and (slow)
TMS 5-2 at the paper's settings.

APD's outcome on TMS 5-2 depends on the seed, ours and the reference's alike (``bench/bench_decomposition.py
--methods apd --seeds 0,1,2,3,4``: 4 of 5 seeds reach MMCS >= 0.99 for both; in the others one component shrinks);
the slow test pins one seed that succeeds and one that fails, so a change in either is noticed."""

from __future__ import annotations

import pytest
import torch

from mamba_interp.parameter_decomposition.apd import APDConfig, APDModel, RankKComponents, apd_losses
from mamba_interp.parameter_decomposition.toy_models import decompose_tms, tms_5_2, tms_target


def _model(**kw):
    target = tms_target(*tms_5_2())
    cfg = APDConfig(C=5, rank=3, **kw)
    return target, APDModel(target, cfg, torch.Generator().manual_seed(0))


def brute_force_scores(model: APDModel, target, x: torch.Tensor) -> torch.Tensor:
    """score_c(x) = Σ_o (Σ_l J_o^l · (a^l P_{c,l}))², with J^l the Jacobian of the target output w.r.t. the output
    y^l of matrix l, by torch.autograd.functional.jacobian on a hand-written TMS forward."""
    W = target.model.linear1.weight
    b = target.model.linear2.bias
    scores = []
    P1 = model.component_matrices("linear1")  # (C, m, n)
    P2 = model.component_matrices("linear2")  # (C, n, m)
    for xi in x:
        h = W @ xi

        def out_from_y1(y1):
            return torch.relu(W.T @ y1 + b)

        def out_from_y2(y2):
            return torch.relu(y2 + b)

        J1 = torch.autograd.functional.jacobian(out_from_y1, h)  # (n, m)
        J2 = torch.autograd.functional.jacobian(out_from_y2, W.T @ h)  # (n, n)
        per_c = torch.einsum("om,cm->co", J1, P1 @ xi) + torch.einsum("on,cn->co", J2, P2 @ h)  # (C, n_out)
        scores.append(per_c.pow(2).sum(-1))
    return torch.stack(scores)


def test_attributions_match_jacobians():
    target, model = _model()
    x = target.sample(16, torch.Generator().manual_seed(1))
    x[0] = 0.6  # a dense row too
    score, out = model.attributions(target, x)
    torch.testing.assert_close(out, target.model(x))
    with torch.no_grad():
        ref = brute_force_scores(model, target, x)
    torch.testing.assert_close(score, ref, atol=1e-6, rtol=1e-4)


def test_batch_topk_and_loss_terms():
    target, model = _model(topk=0.5)
    x = target.sample(32, torch.Generator().manual_seed(2))
    score, _ = model.attributions(target, x)
    s = model.topk_mask(score, None)
    assert int(s.sum()) == 16 and set(s.unique().tolist()) <= {0.0, 1.0}
    assert bool((score[s.bool()].min() >= score[~s.bool()].max()))
    total, terms = apd_losses(model, target, x, model.config)
    W = target.model.linear1.weight
    faith = 2 * (W - model.weight("linear1").detach()).pow(2).sum() / (2 * W.numel())
    assert terms["faithfulness"] == pytest.approx(float(faith), rel=1e-5)
    assert terms["active_per_token"] == pytest.approx(0.5)
    A, B = model.comp("linear1").A.detach(), model.comp("linear1").B.detach()
    schat = 2 * ((A.pow(2).sum(1) * B.pow(2).sum(2) + 1e-16).sqrt().sum(-1))  # both tied matrices, p = 1
    simp = (s.sum(0) * schat).sum() / (2 * W.numel() * 32)
    assert terms["simplicity"] == pytest.approx(float(simp), rel=1e-4)


def test_tied_rank_k_components_are_transposes():
    src = RankKComponents(5, 2, 4, 3, torch.Generator().manual_seed(0))
    tied = RankKComponents(2, 5, 4, 3, tied_to=src)
    torch.testing.assert_close(tied.matrices(), src.matrices().transpose(1, 2))
    x = torch.randn(7, 2)
    m = torch.rand(7, 4)
    torch.testing.assert_close(tied.apply(x, m), torch.einsum("bc,coi,bi->bo", m, tied.matrices(), x))
    assert list(tied.parameters()) == []


def test_rank_one_view_and_short_run():
    dec = decompose_tms(*tms_5_2(), "apd", seed=0, steps=10, batch_size=64, rank=3, progress=False)
    U, V = dec.components["linear1"]
    assert U.shape == (5, 2) and V.shape == (5, 5)
    P = dec.component_matrices("linear1")
    top = torch.einsum("co,ci->coi", U, V)
    # the best rank-1 approximation is within the second singular value of each component
    s = torch.linalg.svdvals(P)
    torch.testing.assert_close((P - top).flatten(1).norm(dim=1), s[:, 1:].norm(dim=1), atol=1e-5, rtol=1e-4)
    assert len(dec.history) >= 1 and "minimality" in dec.history[0]
    with pytest.raises(ValueError, match="topk"):
        APDConfig(C=5, topk=6.0)



@pytest.mark.slow
def test_apd_on_tms_5_2_succeeds_or_collapses_by_seed():
    """The APD paper's TMS 5-2 settings (C = 5, top-k 0.211, Schatten 0.7 / p = 1, lr 0.03, batch 2048) at 10k of
    its 20k steps: seed 1 recovers the pentagon (MMCS >= 0.99, ML2R near the paper's 0.89, five components of
    similar norm); seed 0 is APD's known failure, one component shrinking (~1 CPU-minute each)."""
    torch.set_num_threads(1)
    out = {}
    for seed in (0, 1):
        dec = decompose_tms(*tms_5_2(), "apd", seed=seed, steps=10_000, batch_size=2048, rank=3, progress=False)
        out[seed] = (dec.metrics(n_eval=20_000), dec.model.norms("linear1"))
    m, norms = out[1]
    assert m["mmcs"] >= 0.99 and 0.85 <= m["ml2r"] <= 0.95, m
    assert float(norms.min() / norms.max()) > 0.5, norms
    m0, norms0 = out[0]
    assert m0["mmcs"] < 0.99 and float(norms0.min() / norms0.max()) < 0.3, (m0, norms0)
