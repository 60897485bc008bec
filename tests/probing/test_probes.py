"""Probes on planted truth: Gaussian X whose label depends on a known support S, random labels, the control task,
the grouped split, and the held-out score and its bootstrap against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, r2_score

from mamba_interp.probing import (
    CLASSIFICATION,
    REGRESSION,
    HeldOut,
    control_labels,
    fit_probe,
    heldout_score,
    selectivity,
    sparsity_curve,
    split_indices,
)
from mamba_interp.probing.scores import _group_sums, _score_from_sums

S = np.array([3, 17, 42, 77, 99])
W = np.array([1.5, -1.2, 1.0, 0.8, -1.3])


def planted(n: int, d: int = 100, noise: float = 1.0, seed: int = 0):
    """X [n, d] standard normal; logit = X[:, S] @ W + noise; groups of 20 rows ("sequences")."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    logit = x[:, S] @ W + noise * rng.standard_normal(n)
    return x, logit, np.repeat(np.arange(n // 20), 20)


@pytest.fixture(scope="module")
def binary():
    x, logit, g = planted(4000)
    return x, (logit > 0).astype(np.int64), g


def test_ksparse_with_k_equal_to_the_support_returns_it(binary):
    x, y, g = binary
    p = fit_probe(x, y, "ksparse", k=5, groups=g)
    assert np.array_equal(p.support, S) and p.k == 5
    assert np.count_nonzero(p.coef) == 5 and p.score > 0.85
    assert np.array_equal(p.predict(x[:7]), p.estimator.predict(p.scaler.transform(x[:7])[:, S]))


def test_l1_probes_put_their_largest_weights_on_the_support(binary):
    x, y, g = binary
    l1 = fit_probe(x[:2000], y[:2000], "logistic_l1", groups=g[:2000], cv=3)
    assert np.array_equal(l1.top_dims(5), S) and "C" in l1.reg
    xr, logit, gr = planted(2000, seed=1)
    lasso = fit_probe(xr, logit, "lasso", groups=gr, cv=3)
    assert lasso.task == REGRESSION and np.array_equal(lasso.top_dims(5), S) and lasso.score > 0.75
    assert set(S) <= set(lasso.support.tolist()) and "alpha" in lasso.reg


def test_dense_baseline_scores_at_least_the_sparse_probes():
    """The dense probe uses every dimension, so it matches the k-sparse probes up to its estimation error (d/n):
    at n = 8000, d = 100 it is within 0.01 of the best k, and far above probes that miss part of S."""
    x, logit, g = planted(8000)
    y = (logit > 0).astype(np.int64)
    dense = fit_probe(x, y, "logistic", groups=g, cv=3)
    curve = sparsity_curve(x, y, ks=(1, 2, 5, 16), groups=g)
    assert dense.support.size == 100
    assert dense.score >= max(p.score for p in curve.values()) - 0.01
    assert dense.score > curve[2].score + 0.05 and dense.score > curve[1].score + 0.1
    assert [curve[k].k for k in curve] == [1, 2, 5, 16] and set(curve[16].support) >= set(S)


def test_random_labels_score_at_chance_with_selectivity_around_zero(binary):
    x, _, g = binary
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, len(x))
    types = rng.integers(0, 40, len(x))
    for method in ("ksparse", "ridge"):
        p = fit_probe(x, y, method, groups=g, cv=3)
        c = fit_probe(x, control_labels(y, types, seed=1), method, groups=g, cv=3)
        est, sel = p.score_estimate(), selectivity(p, c)
        assert abs(p.score - 0.5) < 0.05 and est.contains(0.5), (method, est)
        assert abs(sel.value) < 0.08 and sel.contains(0.0), (method, sel)


def test_multiclass_scores_one_class_against_the_rest(binary):
    x, _, g = binary
    y = np.digitize(x[:, S] @ W, [-1.5, 0.0, 1.5])  # 4 ordered classes
    p = fit_probe(x, y, "logistic", groups=g, cv=3)
    assert p.coef.shape == (4, 100) and list(p.classes) == [0, 1, 2, 3]
    assert p.score > 0.85 and set(p.top_dims(5)) == set(S)


def test_heldout_score_matches_sklearn_per_class():
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    pred[:150] = y[:150]
    per_class = [balanced_accuracy_score(y == c, pred == c) for c in range(4)]
    assert heldout_score(y, pred, CLASSIFICATION) == pytest.approx(np.mean(per_class))
    yb, pb = y % 2, pred % 2
    assert heldout_score(yb, pb, CLASSIFICATION) == pytest.approx(balanced_accuracy_score(yb, pb))
    yr = rng.standard_normal(300)
    pr = yr + 0.5 * rng.standard_normal(300)
    assert heldout_score(yr, pr, REGRESSION) == pytest.approx(r2_score(yr, pr))


@pytest.mark.parametrize("task", [CLASSIFICATION, REGRESSION])
def test_group_resampling_statistic_equals_brute_force(task):
    """The bootstrap statistic (summed per-group counts of resampled groups) equals the score recomputed on the
    rows of those groups, repeats included."""
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(12), rng.integers(1, 6, 12))
    n = groups.size
    if task == CLASSIFICATION:
        y, pred = rng.integers(0, 3, n), rng.integers(0, 3, n)
    else:
        y = rng.standard_normal(n)
        pred = y + rng.standard_normal(n)
    sums, uniq = _group_sums(HeldOut(y, pred, groups), task)
    for _ in range(5):
        pick = rng.integers(0, uniq.size, uniq.size)
        rows = np.concatenate([np.flatnonzero(groups == uniq[i]) for i in pick])
        if task == CLASSIFICATION and np.unique(y[rows]).size < 2:
            continue
        # classes absent from the resample are skipped by both
        assert _score_from_sums(sums[pick].sum(0), task) == pytest.approx(heldout_score(y[rows], pred[rows], task))


def test_split_keeps_groups_whole_and_ignores_labels():
    groups = np.repeat(np.arange(40), 5)
    train, test = split_indices(200, groups, 0.25, seed=3)
    assert not set(groups[train]) & set(groups[test]) and len(train) + len(test) == 200
    assert abs(len(test) - 50) <= 5
    again = split_indices(200, groups, 0.25, seed=3)
    assert np.array_equal(again[1], test)
    with pytest.raises(ValueError, match="single group"):
        split_indices(10, np.zeros(10), 0.25, 0)


def test_control_labels_are_fixed_per_type_and_follow_the_marginal():
    rng = np.random.default_rng(2)
    y = (rng.random(5000) < 0.3).astype(np.int64)
    types = rng.integers(0, 500, 5000)
    c = control_labels(y, types, seed=4)
    for t in np.unique(types)[:50]:
        assert np.unique(c[types == t]).size == 1
    per_type = np.array([c[types == t][0] for t in np.unique(types)])
    assert abs(per_type.mean() - 0.3) < 0.07 and c.dtype == y.dtype
    assert np.array_equal(c, control_labels(y, types, seed=4))


def test_bad_input_gives_a_clear_error(binary):
    x, y, g = (a[:400] for a in binary)
    with pytest.raises(ValueError, match="unknown"):
        fit_probe(x, y, "svm")
    with pytest.raises(ValueError, match="use 'logistic_l1'"):
        fit_probe(x, y, "lasso")
    with pytest.raises(ValueError, match="NaN"):
        fit_probe(x, np.where(np.arange(len(y)) == 0, np.nan, y.astype(float)), "ridge", task=REGRESSION)
    with pytest.raises(ValueError, match="k=200"):
        fit_probe(x, y, "ksparse", k=200, groups=g)
    with pytest.raises(ValueError, match="integers"):
        fit_probe(x, y + 0.5, "ksparse", task=CLASSIFICATION)
