"""Power-law fits: exact recovery, refusal below three sizes, bootstrap CI coverage on synthetic ladders."""

from __future__ import annotations

import numpy as np
import pytest

from mamba_interp.scaling import loglog_slope, power_law_fit

SIZES = [4_000.0, 16_000.0, 64_000.0]


def test_noiseless_recovery():
    sizes = np.array(SIZES)
    slope, intercept, r2 = loglog_slope(sizes, 2.0 * sizes**-0.5)
    assert slope == pytest.approx(-0.5, abs=1e-10) and np.exp(intercept) == pytest.approx(2.0, rel=1e-10)
    assert r2 == pytest.approx(1.0)
    fit = power_law_fit(SIZES, [np.full(5, 2.0 * n**-0.5) for n in SIZES], n_resamples=20)
    assert fit.exponent == pytest.approx(-0.5, abs=1e-10) and fit.ci_low == pytest.approx(fit.ci_high)
    assert fit.predict(64_000.0) == pytest.approx(2.0 * 64_000**-0.5)


def test_refuses_fewer_than_three_sizes_and_non_positive_values():
    with pytest.raises(ValueError, match="at least 3 distinct sizes"):
        power_law_fit([10.0, 10.0, 20.0], [np.ones(3)] * 3)
    with pytest.raises(ValueError, match="one sample per size"):
        power_law_fit(SIZES, [np.ones(3)] * 2)
    fit = power_law_fit(SIZES, [np.zeros(3), np.ones(3), np.ones(3)], n_resamples=10)
    assert np.isnan(fit.exponent)


@pytest.mark.slow
def test_bootstrap_ci_covers_the_true_exponent():
    # 200 synthetic ladders: per-size means of 100 noisy examples around L = 2 N^-0.5 (5 % relative noise)
    rng = np.random.default_rng(0)
    covered = 0
    repeats = 200
    for r in range(repeats):
        samples = [2.0 * n**-0.5 * (1 + 0.05 * rng.standard_normal(100)) for n in SIZES]
        fit = power_law_fit(SIZES, samples, n_resamples=200, seed=r)
        covered += fit.ci_low <= -0.5 <= fit.ci_high
    assert covered / repeats >= 0.9


def test_ratio_statistic_on_two_column_samples():
    rng = np.random.default_rng(1)
    # FVU-like: sum of errors over sum of variances per point, shrinking as N^-0.3
    samples = [np.column_stack([n**-0.3 * rng.uniform(0.5, 1.5, 200), rng.uniform(0.5, 1.5, 200)]) for n in SIZES]
    fit = power_law_fit(SIZES, samples, statistic=lambda s: s[:, 0].sum() / s[:, 1].sum(), n_resamples=200)
    assert fit.ci_low < fit.exponent < fit.ci_high and abs(fit.exponent + 0.3) < 0.1


def test_ci_is_nan_without_a_warning_when_resamples_reach_zero():
    import warnings

    samples = [np.array([1.0] * 5 + [0.0] * 5), np.array([1.0] + [0.0] * 9), np.array([1.0] + [0.0] * 19)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = power_law_fit(SIZES, samples, n_resamples=50)
    assert np.isfinite(fit.exponent) and np.isnan(fit.ci_low)
