"""Held-out splits, scores and their bootstrap over groups (sequences) for the probes of ``probes.py``.

A probe's rows are split once into train and test by group (:func:`split_indices`); the score is the balanced
accuracy for classification — more than two classes each scored against the rest and averaged over the classes
present, so chance is 0.5 for any number of classes — and R² for regression (chance 0). Its CI resamples test
*groups*, not rows (tokens of one sequence are not independent; Efron & Tibshirani 1993 on resampling the
independent units): ``mamba_interp.stats.estimate`` over group indices with a statistic computed from the
resampled per-group counts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from mamba_interp.stats import Estimate, estimate

CLASSIFICATION = "classification"
REGRESSION = "regression"


# ---- splits ----------------------------------------------------------------------------------------
def split_indices(n: int, groups: np.ndarray | None = None, test_size: float = 0.25, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices; whole groups go to one side (``GroupShuffleSplit``). The split depends on
    the groups and the seed only, not on the labels, so a task probe and its control probe share it."""
    from sklearn.model_selection import GroupShuffleSplit

    if not 0 < test_size < 1:
        raise ValueError(f"test_size={test_size} must be in (0, 1)")
    g = np.arange(n) if groups is None else np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups has shape {g.shape}, expected ({n},): one group id per row")
    if np.unique(g).size < 2:
        raise ValueError("the rows come from a single group; a held-out split needs at least 2 groups (sequences)")
    train, test = next(GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed).split(g, groups=g))
    return np.sort(train), np.sort(test)


def splits_both_ways(y: np.ndarray, split: tuple[np.ndarray, np.ndarray]) -> bool:
    """Both sides of ``split`` hold at least two distinct labels (a probe can be fitted and scored)."""
    return all(np.unique(y[side]).size > 1 for side in split)


def _inner_folds(y: np.ndarray, groups: np.ndarray, cv: int, task: str, seed: int) -> list[tuple]:
    """Cross-validation folds on the training part, whole groups per fold (stratified for classification)."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    n_splits = min(cv, np.unique(groups).size)
    if n_splits < 2:
        raise ValueError("cross-validation needs at least 2 groups in the training part; add sequences")
    if task == CLASSIFICATION:
        _, counts = np.unique(y, return_counts=True)
        if counts.min() >= n_splits:
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            return list(splitter.split(np.zeros(len(y)), y, groups))
    return list(GroupKFold(n_splits=n_splits).split(np.zeros(len(y)), y, groups))


# ---- held-out scores and their bootstrap ---------------------------------------------------------------
@dataclass
class HeldOut:
    """What a probe predicted on its test part: enough to score it and to resample its test groups."""

    y: np.ndarray
    pred: np.ndarray
    groups: np.ndarray


def _group_sums(h: HeldOut, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Per test group sufficient statistics [S, m] (in the order of the sorted unique groups) and those groups.

    Classification: per class the positives, true positives, negatives and true negatives (m = 4K); regression:
    count, Σy, Σy² and the squared error (m = 4)."""
    uniq, inv = np.unique(h.groups, return_inverse=True)
    s = uniq.size

    def per_group(w: np.ndarray) -> np.ndarray:
        return np.bincount(inv, weights=w.astype(np.float64), minlength=s)

    if task == REGRESSION:
        cols = [np.ones_like(h.y), h.y, h.y ** 2, (h.y - h.pred) ** 2]
    else:
        cols = []
        for c in np.unique(h.y):
            pos, hit = h.y == c, h.pred == c
            cols += [pos, pos & hit, ~pos, ~pos & ~hit]
    return np.stack([per_group(np.asarray(c, dtype=np.float64)) for c in cols], axis=1), uniq


def _score_from_sums(sums: np.ndarray, task: str) -> np.ndarray:
    """Score from summed statistics [..., m] -> [...] (see :func:`_group_sums`)."""
    if task == REGRESSION:
        n, sy, syy, sse = (sums[..., i] for i in range(4))
        sst = syy - sy ** 2 / np.maximum(n, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), np.nan)
    s = sums.reshape(*sums.shape[:-1], -1, 4)  # (..., K, 4)
    pos, tp, neg, tn = (s[..., i] for i in range(4))
    valid = (pos > 0) & (neg > 0)
    ba = 0.5 * (tp / np.where(pos > 0, pos, 1.0) + tn / np.where(neg > 0, neg, 1.0))
    count = valid.sum(-1)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, (ba * valid).sum(-1) / np.maximum(count, 1), np.nan)


def heldout_score(y: np.ndarray, pred: np.ndarray, task: str) -> float:
    """Balanced accuracy (classes scored one against the rest, averaged) or R² of predictions."""
    h = HeldOut(np.asarray(y), np.asarray(pred), np.zeros(len(y), dtype=np.int64))
    return float(_score_from_sums(_group_sums(h, task)[0].sum(0), task))


def _group_bootstrap(sums: np.ndarray, reduce: Any, n_resamples: int, seed: int) -> Estimate:
    """``reduce(sums.sum(0))`` with a bootstrap CI over the S rows (groups) of ``sums`` [S, m]."""
    s = sums.shape[0]

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.moveaxis(np.asarray(idx).astype(np.int64), axis, -1)
        flat = idx.reshape(-1, idx.shape[-1])
        offsets = s * np.arange(flat.shape[0])[:, None]
        counts = np.bincount((flat + offsets).ravel(), minlength=flat.shape[0] * s).reshape(-1, s)
        return reduce(counts @ sums).reshape(idx.shape[:-1])

    with warnings.catch_warnings():
        # a score that every resample leaves unchanged (e.g. 1.0): scipy warns, the CI is the point value
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        return estimate(np.arange(s), statistic, n_resamples=n_resamples, seed=seed)

