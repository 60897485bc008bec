"""Linear probes of a variable from activations (scikit-learn estimators throughout), their sparsity curve, and
the Hewitt & Liang control task.

* :func:`fit_probe` — one probe of ``y`` from ``X`` [N, d]. The rows are split
  once into train and test by ``groups`` (the sequence of each token: tokens of one sequence are not independent,
  so a sequence is never on both sides of a split); the regularisation is chosen by grouped cross-validation on the
  training part (the ``*CV`` estimators) and the score is measured on the test part, which was used neither to fit
  nor to choose. Methods (features standardised on the training part first):

  ========== ===================================================== ===============================================
  method     regression (float target)                              classification (integer / bool target)
  ========== ===================================================== ===============================================
  ksparse    top-k dims by |Pearson r|, then least squares          top-k dims by ANOVA F of the class means (two
                                                                    classes: the squared t-statistic of the class
                                                                    mean difference), then L2 logistic regression
                                                                    with C = 1 (Gurnee et al. 2023, arXiv
                                                                    2305.01610, §3; their and SAEBench's setting)
  lasso      ``LassoCV``                                            — (use ``logistic_l1``)
  elasticnet ``ElasticNetCV`` (l1_ratio 0.5)                        ``LogisticRegressionCV``, l1_ratio 0.5, saga
  logistic_l1 — (use ``lasso``)                                     ``LogisticRegressionCV``, l1_ratio 1, liblinear
                                                                    (one-vs-rest for > 2 classes)
  ridge      ``RidgeCV``                                            ``RidgeClassifierCV``
  logistic   —                                                      ``LogisticRegressionCV``, l1_ratio 0, lbfgs
  ========== ===================================================== ===============================================

  Classifiers use balanced class weights. The score is the **balanced accuracy** for classification — for more than
  two classes, each class scored against the rest and averaged over the classes present in the test part, so chance
  is 0.5 for any number of classes — and **R²** for regression (chance 0).
* :func:`sparsity_curve` — held-out score of k-sparse probes against k (one ranking, one split).
* :func:`control_labels` and :func:`selectivity` — the control task of Hewitt & Liang (2019, arXiv 1909.03368, §3):
  every type (e.g. the token id) gets a fixed random label drawn from the empirical distribution of ``y``;
  selectivity = score(task) − score(control) on the same split, with a paired bootstrap CI over test groups.

Index letters: N = rows (tokens), d = features, K = classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mamba_interp.probing.scores import (
    CLASSIFICATION,
    REGRESSION,
    HeldOut,
    _group_bootstrap,
    _group_sums,
    _inner_folds,
    _score_from_sums,
    heldout_score,
    split_indices,
)
from mamba_interp.stats import Estimate

METHODS = ("ksparse", "lasso", "elasticnet", "logistic_l1", "ridge", "logistic")
TASK_METHODS = {
    REGRESSION: ("ksparse", "lasso", "elasticnet", "ridge"),
    CLASSIFICATION: ("ksparse", "elasticnet", "logistic_l1", "ridge", "logistic"),
}
DEFAULT_KS = (1, 2, 4, 8, 16, 32)
KSPARSE_C = 1.0
"""Inverse L2 strength of the logistic fit on the k selected dimensions (Gurnee et al. 2023; SAEBench)."""
CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""Inverse regularisation strengths the logistic ``*CV`` probes choose from (standardised features)."""
L1_CS = (1e-3, 1e-2, 1e-1, 1.0)
"""For ``logistic_l1`` (liblinear's L1 fits slow down sharply for C > 1, where they are barely sparse)."""
ALPHAS = (1e-1, 1.0, 10.0, 100.0, 1e3)
"""Ridge penalties ``RidgeCV`` / ``RidgeClassifierCV`` choose from."""
N_LASSO_ALPHAS = 20


# ---- probes ----------------------------------------------------------------------------------------
@dataclass
class Probe:
    """A fitted linear probe and its held-out score.

    ``coef``: weights on the standardised features, [d] (regression, two classes) or [K, d]; for ``ksparse`` zero
    outside the k selected dimensions. ``support``: sorted indices of the dimensions with a nonzero weight (for any
    class); exactly k for ``ksparse``. ``score``: held-out balanced accuracy or R² (see the module docstring).
    ``reg``: the regularisation chosen by cross-validation (``{"C": ...}`` or ``{"alpha": ...}``).
    """

    method: str
    task: str
    score: float
    coef: np.ndarray
    support: np.ndarray
    classes: np.ndarray | None = None
    k: int | None = None
    reg: dict[str, float] = field(default_factory=dict)
    n_train: int = 0
    n_test: int = 0
    estimator: Any = field(default=None, repr=False)
    scaler: Any = field(default=None, repr=False)
    dims: np.ndarray | None = field(default=None, repr=False)
    heldout: HeldOut | None = field(default=None, repr=False)

    @property
    def importance(self) -> np.ndarray:
        """[d] |weight| per dimension (L2 norm over classes)."""
        c = np.atleast_2d(self.coef)
        return np.sqrt((c ** 2).sum(0))

    def top_dims(self, k: int) -> np.ndarray:
        """The k dimensions with the largest |weight| (ties: lower index), sorted."""
        order = np.lexsort((np.arange(self.importance.size), -self.importance))
        return np.sort(order[:k])

    def predict(self, X: Any) -> np.ndarray:
        """Class labels or values for rows of ``X`` [N, d]."""
        x = self.scaler.transform(_as_numpy(X))
        return self.estimator.predict(x if self.dims is None else x[:, self.dims])

    @property
    def n_test_groups(self) -> int:
        return 0 if self.heldout is None else int(np.unique(self.heldout.groups).size)

    def score_estimate(self, n_resamples: int = 1000, seed: int = 0) -> Estimate:
        """The held-out score with a bootstrap CI over test groups (sequences)."""
        if self.heldout is None:
            raise ValueError("this probe has no held-out predictions to resample")
        sums, _ = _group_sums(self.heldout, self.task)
        return _group_bootstrap(sums, lambda t: _score_from_sums(t, self.task), n_resamples, seed)

    def to_dict(self, coef: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method, "task": self.task, "score": self.score, "k": self.k,
            "support": [int(i) for i in self.support], "reg": dict(self.reg), "n_train": self.n_train,
            "n_test": self.n_test, "n_test_groups": self.n_test_groups,
        }
        if self.classes is not None:
            out["classes"] = [c.item() if hasattr(c, "item") else c for c in self.classes]
        if coef:
            out["coef"] = self.coef.tolist()
        return out


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def infer_task(y: np.ndarray) -> str:
    """Classification for integer or bool labels, regression for floats."""
    return CLASSIFICATION if (y.dtype.kind in "biu") else REGRESSION


def _labels(y: Any, task: str | None) -> tuple[np.ndarray, str]:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    task = task or infer_task(y)
    if task not in (CLASSIFICATION, REGRESSION):
        raise ValueError(f"task={task!r} is unknown; use {CLASSIFICATION!r} or {REGRESSION!r}")
    if not np.all(np.isfinite(y.astype(np.float64))):
        raise ValueError("y has NaN or infinite entries; keep only the rows where the variable is defined")
    if task == REGRESSION:
        y = y.astype(np.float64)
    elif y.dtype.kind == "f":
        if not np.all(y == np.round(y)):
            raise ValueError("classification labels must be integers; pass task='regression' for a numeric target")
        y = y.astype(np.int64)
    return y, task


def _rank(x: np.ndarray, y: np.ndarray, task: str) -> np.ndarray:
    """Dimensions from most to least related to ``y`` (ANOVA F of the class means, or |Pearson r|); ties and
    constant dimensions (score 0) by index."""
    from sklearn.feature_selection import f_classif, r_regression

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # constant features: sklearn warns and returns NaN
        score = f_classif(x, y)[0] if task == CLASSIFICATION else np.abs(r_regression(x, y))
    score = np.nan_to_num(score, nan=0.0, posinf=np.finfo(np.float64).max)
    return np.lexsort((np.arange(score.size), -score))


def _estimator(method: str, task: str, n_classes: int, folds: list | None, seed: int,
               alphas: Sequence[float] = ()) -> Any:
    from sklearn import linear_model as lm
    from sklearn.multiclass import OneVsRestClassifier

    if method not in TASK_METHODS[task]:
        alt = {"lasso": "logistic_l1", "logistic_l1": "lasso", "logistic": "ridge"}.get(method)
        hint = f"; use {alt!r}" if alt in TASK_METHODS[task] else ""
        raise ValueError(f"method {method!r} does not fit a {task} target{hint}")
    logistic = dict(Cs=list(L1_CS if method == "logistic_l1" else CS), cv=folds, class_weight="balanced",
                    scoring="balanced_accuracy", use_legacy_attributes=False, random_state=seed, max_iter=300)
    if task == REGRESSION:
        if method == "lasso":
            return lm.LassoCV(alphas=N_LASSO_ALPHAS, cv=folds, random_state=seed, max_iter=2000)
        if method == "elasticnet":
            return lm.ElasticNetCV(l1_ratio=0.5, alphas=N_LASSO_ALPHAS, cv=folds, random_state=seed, max_iter=2000)
        return lm.RidgeCV(alphas=list(alphas or ALPHAS), cv=folds)
    if method == "ridge":
        return lm.RidgeClassifierCV(alphas=list(alphas or ALPHAS), cv=folds, class_weight="balanced")
    if method == "logistic":
        return lm.LogisticRegressionCV(l1_ratios=(0.0,), solver="lbfgs", **logistic)
    if method == "elasticnet":
        return lm.LogisticRegressionCV(l1_ratios=(0.5,), solver="saga", **logistic)
    l1 = lm.LogisticRegressionCV(l1_ratios=(1.0,), solver="liblinear", **logistic)
    return l1 if n_classes <= 2 else OneVsRestClassifier(l1)


def _coef_and_reg(est: Any) -> tuple[np.ndarray, dict[str, float]]:
    if hasattr(est, "estimators_"):  # one-vs-rest of binary CV probes
        coef = np.concatenate([np.atleast_2d(e.coef_) for e in est.estimators_])
        return coef, {"C": float(np.median([np.ravel(e.C_)[0] for e in est.estimators_]))}
    coef = np.asarray(est.coef_, dtype=np.float64)
    if hasattr(est, "C_"):
        return coef, {"C": float(np.ravel(est.C_)[0])}
    if hasattr(est, "alpha_"):
        return coef, {"alpha": float(est.alpha_)}
    return coef, {}


def fit_probe(X: Any, y: Any, method: str = "ksparse", k: int | None = None, cv: int | None = 5,
              groups: Any = None, seed: int = 0, task: str | None = None, test_size: float = 0.25,
              split: tuple[np.ndarray, np.ndarray] | None = None, ranking: np.ndarray | None = None,
              alphas: Sequence[float] = ALPHAS) -> Probe:
    """Fit one probe of ``y`` [N] from ``X`` [N, d] and score it on held-out groups (module docstring).

    ``k``: dimensions kept by ``ksparse`` (default min(8, d)). ``groups`` [N]: e.g. the sequence of each token.
    ``cv``: grouped cross-validation folds for choosing the regularisation; None leaves it to the estimator
    (``ridge``: ``RidgeCV``'s efficient leave-one-out over rows, which ignores the groups; the others: sklearn's
    5-fold). The score is on the held-out groups either way.
    ``split``: given (train, test) row indices instead of :func:`split_indices` (``test_size``, ``seed``).
    ``ranking``: a precomputed dimension order for ``ksparse`` (from the same training rows; :func:`sparsity_curve`
    passes it so every k shares one ranking). ``alphas``: the ``ridge`` penalties to choose from (one value: no
    cross-validation).
    """
    from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge, RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}")
    x = _as_numpy(X)
    if x.ndim != 2:
        raise ValueError(f"X must be [N, d], got shape {x.shape}")
    y, task = _labels(y, task)
    if y.shape != (x.shape[0],):
        raise ValueError(f"y has shape {y.shape}, expected ({x.shape[0]},)")
    g = np.arange(len(y)) if groups is None else _as_numpy(groups).astype(np.int64)
    train, test = split if split is not None else split_indices(len(y), g, test_size, seed)
    scaler = StandardScaler().fit(x[train])
    xtr, xte = scaler.transform(x[train]), scaler.transform(x[test])
    ytr, yte = y[train], y[test]
    classes = np.unique(ytr) if task == CLASSIFICATION else None
    if task == CLASSIFICATION and (classes.size < 2 or np.unique(yte).size < 2):
        raise ValueError("the probe needs at least two classes in both the training and the test part")
    d = x.shape[1]
    dims = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and small-class warnings: the CV keeps the best setting
        if method == "ksparse":
            k = min(8, d) if k is None else int(k)
            if not 1 <= k <= d:
                raise ValueError(f"k={k} must be between 1 and the number of dimensions ({d})")
            order = _rank(xtr, ytr, task) if ranking is None else np.asarray(ranking)
            dims = np.sort(order[:k])
            est = (LogisticRegression(C=KSPARSE_C, class_weight="balanced", max_iter=1000, random_state=seed)
                   if task == CLASSIFICATION else LinearRegression())
            est.fit(xtr[:, dims], ytr)
            small = np.atleast_2d(est.coef_)
            coef = np.zeros((small.shape[0], d))
            coef[:, dims] = small
            reg = {"C": KSPARSE_C} if task == CLASSIFICATION else {}
        elif method == "ridge" and len(alphas) == 1:  # a fixed penalty: nothing to cross-validate
            est = (RidgeClassifier(alpha=float(alphas[0]), class_weight="balanced") if task == CLASSIFICATION
                   else Ridge(alpha=float(alphas[0]))).fit(xtr, ytr)
            coef, reg = np.atleast_2d(est.coef_).astype(np.float64), {"alpha": float(alphas[0])}
        else:
            folds = None if cv is None else _inner_folds(ytr, g[train], cv, task, seed)
            est = _estimator(method, task, 0 if classes is None else classes.size, folds, seed, alphas)
            est.fit(xtr, ytr)
            coef, reg = _coef_and_reg(est)
    pred = est.predict(xte if dims is None else xte[:, dims])
    coef = coef.reshape(-1) if coef.ndim == 2 and coef.shape[0] == 1 else coef
    support = np.flatnonzero(np.atleast_2d(coef).any(0)) if method != "ksparse" else dims
    held = HeldOut(yte, np.asarray(pred), g[test])
    return Probe(method=method, task=task, score=heldout_score(yte, pred, task), coef=coef, support=support,
                 classes=classes, k=int(support.size), reg=reg, n_train=len(train), n_test=len(test),
                 estimator=est, scaler=scaler, dims=dims, heldout=held)


def sparsity_curve(X: Any, y: Any, ks: Sequence[int] = DEFAULT_KS, groups: Any = None, seed: int = 0,
                   task: str | None = None, test_size: float = 0.25) -> dict[int, Probe]:
    """k-sparse probes for every k of ``ks`` (those ≤ d) on one split and one ranking: {k: Probe}."""
    from sklearn.preprocessing import StandardScaler

    x = _as_numpy(X)
    yy, task = _labels(y, task)
    g = np.arange(len(yy)) if groups is None else _as_numpy(groups).astype(np.int64)
    split = split_indices(len(yy), g, test_size, seed)
    xtr = StandardScaler().fit_transform(x[split[0]])
    ranking = _rank(xtr, yy[split[0]], task)
    return {int(k): fit_probe(x, yy, "ksparse", k=int(k), groups=g, seed=seed, task=task, split=split,
                              ranking=ranking)
            for k in sorted(set(ks)) if 1 <= k <= x.shape[1]}


# ---- controls ----------------------------------------------------------------------------------------
def control_labels(y: Any, types: Any, seed: int = 0) -> np.ndarray:
    """Hewitt & Liang's control task: each distinct type (e.g. the current token id) gets one random label drawn
    from the empirical distribution of ``y``; every row inherits its type's label. Same shape and dtype as ``y``."""
    yy = np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y)
    tt = np.asarray(types.detach().cpu().numpy() if isinstance(types, torch.Tensor) else types)
    if yy.shape != tt.shape or yy.ndim != 1:
        raise ValueError(f"y and types must be 1-D of the same length, got {yy.shape} and {tt.shape}")
    uniq, inv = np.unique(tt, return_inverse=True)
    rng = np.random.default_rng(seed)
    return rng.choice(yy, size=uniq.size, replace=True)[inv].astype(yy.dtype)


def selectivity(probe: Probe, control: Probe, n_resamples: int = 1000, seed: int = 0) -> Estimate:
    """score(probe) − score(control) with a paired bootstrap CI over their common test groups."""
    a, b = probe.heldout, control.heldout
    if a is None or b is None or not np.array_equal(a.groups, b.groups):
        raise ValueError("selectivity needs a probe and a control probe fitted on the same split (same groups, seed)")
    sa, _ = _group_sums(a, probe.task)
    sb, _ = _group_sums(b, control.task)
    m = sa.shape[1]

    def reduce(t: np.ndarray) -> np.ndarray:
        return _score_from_sums(t[..., :m], probe.task) - _score_from_sums(t[..., m:], control.task)

    return _group_bootstrap(np.concatenate([sa, sb], axis=1), reduce, n_resamples, seed)

