"""The shared statistics helpers against known answers (coverage of the CI, permutation p-values, corrections)."""

from __future__ import annotations

import numpy as np
import pytest

from mamba_interp import stats


def test_bootstrap_ci_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(100):
        x = rng.normal(1.0, 2.0, size=80)
        lo, hi = stats.bootstrap_ci(x, n_resamples=500, seed=i)
        hits += lo <= 1.0 <= hi
    assert 85 <= hits <= 100  # nominal 95 %


def test_bootstrap_ci_is_deterministic_and_handles_degenerate_input():
    x = np.arange(20.0)
    assert stats.bootstrap_ci(x, seed=3) == stats.bootstrap_ci(x, seed=3)
    assert stats.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert stats.bootstrap_ci([5.0]) == (5.0, 5.0)
    assert all(np.isnan(stats.bootstrap_ci([])))
    e = stats.estimate([1.0, np.nan, 3.0, 2.0])
    assert e.n == 3 and e.value == pytest.approx(2.0) and e.ci_low <= 2.0 <= e.ci_high
    assert e.to_dict()["ci"] == [e.ci_low, e.ci_high]


def test_diff_ci_separates_shifted_samples_and_contains_zero_for_equal_ones():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 200)
    d = stats.diff_ci(a, b)
    assert d.ci_low > 0.5 and d.value == pytest.approx(a.mean() - b.mean())
    same = stats.diff_ci(rng.normal(0, 1, 200), rng.normal(0, 1, 200))
    assert same.contains(0.0)
    paired = stats.paired_diff_ci(a, a - 0.25)
    assert paired.value == pytest.approx(0.25) and paired.ci == (pytest.approx(0.25), pytest.approx(0.25))


def test_permutation_pvalue_counts_the_null_with_the_plus_one_correction():
    null = np.arange(99.0)  # 0..98
    assert stats.permutation_pvalue(1000.0, null) == pytest.approx(1 / 100)
    assert stats.permutation_pvalue(-1.0, null) == pytest.approx(1.0)
    assert stats.permutation_pvalue(49.0, null) == pytest.approx(51 / 100)
    assert stats.permutation_pvalue(-1.0, null, alternative="less") == pytest.approx(1 / 100)
    with pytest.raises(ValueError, match="empty"):
        stats.permutation_pvalue(1.0, [])


def test_paired_permutation_test_detects_a_shift_and_not_its_absence():
    rng = np.random.default_rng(2)
    a = rng.normal(0, 1, 60)
    assert stats.paired_permutation_test(a + 1.0, a, n_resamples=999) < 0.01
    assert stats.paired_permutation_test(a + rng.normal(0, 1, 60), a, n_resamples=999, alternative="two-sided") > 0.01


def test_correct_pvalues_holm_and_bh():
    reject, corrected = stats.correct_pvalues([0.01, 0.04, 0.03], method="holm")
    assert corrected == pytest.approx([0.03, 0.06, 0.06])
    assert reject == [True, False, False]
    _, bh = stats.correct_pvalues([0.01, 0.04, 0.03], method="fdr_bh")
    assert bh == pytest.approx([0.03, 0.04, 0.04])
    with pytest.raises(ValueError, match="unknown"):
        stats.correct_pvalues([0.1], method="nope")
