"""Similarity measures: invariances, published reference values, finite-sample bias, nulls.

Reference values: the Google ``representation_similarity`` demo (np.random.seed(1337), X = randn(100, 10),
Y = randn(100, 10) + X): linear CKA 0.55761, RBF(0.5) 0.65483, debiased linear 0.51346, centred mean squared CCA
0.54540 (Kornblith et al. 2019's demo notebook, values reproduced to 5 decimals).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import procrustes as scipy_procrustes

from mamba_interp import comparison as C


@pytest.fixture(scope="module")
def demo():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def _orthogonal(d, seed):
    return C.random_rotation(d, np.random.default_rng(seed))


def test_google_demo_values(demo):
    x, y = demo
    assert C.cka(x, y, debiased=False) == pytest.approx(0.55761, abs=5e-6)
    assert C.cka(x, y, kernel="rbf", debiased=False, threshold=0.5) == pytest.approx(0.65483, abs=5e-6)
    assert C.cka(x, y) == pytest.approx(0.51346, abs=5e-6)
    rho = C.cca_correlations(x, y)
    assert np.mean(rho**2) == pytest.approx(0.54540, abs=5e-6)


@pytest.mark.parametrize("debiased", [True, False])
def test_feature_space_cka_equals_gram_form(demo, debiased):
    x, y = demo
    y2 = np.concatenate([y, y[:, :3] ** 2], 1)  # different widths
    assert C.cka(x, y2, debiased=debiased) == pytest.approx(C.cka_gram(x, y2, debiased=debiased), abs=1e-10)


def test_hsic_unbiased_matches_brute_force_average():
    # Song et al. 2012: HSIC₁ is the U-statistic; check it against the O(n⁴) average of h over distinct quadruples
    rng = np.random.default_rng(3)
    n = 7
    x, y = rng.standard_normal((n, 2)), rng.standard_normal((n, 2))
    K, L = x @ x.T, y @ y.T
    from itertools import permutations

    total, count = 0.0, 0
    for i, j, q, r in permutations(range(n), 4):
        total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
        count += 1
    assert C.hsic(K, L, debiased=True) == pytest.approx(total / count, rel=1e-10)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_invariances(demo, kernel):
    x, y = demo
    q = _orthogonal(10, 0)
    assert C.cka(x, x @ q, kernel=kernel) == pytest.approx(1.0, abs=1e-6)
    assert C.cka(x, 2.5 * x, kernel=kernel) == pytest.approx(1.0, abs=1e-6)
    assert C.cka(x, 1.337 * x + 5.0, kernel=kernel) == pytest.approx(1.0, abs=1e-6)
    base = C.cka(x, y, kernel=kernel)
    assert C.cka(x @ q, 3.0 * y - 1.0, kernel=kernel) == pytest.approx(base, abs=1e-9)


def test_cka_not_invariant_to_invertible_map(demo):
    x, y = demo
    a = np.random.default_rng(5).standard_normal((10, 10))
    assert abs(np.linalg.det(a)) > 1e-3
    assert abs(C.cka(x @ a, y, debiased=False) - C.cka(x, y, debiased=False)) > 0.05
    assert abs(C.cka(x @ a, y) - C.cka(x, y)) > 0.05
    # ... while CCA-type measures are
    assert C.svcca(x @ a, y, keep=1.0) == pytest.approx(C.svcca(x, y, keep=1.0), abs=1e-10)


def test_debiased_cka_near_zero_for_independent_features_biased_not():
    rng = np.random.default_rng(0)
    unbiased, biased = [], []
    for _ in range(3):
        a, b = rng.standard_normal((500, 100)), rng.standard_normal((500, 100))
        unbiased.append(C.cka(a, b))
        biased.append(C.cka(a, b, debiased=False))
    assert max(abs(v) for v in unbiased) < 0.05
    assert min(biased) > 0.1


def test_torch_inputs_and_bad_shapes(demo):
    x, y = demo
    assert C.cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y)) == pytest.approx(C.cka(x, y), abs=1e-5)
    with pytest.raises(ValueError, match="same rows"):
        C.cka(x, y[:50])
    with pytest.raises(ValueError, match="kernel"):
        C.cka(x, y, kernel="poly")
    assert np.isnan(C.cka(x, np.ones((100, 3))))


def test_procrustes(demo):
    x, y = demo
    q = _orthogonal(10, 1)
    assert C.procrustes_distance(x, 3.0 * x @ q + 2.0) < 1e-6
    assert C.procrustes_distance(x, x @ q, kind="euclidean") < 1e-6
    d = C.procrustes_distance(x, y)
    assert 0.1 < d < np.pi / 2
    # scipy's disparity is 1 − cos²(angular distance)
    _, _, disparity = scipy_procrustes(x, y)
    assert disparity == pytest.approx(1 - np.cos(d) ** 2, abs=1e-12)
    # the rotation recovers q
    r = C.procrustes_rotation(x, x @ q)
    assert np.allclose(r, q, atol=1e-8)
    # a metric: symmetric, triangle inequality
    z = x + 0.5 * np.random.default_rng(2).standard_normal(x.shape)
    assert C.procrustes_distance(y, x) == pytest.approx(d, abs=1e-12)
    assert C.procrustes_distance(x, z) <= C.procrustes_distance(x, y) + C.procrustes_distance(y, z) + 1e-12


def test_rsa(demo):
    x, y = demo
    assert C.rsa(x, 3 * x @ _orthogonal(10, 3) + 5) == pytest.approx(1.0, abs=1e-12)
    assert 0.2 < C.rsa(x, y) < 0.99


def test_mppc_and_matching():
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_normal((400, 12))) * (rng.random((400, 12)) < 0.3)  # sparse non-negative features
    perm = rng.permutation(12)
    assert C.mppc(a, a[:, perm]) == pytest.approx(1.0, abs=1e-12)
    assert C.mppc(a, 4.0 * a[:, perm] + 1.0) == pytest.approx(1.0, abs=1e-12)
    assert C.matched_correlation(a, a[:, perm]) == pytest.approx(1.0, abs=1e-12)
    # many-to-one: a duplicated feature set of half the features gives MPPC < 1 in one direction only
    half = a[:, :6]
    assert C.mppc(half, a) == pytest.approx(1.0, abs=1e-12) and C.mppc(a, half) < 0.9
    # a dead feature is skipped, not counted as 0
    with_dead = np.concatenate([a, np.zeros((400, 1))], 1)
    assert C.mppc(with_dead, a) == pytest.approx(1.0, abs=1e-12)
    assert np.isnan(C.max_correlations(with_dead, a)[-1])


def test_match_features_recovers_a_planted_permutation():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((500, 10))
    perm = rng.permutation(10)
    signs = rng.choice([-1.0, 1.0], 10)
    b = a[:, perm] * signs + 0.3 * rng.standard_normal((500, 10))  # column j of b is ± column perm[j] of a
    inverse = np.argsort(perm)
    assert np.array_equal(C.match_features(a, b), inverse)  # the sign of a direction does not matter
    # more features in a than in b: the extra ones stay unmatched (-1), the rest map one-to-one
    wide = np.concatenate([a, rng.standard_normal((500, 3))], 1)
    m = C.match_features(wide, b)
    assert np.array_equal(m[:10], inverse) and np.array_equal(m[10:], [-1, -1, -1])
    assert np.array_equal(np.sort(C.match_features(b, wide)), np.arange(10))


def test_mppc_gaussian_null_level():
    # E max_j |r| over m independent features ≈ sqrt(2 ln m / n); the signed max is of the same order
    rng = np.random.default_rng(1)
    n, m = 2000, 256
    value = C.mppc(rng.standard_normal((n, 32)), rng.standard_normal((n, m)))
    assert 0.5 * np.sqrt(2 * np.log(m) / n) < value < 1.15 * np.sqrt(2 * np.log(m) / n)


def test_mmcs_with_rotation():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((20, 8))
    q = _orthogonal(8, 4)
    assert C.mmcs(d, d[rng.permutation(20)]) == pytest.approx(1.0, abs=1e-12)
    assert C.mmcs(d, d @ q) < 0.9
    assert C.mmcs(d, d @ q, rotation=q) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="same d"):
        C.mmcs(d, d[:, :4])


def test_jaccard_and_random_null():
    assert C.jaccard({1, 2, 3}, [2, 3, 4]) == pytest.approx(0.5)
    assert C.jaccard([], []) == 1.0
    null = C.random_jaccard_null(3, 3, 12, n=4000, seed=0)
    # exact expectation of |A∩B|/|A∪B| for two random 3-subsets of 12 items (hypergeometric overlap)
    from scipy.stats import hypergeom

    k = np.arange(4)
    expected = float(np.sum(hypergeom(12, 3, 3).pmf(k) * k / (6 - k)))
    assert abs(null.mean() - expected) < 0.01
    with pytest.raises(ValueError):
        C.random_jaccard_null(5, 1, 4)


def test_permutation_and_rotation_nulls():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6))
    y = x @ rng.standard_normal((6, 6)) + 0.5 * rng.standard_normal((200, 6))
    res = C.permutation_test(C.cka, x, y, n_permutations=99, seed=0)
    assert res.p_value == pytest.approx(0.01) and abs(res.to_dict()["null_mean"]) < 0.05
    indep = C.permutation_test(C.cka, x, rng.standard_normal((200, 6)), n_permutations=99, seed=0)
    assert indep.p_value > 0.01
    # CKA is rotation invariant: the rotation null equals the observed value
    rot = C.rotation_test(C.cka, x, y, n_rotations=10, seed=0)
    assert np.allclose(rot.null, rot.observed, atol=1e-9)
    # MPPC of sparse features against a rotated copy of themselves: far below the unrotated value
    feats = np.abs(rng.standard_normal((300, 10))) * (rng.random((300, 10)) < 0.2)
    mp = C.rotation_test(C.mppc, feats, feats, n_rotations=20, seed=0)
    assert mp.observed == pytest.approx(1.0) and mp.to_dict()["null_q95"] < 0.9 and mp.p_value < 0.05


def test_sequence_permutation_keeps_positions():
    # Y depends only on the position: a row shuffle destroys it, a sequence shuffle keeps it (null == observed)
    n_seq, length = 20, 8
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(n_seq), length)
    pos = np.tile(np.arange(length), n_seq)
    x = np.eye(length)[pos] + 0.01 * rng.standard_normal((n_seq * length, length))
    y = np.eye(length)[pos] @ rng.standard_normal((length, 5))
    by_seq = C.permutation_test(C.cka, x, y, n_permutations=20, seed=0, groups=groups)
    by_row = C.permutation_test(C.cka, x, y, n_permutations=20, seed=0)
    assert np.allclose(by_seq.null, by_seq.observed, atol=0.02)
    assert by_row.to_dict()["null_mean"] < 0.2 and by_row.p_value < 0.1


def test_bootstrap_by_group_is_deterministic_and_brackets():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(30), 5)
    x = rng.standard_normal((150, 4))
    y = x + rng.standard_normal((150, 4))
    est = C.bootstrap_by_group(C.cka, x, y, groups, n_resamples=100, seed=1)
    assert est.value == pytest.approx(C.cka(x, y)) and est.ci_low < est.value < est.ci_high and est.n == 30
    assert C.bootstrap_by_group(C.cka, x, y, groups, n_resamples=100, seed=1) == est


@pytest.mark.parametrize("debiased", [True, False])
def test_grouped_cka_fast_path_equals_reference(debiased):
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(25), 6)
    x = rng.standard_normal((150, 5)) + 3.0  # off-centre: the expansion must handle the means
    y = x @ rng.standard_normal((5, 3)) + rng.standard_normal((150, 3))
    fast = C.GroupedLinearCKA(x, y, groups, debiased=debiased)
    idx = rng.integers(0, 25, 25)
    take = np.concatenate([np.flatnonzero(groups == i) for i in idx])
    assert fast(idx) == pytest.approx(C.cka(x[take], y[take], debiased=debiased), abs=1e-10)
    measure = lambda a, b: C.cka(a, b, debiased=debiased)
    slow = C.bootstrap_by_group(measure, x, y, groups, n_resamples=50, seed=3)
    quick = C.bootstrap_indices(fast, 25, n_resamples=50, seed=3)
    assert quick.value == pytest.approx(slow.value, abs=1e-10)
    assert quick.ci_low == pytest.approx(slow.ci_low, abs=1e-10) and quick.ci_high == pytest.approx(slow.ci_high,
                                                                                                      abs=1e-10)


@pytest.mark.parametrize("groups", [None, np.repeat(np.arange(20), 5)])
def test_cka_permutation_fast_path_equals_reference(groups):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((100, 4))
    y = x + rng.standard_normal((100, 4))
    slow = C.permutation_test(C.cka, x, y, n_permutations=30, seed=2, groups=groups)
    fast = C.cka_permutation_test(x, y, n_permutations=30, seed=2, groups=groups)
    assert fast.observed == pytest.approx(slow.observed, abs=1e-12)
    assert np.allclose(fast.null, slow.null, atol=1e-12) and fast.p_value == slow.p_value and fast.kind == slow.kind
