"""Similarity of representations and features across models: CKA, SVCCA, Procrustes, RSA, MPPC, with nulls.

Every measure takes two activation matrices whose rows are paired samples (the same token position fed to both
models) and whose columns are features: ``X`` [n, d1], ``Y`` [n, d2] (numpy arrays or torch tensors; computed in
float64). Columns are centred inside each measure.

* :func:`cka` — centred kernel alignment (Kornblith et al. 2019, arXiv 1905.00414), linear or RBF kernel; by
  default the *debiased* estimator, which plugs the unbiased HSIC of Song et al. 2012 (JMLR 13, eq. 5) into all
  three terms. The biased estimator (``debiased=False``) is high for independent data when n is not ≫ d (Murphy
  et al. 2024, arXiv 2405.01012), so prefer the debiased one. Linear CKA is invariant to orthogonal maps and
  isotropic scaling, *not* to general invertible linear maps.
* :func:`svcca` — SVCCA (Raghu et al. 2017, arXiv 1706.05806): keep the top singular directions explaining 99 % of
  each side's variance, then mean canonical correlation. Invariant to invertible linear maps; needs n ≫ d.
* :func:`procrustes_distance` — orthogonal Procrustes shape distance (Williams et al. 2021, arXiv 2110.14739;
  Ding et al. 2021, arXiv 2108.01661): angular ``arccos ‖XᵀY‖_*`` of centred, unit-Frobenius X and Y, or the
  Euclidean ``sqrt(2 − 2‖XᵀY‖_*)``; :func:`procrustes_rotation` gives the aligning rotation itself.
* :func:`rsa` — representational similarity analysis (Kriegeskorte et al. 2008): Spearman correlation of the two
  representational dissimilarity matrices.
* :func:`mppc` — mean max pairwise Pearson correlation of features (Wang et al. 2024, arXiv 2410.06672): for each
  feature of A the largest correlation with any feature of B over the same token stream, averaged over A's
  features; :func:`matched_correlation` pairs them one-to-one (Hungarian matching) instead; :func:`mmcs` is the
  mean max cosine similarity of two dictionaries' directions (decoder rows).
* :func:`jaccard` of two sets and :func:`random_jaccard_null` (random sets of the same sizes from a universe).
* Nulls: :func:`permutation_test` (shuffle the pairing of rows, or of whole sequences: breaks the sample
  correspondence), :func:`rotation_test` (a Haar-random rotation of Y's feature basis: tests whether a
  basis-dependent measure such as MPPC or MMCS sees more than a rotation-invariant one would), each returning a
  :class:`NullTest` with the p-value of ``mamba_interp.stats.permutation_pvalue``;
  :func:`bootstrap_by_group` gives a CI resampling whole sequences (tokens within a sequence are correlated), and
  :func:`bootstrap_indices` one for any statistic of resampled examples. Fast paths with the same values for
  linear CKA: :class:`GroupedLinearCKA` (per-sequence sums, for the sequence bootstrap) and
  :func:`cka_permutation_test`.

Measures return Python floats; NaN when undefined (e.g. a constant input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mamba_interp.stats import Estimate, estimate, permutation_pvalue

Measure = Callable[[np.ndarray, np.ndarray], float]
KERNELS = ("linear", "rbf")


def as_matrix(x: Any, name: str = "X") -> np.ndarray:
    """A float64 numpy matrix [n, d] from an array or tensor ([n] becomes [n, 1])."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a matrix [n, d] (rows = samples), got shape {arr.shape}")
    return arr


def _pair(X: Any, Y: Any, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    x, y = as_matrix(X, "X"), as_matrix(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must have the same rows (paired samples), got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} paired samples, got {x.shape[0]}")
    return x, y


def _centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean(0, keepdims=True)


# ---- CKA -------------------------------------------------------------------------------------------------
def hsic(K: np.ndarray, L: np.ndarray, debiased: bool = True) -> float:
    """HSIC of two n×n Gram matrices: biased ``tr(KHLH)/(n−1)²`` or the unbiased estimator of Song et al.
    (2012, eq. 5): ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))``, K̃ = K with zero diagonal."""
    n = K.shape[0]
    if debiased:
        if n < 4:
            raise ValueError(f"the unbiased HSIC needs n >= 4 samples, got {n}")
        k, l_ = K.copy(), L.copy()
        np.fill_diagonal(k, 0.0)
        np.fill_diagonal(l_, 0.0)
        kl_row = k.sum(1) @ l_.sum(1)  # 1ᵀK̃L̃1 (K̃ symmetric)
        value = (k * l_).sum() + k.sum() * l_.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl_row
        return float(value / (n * (n - 3)))
    h = np.eye(n) - 1.0 / n
    return float(np.trace(K @ h @ L @ h) / (n - 1) ** 2)


def gram(X: Any, kernel: str = "linear", threshold: float = 0.5) -> np.ndarray:
    """Gram matrix [n, n]: linear ``X Xᵀ`` (columns centred) or RBF ``exp(−‖xi−xj‖²/(2σ²))`` with
    ``σ² = threshold² · median of all n² squared distances`` (Kornblith et al. 2019's bandwidth)."""
    x = _centre(as_matrix(X))
    if kernel == "linear":
        return x @ x.T
    if kernel == "rbf":
        sq = (x * x).sum(1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
        med = np.median(d2)
        if med <= 0:
            return np.ones_like(d2)
        return np.exp(-d2 / (2 * threshold**2 * med))
    raise ValueError(f"kernel={kernel!r} is unknown; use one of {', '.join(KERNELS)}")


def cka_gram(X: Any, Y: Any, kernel: str = "linear", debiased: bool = True, threshold: float = 0.5) -> float:
    """CKA from the two Gram matrices, ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``: O(n²) memory; the reference
    for :func:`cka`'s linear fast path and the only path for the RBF kernel."""
    x, y = _pair(X, Y, 4 if debiased else 2)
    K, L = gram(x, kernel, threshold), gram(y, kernel, threshold)
    kl, kk, ll = hsic(K, L, debiased), hsic(K, K, debiased), hsic(L, L, debiased)
    denom = np.sqrt(kk * ll) if kk > 0 and ll > 0 else 0.0
    return float(kl / denom) if denom > 0 else float("nan")


def _dot_similarity(x: np.ndarray, y: np.ndarray, debiased: bool) -> float:
    """n(n−3)·HSIC₁ (or (n−1)²·HSIC₀) of the linear kernels of centred x, y, from features only: O(n d1 d2)."""
    xty = float(np.sum((x.T @ y) ** 2))
    if not debiased:
        return xty
    n = x.shape[0]
    rx, ry = (x * x).sum(1), (y * y).sum(1)  # ‖x_i‖², ‖y_i‖²
    return xty - n / (n - 2) * float(rx @ ry) + float(rx.sum() * ry.sum()) / ((n - 1) * (n - 2))


def cka(X: Any, Y: Any, kernel: str = "linear", debiased: bool = True, threshold: float = 0.5) -> float:
    """Centred kernel alignment of X [n, d1] and Y [n, d2] (rows paired). ``kernel="linear"`` uses the feature-space
    form (no n×n matrix; equal to :func:`cka_gram`); ``"rbf"`` the Gram form with bandwidth ``threshold``.
    ``debiased`` (default) uses the unbiased HSIC estimator (can be slightly negative; ≈ 0 for independent data)."""
    if kernel != "linear":
        return cka_gram(X, Y, kernel, debiased, threshold)
    x, y = _pair(X, Y, 4 if debiased else 2)
    x, y = _centre(x), _centre(y)
    xy, xx, yy = _dot_similarity(x, y, debiased), _dot_similarity(x, x, debiased), _dot_similarity(y, y, debiased)
    if xx <= 0 or yy <= 0:
        return float("nan")
    return float(xy / np.sqrt(xx * yy))


class GroupedLinearCKA:
    """Linear CKA of any multiset of whole groups (sequences) of paired rows, from per-group sums: the fast path
    of ``cka(X[rows], Y[rows])`` for the sequence bootstrap, O(groups · d²) per evaluation instead of O(n · d²).

    ``self(idx)`` is the CKA of the rows of the groups ``idx`` (indices into the sorted unique group ids, repeats
    allowed), equal to :func:`cka` on the concatenated rows (tested). Centring and the debiasing terms are expanded
    into sums that do not depend on the subset: Σx, Σy, ΣxyᵀΣ, Σxxᵀ, Σyyᵀ, Σ‖x‖², Σ‖y‖², Σ‖x‖²‖y‖², Σ‖x‖²y,
    Σ‖y‖²x (and the x–x, y–y analogues) per group.
    """

    def __init__(self, X: Any, Y: Any, groups: Any, debiased: bool = True) -> None:
        x, y = _pair(X, Y, 4 if debiased else 2)
        g = np.asarray(groups).reshape(-1)
        if g.size != x.shape[0]:
            raise ValueError(f"groups has {g.size} entries for {x.shape[0]} rows")
        # shift by the overall mean first: CKA is translation invariant and the expanded sums lose less precision
        x, y = _centre(x), _centre(y)
        self.ids, inv = np.unique(g, return_inverse=True)
        self.debiased = debiased
        k = len(self.ids)
        onehot = np.zeros((k, x.shape[0]))
        onehot[inv, np.arange(x.shape[0])] = 1.0
        self.count = onehot.sum(1)
        self.sums = {"x": onehot @ x, "y": onehot @ y}
        nx, ny = (x * x).sum(1), (y * y).sum(1)
        members = [np.flatnonzero(inv == i) for i in range(k)]
        self.outer = {key: np.stack([a[r].T @ b[r] for r in members])  # [groups, d_a, d_b]
                      for key, (a, b) in {"xy": (x, y), "xx": (x, x), "yy": (y, y)}.items()}
        self.sq = {"x": onehot @ nx, "y": onehot @ ny}
        self.sq2 = {"xy": onehot @ (nx * ny), "xx": onehot @ (nx * nx), "yy": onehot @ (ny * ny)}
        self.sq_vec = {"xy": onehot @ (nx[:, None] * y), "yx": onehot @ (ny[:, None] * x),
                       "xx": onehot @ (nx[:, None] * x), "yy": onehot @ (ny[:, None] * y)}

    def _similarity(self, w: np.ndarray, a: str, b: str) -> float:
        """n(n−3)·HSIC₁ (or ‖B_cᵀA_c‖²) of the linear kernels of sides a, b over the weighted groups."""
        n = float(w @ self.count)
        sa, sb = w @ self.sums[a], w @ self.sums[b]
        ma, mb = sa / n, sb / n
        ab = np.einsum("g,gij->ij", w, self.outer[a + b])
        cross = ab - n * np.outer(ma, mb)  # A_cᵀB_c
        xty = float(np.sum(cross**2))
        if not self.debiased:
            return xty
        qa, qb = float(w @ self.sq[a]), float(w @ self.sq[b])
        ca, cb = float(ma @ ma), float(mb @ mb)
        # Σ_i ‖a_i − ma‖² ‖b_i − mb‖², expanded
        rows = (float(w @ self.sq2[a + b]) - 2 * float(mb @ (w @ self.sq_vec[a + b])) + cb * qa
                - 2 * float(ma @ (w @ self.sq_vec[b + a])) + 4 * float(ma @ ab @ mb) - 2 * cb * float(ma @ sa)
                + ca * qb - 2 * ca * float(mb @ sb) + n * ca * cb)
        na, nb = qa - n * ca, qb - n * cb  # ‖A_c‖_F², ‖B_c‖_F²
        return xty - n / (n - 2) * rows + na * nb / ((n - 1) * (n - 2))

    def __call__(self, idx: Any) -> float:
        w = np.bincount(np.asarray(idx, dtype=np.int64), minlength=len(self.ids)).astype(np.float64)
        xy, xx, yy = self._similarity(w, "x", "y"), self._similarity(w, "x", "x"), self._similarity(w, "y", "y")
        if xx <= 0 or yy <= 0:
            return float("nan")
        return float(xy / np.sqrt(xx * yy))


def cka_matrix(xs: Sequence[Any], ys: Sequence[Any], **kw: Any) -> np.ndarray:
    """``cka(xs[i], ys[j])`` for every pair of layers: [len(xs), len(ys)]."""
    return np.array([[cka(x, y, **kw) for y in ys] for x in xs])


# ---- CCA family, Procrustes, RSA -----------------------------------------------------------------------
def cca_correlations(X: Any, Y: Any) -> np.ndarray:
    """Canonical correlations of centred X and Y (descending): singular values of ``Q_xᵀ Q_y`` (QR bases)."""
    x, y = _pair(X, Y)
    qx, _ = np.linalg.qr(_centre(x))
    qy, _ = np.linalg.qr(_centre(y))
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


def _top_directions(x: np.ndarray, keep: float) -> np.ndarray:
    u, s, _ = np.linalg.svd(_centre(x), full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return u[:, :0]
    frac = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.searchsorted(frac, keep - 1e-12) + 1)
    return u[:, :k] * s[:k]


def svcca(X: Any, Y: Any, keep: float = 0.99) -> float:
    """SVCCA: mean canonical correlation after keeping each side's top singular directions that explain ``keep``
    of its variance. Like all CCA measures it is ≈ 1 for unrelated data when n ≤ d: use it only with n ≫ d."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep} must be in (0, 1]")
    x, y = _pair(X, Y)
    tx, ty = _top_directions(x, keep), _top_directions(y, keep)
    if tx.shape[1] == 0 or ty.shape[1] == 0:
        return float("nan")
    return float(cca_correlations(tx, ty).mean())


def _unit(x: np.ndarray) -> np.ndarray:
    x = _centre(x)
    norm = np.linalg.norm(x)
    return x / norm if norm > 0 else x


def procrustes_distance(X: Any, Y: Any, kind: str = "angular") -> float:
    """Orthogonal Procrustes distance of centred, unit-Frobenius X and Y: ``"angular"`` arccos ‖XᵀY‖_* (a metric,
    in radians, 0 iff Y is a rotation/reflection of X up to scale and shift) or ``"euclidean"`` sqrt(2 − 2‖XᵀY‖_*).
    X and Y may have different widths (the narrower is implicitly zero-padded)."""
    x, y = _pair(X, Y)
    nuc = float(np.linalg.svd(_unit(x).T @ _unit(y), compute_uv=False).sum())
    nuc = min(max(nuc, 0.0), 1.0)
    if kind == "angular":
        return float(np.arccos(nuc))
    if kind == "euclidean":
        return float(np.sqrt(max(0.0, 2.0 - 2.0 * nuc)))
    raise ValueError(f"kind={kind!r} is unknown; use 'angular' or 'euclidean'")


def procrustes_rotation(X: Any, Y: Any) -> np.ndarray:
    """The orthogonal R [d1, d2] minimising ‖X_c R − Y_c‖_F (``scipy.linalg.orthogonal_procrustes`` on centred
    data, the narrower side zero-padded): maps X's basis onto Y's, e.g. to compare two models' SAE decoders."""
    from scipy.linalg import orthogonal_procrustes

    x, y = _pair(X, Y)
    d1, d2 = x.shape[1], y.shape[1]
    d = max(d1, d2)
    xp = np.zeros((x.shape[0], d))
    yp = np.zeros((y.shape[0], d))
    xp[:, :d1], yp[:, :d2] = _centre(x), _centre(y)
    r, _ = orthogonal_procrustes(xp, yp)
    return r[:d1, :d2]


def rsa(X: Any, Y: Any, metric: str = "euclidean") -> float:
    """Spearman correlation of the upper triangles of the two dissimilarity matrices (``scipy.spatial.distance
    .pdist`` with ``metric``, e.g. "euclidean" or "correlation"). O(n²): subsample rows for large n."""
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    x, y = _pair(X, Y, 3)
    dx, dy = pdist(x, metric=metric), pdist(y, metric=metric)
    if np.ptp(dx) == 0 or np.ptp(dy) == 0:
        return float("nan")
    return float(spearmanr(dx, dy).statistic)


# ---- feature-level similarity ---------------------------------------------------------------------------
def correlation_matrix(A: Any, B: Any) -> np.ndarray:
    """Pearson correlation of every column of A [n, f1] with every column of B [n, f2]: [f1, f2]; NaN rows/columns
    for constant (e.g. never-active) features."""
    a, b = _pair(A, B)
    a, b = _centre(a), _centre(b)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a.T @ b) / np.outer(np.where(na > 0, na, np.nan), np.where(nb > 0, nb, np.nan))


def max_correlations(A: Any, B: Any) -> np.ndarray:
    """For each feature of A, its largest Pearson correlation with any feature of B: [f1] (NaN if constant)."""
    c = correlation_matrix(A, B)
    out = np.full(c.shape[0], np.nan)
    ok = ~np.all(np.isnan(c), axis=1)
    out[ok] = np.nanmax(c[ok], axis=1)
    return out


def mppc(A: Any, B: Any) -> float:
    """Mean over A's (non-constant) features of the max Pearson correlation with any of B's (Wang et al. 2024)."""
    m = max_correlations(A, B)
    return float(np.nanmean(m)) if np.isfinite(m).any() else float("nan")


def _assignment(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment

    return linear_sum_assignment(-c)


def matched_correlation(A: Any, B: Any) -> float:
    """Mean correlation of a one-to-one matching of A's and B's features maximising the total correlation
    (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``); penalises many-to-one matches that MPPC allows."""
    c = np.nan_to_num(correlation_matrix(A, B), nan=0.0)
    rows, cols = _assignment(c)
    return float(c[rows, cols].mean())


def match_features(A: Any, B: Any) -> np.ndarray:
    """A one-to-one map of A's features (columns of A [n, f1]) onto B's (B [n, f2]) maximising the total absolute
    Pearson correlation (Hungarian algorithm; the sign of a direction is arbitrary): [f1] indices into B's columns,
    -1 for the features of A left unmatched when f1 > f2. Li et al. 2015's bipartite matching of units across
    networks; it lets a set of A's dimensions (e.g. a sparse probe's support) be compared with a set of B's."""
    c = np.abs(np.nan_to_num(correlation_matrix(A, B), nan=0.0))
    rows, cols = _assignment(c)
    out = np.full(c.shape[0], -1, dtype=np.int64)
    out[rows] = cols
    return out


def mmcs(Da: Any, Db: Any, rotation: Any | None = None) -> float:
    """Mean max cosine similarity of dictionary directions: rows of Da [f1, d1] (mapped by ``rotation`` [d1, d2]
    first, e.g. :func:`procrustes_rotation` between the two models' activations, since two models' residual bases
    are unrelated) against rows of Db [f2, d2] (``sparse_autoencoder.metrics.mmcs``)."""
    import torch

    from mamba_interp.sparse_autoencoder.metrics import mmcs as _mmcs

    a = as_matrix(Da, "Da")
    if rotation is not None:
        a = a @ as_matrix(rotation, "rotation")
    return _mmcs(torch.from_numpy(a), torch.from_numpy(as_matrix(Db, "Db")))


def jaccard(a: Any, b: Any) -> float:
    """|a ∩ b| / |a ∪ b| of two collections (as sets); 1.0 for two empty sets."""
    sa, sb = set(a), set(b)
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


def random_jaccard_null(size_a: int, size_b: int, universe: int, n: int = 1000, seed: int = 0) -> np.ndarray:
    """Jaccard of ``n`` pairs of uniformly random subsets of sizes ``size_a`` and ``size_b`` of ``universe`` items."""
    if not 0 <= size_a <= universe or not 0 <= size_b <= universe:
        raise ValueError(f"set sizes {size_a}, {size_b} must lie in 0..universe={universe}")
    rng = np.random.default_rng(seed)
    return np.array([jaccard(rng.choice(universe, size_a, replace=False), rng.choice(universe, size_b, replace=False))
                     for _ in range(n)])


# ---- nulls and intervals -------------------------------------------------------------------------------
@dataclass(frozen=True)
class NullTest:
    """An observed similarity against samples of a null distribution (``kind`` says which)."""

    observed: float
    null: np.ndarray
    p_value: float
    kind: str

    def to_dict(self) -> dict[str, Any]:
        z = self.null[np.isfinite(self.null)]
        return {"observed": self.observed, "null_mean": float(z.mean()) if z.size else float("nan"),
                "null_sd": float(z.std()) if z.size else float("nan"),
                "null_q95": float(np.quantile(z, 0.95)) if z.size else float("nan"),
                "p_value": self.p_value, "n_null": int(z.size), "null": self.kind}


def null_test(observed: float, null: Any, kind: str, alternative: str = "greater") -> NullTest:
    """Wrap an observed value and null samples (p-value with the +1 correction)."""
    z = np.asarray(null, dtype=np.float64).reshape(-1)
    return NullTest(float(observed), z, permutation_pvalue(observed, z, alternative), kind)


def _permuted_rows(n: int, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    if groups is None:
        return rng.permutation(n)
    ids, counts = np.unique(groups, return_counts=True)
    if counts.min() != counts.max():  # unequal sequence lengths: positions cannot stay aligned
        return rng.permutation(n)
    order = np.argsort(groups, kind="stable").reshape(len(ids), -1)  # [sequences, positions]
    out = np.empty(n, dtype=np.int64)
    out[order.reshape(-1)] = order[rng.permutation(len(ids))].reshape(-1)
    return out


def permutation_test(measure: Measure, X: Any, Y: Any, n_permutations: int = 200, seed: int = 0,
                     groups: Any | None = None) -> NullTest:
    """``measure(X, Y)`` against ``measure(X, Y[π])``: π shuffles rows, or, with ``groups`` (a sequence id per row,
    equal-length sequences), whole sequences with positions kept aligned, so that shared positional structure is
    part of the null and only sequence-specific correspondence counts."""
    x, y = _pair(X, Y)
    g = None if groups is None else np.asarray(groups).reshape(-1)
    if g is not None and g.size != x.shape[0]:
        raise ValueError(f"groups has {g.size} entries for {x.shape[0]} rows")
    rng = np.random.default_rng(seed)
    null = [measure(x, y[_permuted_rows(x.shape[0], g, rng)]) for _ in range(n_permutations)]
    return null_test(measure(x, y), null, "sequence permutation" if g is not None else "row permutation")


def cka_permutation_test(X: Any, Y: Any, n_permutations: int = 200, seed: int = 0, groups: Any | None = None,
                         debiased: bool = True) -> NullTest:
    """:func:`permutation_test` of linear :func:`cka` (same permutations, same values), faster: re-pairing rows
    changes only the cross term, so the self-similarities and centring are computed once."""
    x, y = _pair(X, Y, 4 if debiased else 2)
    g = None if groups is None else np.asarray(groups).reshape(-1)
    if g is not None and g.size != x.shape[0]:
        raise ValueError(f"groups has {g.size} entries for {x.shape[0]} rows")
    x, y = _centre(x), _centre(y)
    xx, yy = _dot_similarity(x, x, debiased), _dot_similarity(y, y, debiased)
    if xx <= 0 or yy <= 0:
        nan = float("nan")
        return NullTest(nan, np.full(n_permutations, nan), nan, "row permutation" if g is None else
                        "sequence permutation")
    norm = np.sqrt(xx * yy)
    rng = np.random.default_rng(seed)
    null = [_dot_similarity(x, y[_permuted_rows(x.shape[0], g, rng)], debiased) / norm for _ in range(n_permutations)]
    return null_test(_dot_similarity(x, y, debiased) / norm, null,
                     "sequence permutation" if g is not None else "row permutation")


def random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal d×d matrix (``scipy.stats.ortho_group``; 1×1: ±1)."""
    from scipy.stats import ortho_group

    if d == 1:
        return np.array([[rng.choice([-1.0, 1.0])]])
    return ortho_group.rvs(d, random_state=rng)


def rotation_test(measure: Measure, X: Any, Y: Any, n_rotations: int = 50, seed: int = 0) -> NullTest:
    """``measure(X, Y)`` against ``measure(X, Y Q)`` for Haar-random rotations Q of Y's feature space (the
    centroid kept): a basis-aligned measure (MPPC of SAE features) exceeds this null only if the two models'
    features share their basis beyond what any rotation of the same subspace would give."""
    x, y = _pair(X, Y)
    mu = y.mean(0, keepdims=True)
    rng = np.random.default_rng(seed)
    null = [measure(x, (y - mu) @ random_rotation(y.shape[1], rng) + mu) for _ in range(n_rotations)]
    return null_test(measure(x, y), null, "random rotation")


def bootstrap_indices(fn: Callable[[np.ndarray], float], n: int, n_resamples: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> Estimate:
    """``fn(arange(n))`` with a percentile bootstrap CI of ``fn(idx)`` over index vectors resampled with replacement
    (``mamba_interp.stats.estimate`` over indices): for statistics that are not a mean of per-example values, such
    as a ratio of means or a similarity computed on the selected rows."""

    def stat(idx: np.ndarray, axis: int = -1) -> Any:
        idx = np.asarray(idx).astype(np.int64)
        return fn(idx) if idx.ndim == 1 else np.apply_along_axis(fn, axis, idx)

    return estimate(np.arange(n), stat, confidence, n_resamples, seed)


def bootstrap_by_group(measure: Measure, X: Any, Y: Any, groups: Any, n_resamples: int = 200, seed: int = 0,
                       confidence: float = 0.95) -> Estimate:
    """``measure(X, Y)`` with a percentile bootstrap CI that resamples whole groups (sequences) with replacement
    (``mamba_interp.stats.estimate`` over group indices)."""
    x, y = _pair(X, Y)
    g = np.asarray(groups).reshape(-1)
    if g.size != x.shape[0]:
        raise ValueError(f"groups has {g.size} entries for {x.shape[0]} rows")
    ids, inverse = np.unique(g, return_inverse=True)
    rows = [np.flatnonzero(inverse == i) for i in range(len(ids))]

    def one(idx: np.ndarray) -> float:
        take = np.concatenate([rows[int(i)] for i in idx])
        return measure(x[take], y[take])

    return bootstrap_indices(one, len(ids), n_resamples, seed, confidence)
