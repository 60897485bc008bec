"""The search of pipeline step 4: every probe of every variable at every layer and hook of a model.

Works on any ``HookedMamba`` and ``TaskBatch`` (e.g. companion models of other seeds or sizes)::

    from mamba_interp import zoo
    from mamba_interp.probing import probe_model

    model, task = zoo.load("induction-mamba1"), zoo.load_task("induction-mamba1")
    batch = task.sample(256, seed=0, split="test")
    report = probe_model(model, batch, layers=[0, 1], hooks=["resid_post", "x", "y"])
    report.best("answer")        # ProbeRecord: layer, hook, method, score with CI, k, support, selectivity
    report.best_table()          # {variable: {layer, hook, method, score, score_ci, k, support, selectivity}}

Rows (``variables.py``): the same tokens of a variable, split once by sequence into train and test
(``scores.split_indices``), serve every layer, hook and method.

Features. ``support`` and ``coef`` index the hook's activation flattened per token, as step 2 stores it: Mamba-2's
per-head hooks ``x``/``y`` [h, p] are flattened head-major (dimension = head · p + channel), ``B``/``C`` [g, n]
group-major. For those per-head hooks :func:`probe_model` also scores each head alone (``head_scores``).

Controls. Each probe is paired with the same probe fitted to Hewitt & Liang control labels typed by the current
token (``probes.control_labels``); selectivity = score − control score, with a paired bootstrap CI over the test
sequences.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mamba_interp.pipeline.activation_stats import ActivationSet, collect_activations
from mamba_interp.probing.probes import DEFAULT_KS, TASK_METHODS, fit_probe, selectivity, sparsity_curve
from mamba_interp.probing.scores import CLASSIFICATION, REGRESSION, split_indices, splits_both_ways
from mamba_interp.probing.variables import VariableData, prepare_variables
from mamba_interp.stats import Estimate

DEFAULT_METHODS = ("ksparse", "ridge")
"""Methods of the default search: the k-sparse probe and a dense ridge baseline (the L1 probes cost seconds per
fit on thousands of tokens; name them in ``methods`` to add them)."""
HEAD_HOOKS = ("x", "y")
"""Mamba-2 hooks shaped [h, p]: scored per head as well."""


def _est(e: Estimate | None) -> dict[str, Any] | None:
    return None if e is None else {"value": e.value, "ci": [e.ci_low, e.ci_high], "n": e.n}


def _unest(d: dict[str, Any] | None) -> Estimate | None:
    return None if d is None else Estimate(float(d["value"]), float(d["ci"][0]), float(d["ci"][1]), int(d["n"]))


# ---- records and the report ---------------------------------------------------------------------------
@dataclass
class ProbeRecord:
    """One probe of one variable at one (layer, hook). ``k`` = support size; ``coef`` as ``Probe.coef``."""

    variable: str
    layer: int
    hook: str
    method: str
    task: str
    score: Estimate
    k: int
    support: list[int]
    selectivity: Estimate | None = None
    control_score: float | None = None
    reg: dict[str, float] = field(default_factory=dict)
    coef: np.ndarray | None = field(default=None, repr=False)
    control_score_reselected: float | None = None
    """k-sparse only: the control probe that picks its own k dimensions for the control labels."""
    control_constant: bool = False
    """Every type drew the same control label: the control is a constant, scored at chance."""

    def to_dict(self) -> dict[str, Any]:
        return {"variable": self.variable, "layer": self.layer, "hook": self.hook, "method": self.method,
                "task": self.task, "score": self.score.value, "score_ci": [self.score.ci_low, self.score.ci_high],
                "n_sequences": self.score.n, "k": self.k, "support": list(self.support),
                "selectivity": None if self.selectivity is None else self.selectivity.value,
                "selectivity_ci": None if self.selectivity is None else list(self.selectivity.ci),
                "control_score": self.control_score, "control_score_reselected": self.control_score_reselected,
                "control_constant": self.control_constant, "reg": dict(self.reg)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], coef: np.ndarray | None = None) -> ProbeRecord:
        sel = None if d["selectivity"] is None else Estimate(d["selectivity"], *d["selectivity_ci"], d["n_sequences"])
        return cls(d["variable"], int(d["layer"]), d["hook"], d["method"], d["task"],
                   Estimate(d["score"], *d["score_ci"], d["n_sequences"]), int(d["k"]), [int(i) for i in d["support"]],
                   sel, d["control_score"], dict(d.get("reg", {})), coef, d.get("control_score_reselected"),
                   bool(d.get("control_constant", False)))


def _cell(variable: str, layer: int, hook: str) -> str:
    return f"{variable}|{layer}|{hook}"


@dataclass
class ProbeReport:
    """Every probe of a search. ``curves[(variable, layer, hook)]`` = {k: held-out score Estimate} of the k-sparse
    probes; ``head_scores[(variable, layer, hook)]`` = held-out score of a ridge probe on each head alone (Mamba-2
    per-head hooks); ``variables`` = what was probed (task, tokens, sequences, classes)."""

    records: list[ProbeRecord]
    curves: dict[tuple[str, int, str], dict[int, Estimate]] = field(default_factory=dict)
    head_scores: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: tuple[str, ...] = DEFAULT_METHODS
    k: int = 8
    skipped: dict[str, str] = field(default_factory=dict)
    """Variables that could not be probed, with the reason."""

    def for_variable(self, variable: str) -> list[ProbeRecord]:
        return [r for r in self.records if r.variable == variable]

    def best(self, variable: str) -> ProbeRecord:
        """The highest held-out score; ties (within 1e-9) go to the smaller support, then to the earlier method,
        layer and hook."""
        rows = self.for_variable(variable)
        if not rows:
            raise KeyError(f"no probe of {variable!r}; probed: {', '.join(self.variables)}")
        order = {m: i for i, m in enumerate(self.methods)}
        return min(rows, key=lambda r: (-round(r.score.value, 9), r.k, order.get(r.method, 99), r.layer))

    def best_table(self) -> dict[str, dict[str, Any]]:
        out = {}
        for v in self.variables:
            if self.for_variable(v):
                r = self.best(v)
                out[v] = {"layer": r.layer, "hook": r.hook, "method": r.method, "score": r.score.value,
                          "score_ci": list(r.score.ci), "k": r.k, "support": list(r.support),
                          "selectivity": None if r.selectivity is None else r.selectivity.value,
                          "selectivity_ci": None if r.selectivity is None else list(r.selectivity.ci),
                          "control_constant": r.control_constant}
        return out

    def support_overlap(self, variable: str, layer: int, hook: str) -> dict[str, float]:
        """Jaccard overlap of each method's top-k dimensions (by |weight|; k = the k-sparse probe's k) with the
        k-sparse probe's support, at one (layer, hook)."""
        rows = {r.method: r for r in self.records if (r.variable, r.layer, r.hook) == (variable, layer, hook)}
        ks = rows.get("ksparse")
        if ks is None:
            return {}
        ref = set(ks.support)
        out = {}
        for m, r in rows.items():
            if m == "ksparse" or r.coef is None:
                continue
            imp = np.sqrt((np.atleast_2d(r.coef) ** 2).sum(0))
            top = set(np.lexsort((np.arange(imp.size), -imp))[: len(ref)].tolist())
            out[m] = len(ref & top) / len(ref | top)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods), "k": self.k, "variables": self.variables,
            "records": [r.to_dict() for r in self.records],
            "curves": {_cell(*key): {str(k): _est(e) for k, e in c.items()} for key, c in self.curves.items()},
            "head_scores": {_cell(*key): v for key, v in self.head_scores.items()}, "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], coefs: dict[int, np.ndarray] | None = None) -> ProbeReport:
        """Rebuild (``coefs``: record index -> coef, e.g. from the step's ``coefficients.safetensors``)."""

        def key(s: str) -> tuple[str, int, str]:
            v, layer, hook = s.split("|")
            return v, int(layer), hook

        coefs = coefs or {}
        return cls(
            records=[ProbeRecord.from_dict(r, coefs.get(i)) for i, r in enumerate(d["records"])],
            curves={key(s): {int(k): _unest(e) for k, e in c.items()} for s, c in d["curves"].items()},
            head_scores={key(s): list(v) for s, v in d["head_scores"].items()},
            variables=d["variables"], methods=tuple(d["methods"]), k=int(d["k"]), skipped=dict(d.get("skipped", {})),
        )


# ---- the search --------------------------------------------------------------------------------------
UNIT_ALPHA = 1.0
"""Fixed ridge penalty of the per-unit probes (standardised features, ≤ p·n features per unit against hundreds of
tokens; one fit per unit instead of a cross-validated grid)."""


def unit_scores(X: np.ndarray, y: np.ndarray, units: Sequence[np.ndarray], groups: np.ndarray, seed: int = 0,
                split: tuple[np.ndarray, np.ndarray] | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """Held-out score of a ridge probe (penalty ``UNIT_ALPHA``) on each group of columns of ``X`` [N, d] alone (a
    channel's or a head's features) -> [len(units)], all on one split by ``groups``. ``rows``: the rows of ``X``
    that ``y`` and ``groups`` label (default all), taken one unit's columns at a time rather than copied whole."""
    split = split if split is not None else split_indices(len(y), groups, 0.25, seed)
    out = np.empty(len(units))
    for i, cols in enumerate(units):
        x = X[:, cols] if rows is None else X[np.ix_(rows, cols)]
        out[i] = fit_probe(x, y, "ridge", groups=groups, seed=seed, split=split, alphas=(UNIT_ALPHA,)).score
    return out


def _fit_cell(var: VariableData, layer: int, hook: str, x: np.ndarray, methods: Sequence[str], k: int,
              cv: int | None, ridge_cv: int | None, split: tuple[np.ndarray, np.ndarray], control: bool, seed: int,
              n_resamples: int) -> list[ProbeRecord]:
    """The probes of one variable at one (layer, hook), each with its control-task twin.

    The k-sparse probe's control is fitted on the probe's own k dimensions — the probe's claim is that *these*
    dimensions carry the variable, and the control asks whether a probe on them could as well memorise random
    labels of the current token — and the control that picks its own k dimensions is reported beside it
    (``control_score_reselected``). Other methods' controls use the same method on every dimension."""
    records = []
    has_control = control and np.unique(var.control).size > 1
    # a control that varies but is constant on one side of the split cannot be scored: no selectivity then
    usable_control = has_control and splits_both_ways(var.control, split)
    for method in methods:
        if method not in TASK_METHODS[var.task]:
            continue
        kw = dict(cv=ridge_cv if method == "ridge" else cv, groups=var.groups, seed=seed, task=var.task, split=split)
        probe = fit_probe(x, var.y, method, k=k, **kw)
        ctrl, reselected = None, None
        if usable_control and method == "ksparse":
            ctrl = fit_probe(x[:, probe.support], var.control, "ksparse", k=probe.k, **kw)
            reselected = fit_probe(x, var.control, "ksparse", k=k, **kw).score
        elif usable_control:
            ctrl = fit_probe(x, var.control, method, k=k, **kw)
        score = probe.score_estimate(n_resamples, seed)
        rec = ProbeRecord(var.name, layer, hook, method, var.task, score, int(probe.k),
                          [int(i) for i in probe.support], reg=dict(probe.reg), coef=probe.coef,
                          control_score_reselected=reselected)
        if ctrl is not None:
            rec.selectivity, rec.control_score = selectivity(probe, ctrl, n_resamples, seed), ctrl.score
        elif control and not has_control:  # every type drew the same control label: a constant, at chance
            chance = 0.5 if var.task == CLASSIFICATION else 0.0
            rec.control_score, rec.control_constant = chance, True
            rec.control_score_reselected = chance if method == "ksparse" else None
            rec.selectivity = Estimate(score.value - chance, score.ci_low - chance, score.ci_high - chance, score.n)
        records.append(rec)
    return records


def probe_model(model: Any, batch: Any, layers: Sequence[int], hooks: Sequence[str],
                variables: Sequence[str] | dict[str, VariableData] | None = None,
                methods: Sequence[str] = DEFAULT_METHODS, ks: Sequence[int] = DEFAULT_KS, k: int = 8,
                cv: int | None = 3, ridge_cv: int | None = None, seed: int = 0, max_tokens: int = 2000,
                max_classes: int = 16, min_count: int = 5, control: bool = True, curves: str = "best",
                acts: ActivationSet | None = None, batch_size: int = 64, n_resamples: int = 1000,
                progress: Callable[[Iterable], Iterable] | None = None, executor: Any = None) -> ProbeReport:
    """Fit ``methods`` (those that apply to each variable's task) with their control-task twins for every
    variable × layer × hook of ``model`` on ``batch``, and the sparsity curve (module docstring).

    ``variables``: names (default: every variable of the batch) or prepared :class:`VariableData`. ``acts``: the
    batch's activations if already collected (e.g. step 2's); else they are collected here. ``k``: the k-sparse
    probe's k (capped at the hook's width); ``ks``: the sparsity curve's k values, fitted at each variable's best
    (layer, hook) (``curves="best"``) or at every one (``"all"``); ``cv``: grouped folds for the ``*CV`` probes;
    ``ridge_cv``: the same for ``ridge``, whose default None picks the penalty by ``RidgeClassifierCV``'s
    efficient leave-one-out over tokens (one fit instead of folds × penalties; it ignores the sequence groups, but
    the score is still measured on held-out sequences); ``control``: fit the control-task probes (selectivity).
    ``executor``: fit the (variable, layer, hook) cells with ``executor.map`` (``pipeline/executor.py``; local or
    Ray, identical results); None fits them here one after another."""
    known = set(TASK_METHODS[CLASSIFICATION]) | set(TASK_METHODS[REGRESSION])
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"method {bad[0]!r} is unknown; use some of {', '.join(sorted(known))}")
    if curves not in ("best", "all"):
        raise ValueError(f"curves={curves!r} must be 'best' or 'all'")
    if acts is None or any((h, i) not in acts.acts for h in hooks for i in layers):
        acts = collect_activations(model, batch.tokens, layers, hooks, batch_size, attention_mask=batch.attention_mask)
    data = dict(variables) if isinstance(variables, dict) else prepare_variables(
        batch, acts.mask, variables, max_tokens, max_classes, min_count, seed)
    report = ProbeReport([], methods=tuple(methods), k=k, variables={n: v.summary() for n, v in data.items()})

    def curve(var: VariableData, layer: int, hook: str, x: np.ndarray) -> None:
        report.curves[(var.name, layer, hook)] = _curve(x, var, ks, seed, n_resamples)

    splits = {name: split_indices(len(v.y), v.groups, 0.25, seed) for name, v in data.items()}
    for name in list(data):
        if not splits_both_ways(data[name].y, splits[name]):
            report.skipped[name] = "one side of the held-out split has a single label; add sequences"
            del data[name], report.variables[name]
    cells = []
    for var, layer, hook in [(v, i, h) for v in data.values() for i in layers for h in hooks]:
        shape = acts.shapes[(hook, layer)]
        heads = tuple(shape) if model.cfg.arch == "mamba2" and hook in HEAD_HOOKS and len(shape) == 2 else None
        cells.append(ProbeCell(var, layer, hook, acts.only(hook, layer), tuple(methods), k, cv, ridge_cv,
                               splits[var.name], control, seed, n_resamples, tuple(ks) if curves == "all" else None,
                               heads))
    if executor is not None:  # independent cells: local or on Ray (pipeline/executor.py)
        results = executor.map(fit_cell, cells, desc="probes")
    else:
        results = [fit_cell(None, c) for c in (progress(cells) if progress is not None else cells)]
    for cell, (records, cell_curve, head_scores) in zip(cells, results):
        report.records += records
        if cell_curve is not None:
            report.curves[(cell.var.name, cell.layer, cell.hook)] = cell_curve
        if head_scores is not None:
            report.head_scores[(cell.var.name, cell.layer, cell.hook)] = head_scores
    if curves == "best":
        for var in data.values():
            if report.for_variable(var.name):
                b = report.best(var.name)
                curve(var, b.layer, b.hook, cell_features(acts, b.hook, b.layer, var))
    return report


def cell_features(acts: ActivationSet, hook: str, layer: int, var: VariableData) -> np.ndarray:
    """The activations of a variable's probed tokens [M, k] (float64), read in chunks from the activation store."""
    return acts.token_source(hook, layer).gather(torch.as_tensor(var.rows)).double().numpy()


def _curve(x: np.ndarray, var: VariableData, ks: Sequence[int], seed: int, n_resamples: int) -> dict:
    probes = sparsity_curve(x, var.y, ks, var.groups, seed, var.task)
    return {kq: p.score_estimate(n_resamples, seed) for kq, p in probes.items()}


@dataclass
class ProbeCell:
    """One unit of a probe sweep: a variable at one (layer, hook), with what :func:`fit_cell` needs to fit it on
    any worker (``ctx.executor.map``)."""

    var: VariableData
    layer: int
    hook: str
    acts: ActivationSet
    """The activations of this (hook, layer) only (``ActivationSet.only``)."""
    methods: tuple[str, ...]
    k: int
    cv: int | None
    ridge_cv: int | None
    split: tuple[np.ndarray, np.ndarray]
    control: bool
    seed: int
    n_resamples: int
    curve_ks: tuple[int, ...] | None
    """Also fit the sparsity curve at these k (``curves="all"``)."""
    heads: tuple[int, int] | None
    """(h, p) of a Mamba-2 head hook: also score each head alone."""


def fit_cell(worker: Any, cell: ProbeCell) -> tuple[list[ProbeRecord], dict | None, list[float] | None]:
    """The probes of one cell (records), its sparsity curve (``curve_ks``) and per-head scores (``heads``)."""
    var, x = cell.var, cell_features(cell.acts, cell.hook, cell.layer, cell.var)
    records = _fit_cell(var, cell.layer, cell.hook, x, cell.methods, min(cell.k, x.shape[1]), cell.cv, cell.ridge_cv,
                        cell.split, cell.control, cell.seed, cell.n_resamples)
    curve = _curve(x, var, cell.curve_ks, cell.seed, cell.n_resamples) if cell.curve_ks else None
    heads = None
    if cell.heads is not None:
        h, p = cell.heads
        units = [np.arange(i * p, (i + 1) * p) for i in range(h)]
        heads = unit_scores(x, var.y, units, var.groups, cell.seed, cell.split).tolist()
    return records, curve, heads

