"""Scaling fits along a size ladder: a two-parameter power law y = a·N^b fitted in log-log space, with a bootstrap
CI on the exponent.

Kaplan et al. 2020 (arXiv 2001.08361) fit L(N) = (N_c / N)^α_N; with the offset form a·N^−α + c three sizes leave the
fit unidentified (an exact fit with infinite covariance), so :func:`power_law_fit` fits only log y = log a + b log N by
ordinary least squares and refuses fewer than three distinct sizes. Its CI resamples the examples measured at each
size independently (``scipy.stats.bootstrap`` with one sample per size point) and refits, so it states how
precisely the per-size values were measured — not whether a power law is the right form, which three points cannot
say. Points at the same size (e.g. several seeds) are separate samples; the fit is over all points.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_SIZES = 3


@dataclass(frozen=True)
class PowerLawFit:
    """log y = log a + exponent · log N over ``n_points`` points at ``n_sizes`` distinct N."""

    exponent: float
    prefactor: float
    r2: float
    ci_low: float
    ci_high: float
    n_points: int
    n_sizes: int

    def predict(self, n: Any) -> np.ndarray:
        return self.prefactor * np.asarray(n, dtype=np.float64) ** self.exponent

    def to_dict(self) -> dict[str, Any]:
        return {"exponent": self.exponent, "exponent_ci": [self.ci_low, self.ci_high], "prefactor": self.prefactor,
                "r2": self.r2, "n_points": self.n_points, "n_sizes": self.n_sizes, "form": "y = a * N^exponent"}


def loglog_slope(sizes: Any, values: Any) -> tuple[float, float, float]:
    """(slope, intercept, R²) of the OLS fit of log y on log N; NaN if any value is not positive."""
    x, y = np.log(np.asarray(sizes, dtype=np.float64)), np.asarray(values, dtype=np.float64)
    if np.any(~np.isfinite(y)) or np.any(y <= 0):
        return float("nan"), float("nan"), float("nan")
    ly = np.log(y)
    slope, intercept = np.polyfit(x, ly, 1)
    resid = ly - (slope * x + intercept)
    total = np.sum((ly - ly.mean()) ** 2)
    return float(slope), float(intercept), float(1 - resid @ resid / total) if total > 0 else 1.0


def power_law_fit(sizes: Sequence[float], samples: Sequence[Any], statistic: Callable[[np.ndarray], float] = np.mean,
                  n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> PowerLawFit:
    """Fit y_k = statistic(samples[k]) against sizes[k] (one entry per point: the per-example values measured at
    that size, [n] or [n, c] with examples as rows), with a bootstrap CI on the exponent that resamples each
    point's rows. ``statistic`` maps one sample (rows) to a number, e.g. a mean or a ratio of column sums."""
    from scipy import stats

    sizes_arr = np.asarray(sizes, dtype=np.float64)
    if len(samples) != sizes_arr.size:
        raise ValueError(f"{sizes_arr.size} sizes but {len(samples)} samples; give one sample per size point")
    n_sizes = len(np.unique(sizes_arr))
    if n_sizes < MIN_SIZES:
        raise ValueError(f"a power law needs at least {MIN_SIZES} distinct sizes, got {n_sizes}; report the values "
                         "per size instead")
    if np.any(sizes_arr <= 0):
        raise ValueError("sizes must be positive")
    data = [np.asarray(s, dtype=np.float64) for s in samples]
    values = [statistic(d) for d in data]
    slope, intercept, r2 = loglog_slope(sizes_arr, values)
    lo = hi = slope
    if np.isfinite(slope) and all(len(d) > 1 for d in data):
        # resample row indices of each point (scipy would treat the columns of a 2-D sample as a batch)
        rows = [np.arange(len(d), dtype=np.float64) for d in data]

        def slope_of(*idx: np.ndarray) -> float:
            return loglog_slope(sizes_arr, [statistic(d[i.astype(np.int64)]) for d, i in zip(data, idx)])[0]

        with warnings.catch_warnings():
            # resamples that reach a zero value give NaN slopes: the CI is then NaN (reported), not a warning
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            res = stats.bootstrap(rows, slope_of, vectorized=False, paired=False, n_resamples=n_resamples,
                                  confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return PowerLawFit(slope, float(np.exp(intercept)), r2, lo, hi, int(sizes_arr.size), n_sizes)
