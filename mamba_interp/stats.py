"""Statistics shared by every analysis: bootstrap confidence intervals, permutation tests, multiple comparisons.

Thin, tested wrappers over ``scipy.stats`` (``bootstrap``, ``permutation_test``) and ``statsmodels``
(``multipletests``), so that every step states its uncertainty the same way:

* :func:`bootstrap_ci` — a percentile (or BCa) bootstrap CI of a statistic over examples (Efron & Tibshirani
  1993); degenerate inputs (fewer than 2 values, or all equal) give the point value as both ends instead of NaN.
* :func:`estimate` — value + CI + n as a JSON-able :class:`Estimate`, what metrics store.
* :func:`diff_ci` — CI of ``statistic(a) − statistic(b)`` for two independent samples (e.g. Δ on triggers vs on
  content tokens), :func:`paired_diff_ci` for paired ones.
* :func:`permutation_pvalue` — the p-value of an observed value against samples of a null (random controls),
  with the +1 correction of Phipson & Smyth (2010), so it is never 0.
* :func:`paired_permutation_test` — a sign-flip test of paired differences (``scipy.stats.permutation_test``).
* :func:`correct_pvalues` — Holm or Benjamini–Hochberg across several tests.

Every function takes a ``seed``; the same inputs and seed give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Statistic = Callable[..., Any]

DEFAULT_RESAMPLES = 2000


def _as_array(values: Any) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensors
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    return arr[np.isfinite(arr)]


def _stat_fn(statistic: str | Statistic) -> Statistic:
    if callable(statistic):
        return statistic
    fns = {"mean": np.mean, "median": np.median}
    if statistic not in fns:
        raise ValueError(f"statistic={statistic!r} is unknown; use 'mean', 'median' or a function")
    return fns[statistic]


@dataclass(frozen=True)
class Estimate:
    """A point value with its confidence interval over ``n`` examples (or seeds)."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    confidence: float = 0.95

    @property
    def ci(self) -> tuple[float, float]:
        return (self.ci_low, self.ci_high)

    def contains(self, x: float) -> bool:
        return self.ci_low <= x <= self.ci_high

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci": [self.ci_low, self.ci_high], "n": self.n}

    def __str__(self) -> str:
        return f"{self.value:.3g} [{self.ci_low:.3g}, {self.ci_high:.3g}]"


def bootstrap_ci(
    values: Any,
    statistic: str | Statistic = "mean",
    confidence: float = 0.95,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: str = "percentile",
) -> tuple[float, float]:
    """Bootstrap CI of ``statistic`` over the finite entries of ``values`` (``scipy.stats.bootstrap``).

    ``method``: "percentile" (default: robust for bounded statistics such as accuracies) or "BCa". With fewer
    than two values, or when every value is equal, both ends are the point value (no resampling can move it).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    from scipy import stats

    x = _as_array(values)
    fn = _stat_fn(statistic)
    if x.size == 0:
        return (float("nan"), float("nan"))
    if x.size < 2 or np.all(x == x[0]):
        v = float(fn(x))
        return (v, v)
    res = stats.bootstrap((x,), lambda s, axis=-1: fn(s, axis=axis), confidence_level=confidence,
                          n_resamples=n_resamples, method=method, rng=np.random.default_rng(seed),
                          vectorized=True)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(lo) and np.isfinite(hi)):  # BCa on a degenerate resampling distribution
        v = float(fn(x))
        return (min(lo, v) if np.isfinite(lo) else v, max(hi, v) if np.isfinite(hi) else v)
    return (lo, hi)


def estimate(values: Any, statistic: str | Statistic = "mean", confidence: float = 0.95,
             n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
    """``statistic(values)`` with its bootstrap CI, as an :class:`Estimate` (NaN value for no finite entry)."""
    x = _as_array(values)
    value = float(_stat_fn(statistic)(x)) if x.size else float("nan")
    lo, hi = bootstrap_ci(x, statistic, confidence, n_resamples, seed)
    return Estimate(value, lo, hi, int(x.size), confidence)


def diff_ci(a: Any, b: Any, statistic: str | Statistic = "mean", confidence: float = 0.95,
            n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
    """``statistic(a) − statistic(b)`` for two independent samples, with a bootstrap CI resampling each."""
    from scipy import stats

    x, y = _as_array(a), _as_array(b)
    fn = _stat_fn(statistic)
    if x.size == 0 or y.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), int(x.size + y.size), confidence)
    value = float(fn(x) - fn(y))
    if x.size < 2 or y.size < 2 or (np.all(x == x[0]) and np.all(y == y[0])):
        return Estimate(value, value, value, int(x.size + y.size), confidence)
    res = stats.bootstrap((x, y), lambda s, t, axis=-1: fn(s, axis=axis) - fn(t, axis=axis),
                          confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                          rng=np.random.default_rng(seed), vectorized=True)
    return Estimate(value, float(res.confidence_interval.low), float(res.confidence_interval.high),
                    int(x.size + y.size), confidence)


def paired_diff_ci(a: Any, b: Any, statistic: str | Statistic = "mean", confidence: float = 0.95,
                   n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
    """``statistic(a − b)`` for paired samples (same examples, two conditions), with its bootstrap CI."""
    x, y = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    return estimate(x - y, statistic, confidence, n_resamples, seed)


def permutation_pvalue(observed: float, null: Sequence[float] | np.ndarray, alternative: str = "greater"
                       ) -> float:
    """p-value of ``observed`` against samples of the null: (1 + #{null ≥ observed}) / (1 + n) for "greater",
    mirrored for "less", and the smaller tail doubled (capped at 1) for "two-sided"."""
    z = _as_array(null)
    if z.size == 0:
        raise ValueError("the null distribution is empty; draw at least one random control")
    ge = (1 + np.sum(z >= observed)) / (1 + z.size)
    le = (1 + np.sum(z <= observed)) / (1 + z.size)
    if alternative == "greater":
        return float(ge)
    if alternative == "less":
        return float(le)
    if alternative == "two-sided":
        return float(min(1.0, 2 * min(ge, le)))
    raise ValueError(f"alternative={alternative!r} is unknown; use 'greater', 'less' or 'two-sided'")


def paired_permutation_test(a: Any, b: Any, alternative: str = "greater", n_resamples: int = 9999,
                            seed: int = 0) -> float:
    """p-value that the mean of ``a − b`` (paired) is greater/less/different than 0, by random sign flips
    (``scipy.stats.permutation_test`` with ``permutation_type="samples"``)."""
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    if x.size < 2:
        return 1.0
    res = stats.permutation_test((x, y), lambda s, t, axis=-1: np.mean(s - t, axis=axis), vectorized=True,
                                 permutation_type="samples", alternative=alternative, n_resamples=n_resamples,
                                 rng=np.random.default_rng(seed))
    return float(res.pvalue)


def correct_pvalues(pvalues: Sequence[float], method: str = "holm", alpha: float = 0.05
                    ) -> tuple[list[bool], list[float]]:
    """Multiple-comparison correction (``statsmodels.stats.multitest.multipletests``): ``method`` "holm"
    (family-wise error) or "fdr_bh" (false discovery rate). Returns (reject, corrected p-values)."""
    from statsmodels.stats.multitest import multipletests

    if method not in ("holm", "fdr_bh", "bonferroni"):
        raise ValueError(f"method={method!r} is unknown; use 'holm', 'fdr_bh' or 'bonferroni'")
    p = np.asarray(list(pvalues), dtype=np.float64)
    if p.size == 0:
        return [], []
    reject, corrected, _, _ = multipletests(p, alpha=alpha, method=method)
    return [bool(r) for r in reject], [float(c) for c in corrected]
