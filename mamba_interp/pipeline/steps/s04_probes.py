"""Step 4 (probes): which dimensions of which layer and hook carry each ground-truth variable, and does the model
use them.

For every analysed layer and every hook of step 2 (``state_norm`` is replaced by the state probes below) and every
ground-truth variable of ``pipeline/task_variables.py`` (a language model: token, previous token and position on the
primary prompts, plus the IOI / factual-recall variables of step 1's other prompt sets, named ``ioi:is_io`` etc.),
``mamba_interp.probing.probe_model`` fits the k-sparse probe (Gurnee et al. 2023) and the dense ridge
baseline (more methods with the ``methods`` option), each with a Hewitt & Liang (2019) control task typed by the
current token, scores them on held-out sequences with bootstrap CIs over sequences, and traces the sparsity curve
of each variable's best probe. Then:

* **state probes** (``probe_states``): the per-token SSM state h_t of each layer, read through ``hook_ssm_state``
  one layer at a time at the probed tokens only, for the stored variables (``state_variables``): which channels
  (Mamba-1) or heads (Mamba-2) hold them, confirmed on held-out sequences against random units;
* **amnesic test** (``amnesic_test``): for each variable's best probe, LEACE erasure of the variable at that
  (layer, hook), applied at the tokens where it is defined while the model runs on step 1's held-out sequences,
  against erasing the same variable's labels permuted (same rank, a concept the model cannot use).

Outputs: ``probes.json`` (every probe, the curves, per-head scores, state probes, amnesic tests) and
``coefficients.safetensors`` (each probe's weights, key = its index in ``probes.json``'s records). Figures are drawn
by step 16 (probe_report).

Data for later steps (``ctx.data(4)``): ``report`` (a ``ProbeReport``), ``best`` (variable -> layer, hook, method,
score, score_ci, k, support, selectivity; ``support`` indexes the hook's flattened features, Mamba-2 per-head
hooks head-major as h·p), ``state_probes`` (variable -> layer -> channel_importance, top: channel indices for
Mamba-1, head indices for Mamba-2), ``amnesic`` (variable -> ``AmnesicTest.to_dict()``). ``load`` rebuilds them on
``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mamba_interp.pipeline.activation_stats import STATE_NORM
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import StepSkipped, register_step
from mamba_interp.pipeline.steps.s03_sae import (
    SAE_HOOKS,
    _check_optional_positive_int,
    _tuple_of,
)

PROBES_FILE = "probes.json"
COEF_FILE = "coefficients"
STATE_VARIABLES = ("stored_value", "a", "b")
"""Variables held in the state for later use (induction's stored value, modular addition's operands)."""
STATE_FALLBACK = ("prev_token",)
"""Probed in the state when the data has none of ``state_variables`` (every model carries the previous token)."""
GENERIC = ("token", "prev_token", "position")


@dataclass(frozen=True)
class Options:
    """What is probed, with which probes, on how many tokens."""

    variables: tuple[str, ...] | None = None
    """Variables to probe; None: every variable of the primary dataset (and the other prompt sets' own)."""
    hooks: tuple[str, ...] | None = None
    """Hooks (of step 2's); None: all that step 2 collected except ``state_norm``."""
    methods: tuple[str, ...] = ("ksparse", "ridge")
    """Of ksparse, ridge, logistic, logistic_l1, elasticnet, lasso; each applies to its targets (lasso to numeric,
    logistic* to categorical ones). The L1 classifiers cost seconds per fit on thousands of tokens."""
    k: int = 8
    """The k-sparse probe's k."""
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """The sparsity curve's k values (at each variable's best layer and hook; ``curves: all`` for every one)."""
    curves: str = "best"
    cv: int = 3
    """Grouped cross-validation folds of the ``*CV`` probes."""
    ridge_cv: int | None = None
    """Folds for ridge's penalty; None: efficient leave-one-out (one fit; see ``probe_model``)."""
    max_tokens: int = 2000
    """Probed tokens per variable (class-balanced subsample; see ``probing/variables.py``)."""
    max_classes: int = 16
    min_count: int = 5
    state_variables: tuple[str, ...] = STATE_VARIABLES
    """Variables the state probes look for (those the dataset has; none: the previous token)."""
    state_max_tokens: int = 2000
    state_top: int = 8
    """Units (channels / heads) in the confirmed top set."""
    state_random: int = 5
    """Random unit sets the top set is compared with."""
    amnesic: bool = True
    amnesic_sequences: int = 128
    """Held-out sequences the amnesic tests run on (each test is two forward passes over them)."""
    amnesic_tokens: int | None = 8192
    """...and at most this many tokens of them (``pipeline.datasets.budget_sequences``: never fewer than 16
    sequences; None: no token cap). The default model's 64-token sequences are capped by the count (128 sequences),
    256-token corpus windows by the tokens (32 sequences)."""
    n_resamples: int = 1000

    def __post_init__(self) -> None:
        from mamba_interp.probing import METHODS

        if self.variables is not None:
            object.__setattr__(self, "variables", _tuple_of(self.variables, "variables", str))
        if self.hooks is not None:
            hooks = _tuple_of(self.hooks, "hooks", str)
            bad = [h for h in hooks if h not in SAE_HOOKS]
            if not hooks or bad:
                raise ValueError(f"hooks={self.hooks!r} must name activation hooks from {', '.join(SAE_HOOKS)}")
            object.__setattr__(self, "hooks", tuple(dict.fromkeys(hooks)))
        methods = _tuple_of(self.methods, "methods", str)
        bad = [m for m in methods if m not in METHODS]
        if not methods or bad:
            raise ValueError(f"methods={self.methods!r} must be some of {', '.join(METHODS)}")
        object.__setattr__(self, "methods", tuple(dict.fromkeys(methods)))
        ks = _tuple_of(self.ks, "ks", int)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks={self.ks!r} must be positive integers")
        object.__setattr__(self, "ks", tuple(sorted(set(ks))))
        object.__setattr__(self, "state_variables", _tuple_of(self.state_variables, "state_variables", str))
        for name in ("k", "max_tokens", "max_classes", "min_count", "state_max_tokens", "state_top", "n_resamples",
                     "amnesic_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        _check_optional_positive_int("amnesic_tokens", self.amnesic_tokens)
        if not isinstance(self.cv, int) or isinstance(self.cv, bool) or self.cv < 2:
            raise ValueError(f"cv={self.cv!r} must be an integer >= 2")
        if self.ridge_cv is not None and (not isinstance(self.ridge_cv, int) or self.ridge_cv < 2):
            raise ValueError(f"ridge_cv={self.ridge_cv!r} must be an integer >= 2 or null (leave-one-out)")
        if not isinstance(self.state_random, int) or self.state_random < 1:
            raise ValueError(f"state_random={self.state_random!r} must be a positive integer")
        if self.curves not in ("best", "all"):
            raise ValueError(f"curves={self.curves!r} must be 'best' or 'all'")
        if not isinstance(self.amnesic, bool):
            raise ValueError(f"amnesic={self.amnesic!r} must be true or false")


# ---- resume ------------------------------------------------------------------------------------------
def _data(report: Any, states: dict, amnesic: dict) -> dict[str, Any]:
    best = report.best_table()
    state_probes = {v: {int(i): {"channel_importance": sp.importance, "top": sp.top, "unit": sp.unit}
                        for i, sp in by_layer.items()} for v, by_layer in states.items() if by_layer}
    return {"report": report, "best": best, "state_probes": state_probes, "state_details": states,
            "amnesic": amnesic}


def load(ctx: StepContext) -> dict:
    """Rebuild the report, the state probes and the amnesic tests from ``probes.json`` and the coefficients."""
    from safetensors.torch import load_file

    from mamba_interp.probing import ProbeReport, StateProbe

    saved = json.loads((ctx.out_dir / PROBES_FILE).read_text())
    coefs = {int(k): v.double().numpy() for k, v in load_file(str(ctx.out_dir / f"{COEF_FILE}.safetensors")).items()}
    report = ProbeReport.from_dict(saved["report"], coefs)
    states = {v: {int(i): StateProbe.from_dict(sp) for i, sp in by_layer.items()}
              for v, by_layer in saved["state_probes"].items()}
    return _data(report, states, saved["amnesic"])


# ---- the step ----------------------------------------------------------------------------------------
def _prefixed(data: dict, prefix: str) -> dict:
    return {f"{prefix}:{n}": dataclasses.replace(v, name=f"{prefix}:{n}") for n, v in data.items()}


@register_step(4, "probes", requires=(1, 2), title="Sparse probes, control tasks, state probes and amnesic tests",
               options=Options, load=load, version=1)
def run(ctx: StepContext) -> StepResult:
    from mamba_interp.pipeline.memory_plan import collection_batch
    from mamba_interp.probing import prepare_variables, probe_model, probe_states

    opts: Options = ctx.options or Options()
    ds, acts = ctx.data(1), ctx.data(2)["activations"]
    batch = ds["batch"]
    hooks = opts.hooks or tuple(h for h in acts.hooks if h != STATE_NORM)
    if not hooks:
        raise StepSkipped("step 2 collected only state_norm; collect activation hooks (e.g. --hooks resid_post,x,y)")
    if ctx.model.cfg.arch == "mamba2" and "dt_low" in hooks:
        raise ValueError("hook 'dt_low' does not exist in Mamba-2; remove it from the probes hooks")
    seed = ctx.seed % 2**31
    kw = dict(max_tokens=opts.max_tokens, max_classes=opts.max_classes, min_count=opts.min_count, seed=seed)
    wanted = None if opts.variables is None else [v for v in opts.variables if ":" not in v]
    data = prepare_variables(batch, acts.mask, wanted, **kw)
    if opts.variables is not None:
        missing = [v for v in wanted if v not in data]
        if missing:
            raise ValueError(f"probes variable {missing[0]!r} is not defined (or constant) on the {ds['primary']} "
                             f"data; it has {', '.join(data) or 'none'}")
    search = dict(methods=opts.methods, ks=opts.ks, k=opts.k, cv=opts.cv, ridge_cv=opts.ridge_cv, seed=seed,
                  curves=opts.curves, batch_size=ctx.batch_size, n_resamples=opts.n_resamples)
    sets = {ds["primary"]: (batch, acts, data)}
    for name, other in ds["sets"].items():  # language models: IOI / factual recall prompts, their own variables
        if name == ds["primary"]:
            continue
        own = prepare_variables(other, None, None, **kw)
        own = {n: v for n, v in own.items() if n not in GENERIC}
        own = _prefixed(own, name)
        if opts.variables is not None:
            own = {n: v for n, v in own.items() if n in opts.variables}
        if own:
            sets[name] = (other, None, own)
    found = {n for _, _, d in sets.values() for n in d}
    absent = [v for v in (opts.variables or ()) if ":" in v and v not in found]
    if absent:
        raise ValueError(f"probes variable {absent[0]!r} is not defined on the prompt sets; they have "
                         f"{', '.join(sorted(n for n in found if ':' in n)) or 'none'}")
    if not any(d for _, _, d in sets.values()):
        raise StepSkipped("no ground-truth variable varies on the datasets (nothing to probe)")
    report = None
    for name, (b, a, d) in sets.items():
        part = probe_model(ctx.model, b, ctx.layers, hooks, variables=d, acts=a, executor=ctx.executor, **search)
        if report is None:
            report = part
        else:
            report.records += part.records
            report.curves.update(part.curves)
            report.head_scores.update(part.head_scores)
            report.variables.update(part.variables)
            report.skipped.update(part.skipped)

    stored = [n for n in opts.state_variables if n in data] or [n for n in STATE_FALLBACK if n in data]
    state_vars = prepare_variables(batch, acts.mask, stored, max_tokens=opts.state_max_tokens,
                                   max_classes=opts.max_classes, min_count=opts.min_count, seed=seed)
    # hook_ssm_state materialises [b, l, state] tensors: as many sequences per pass as step 2 runs with state_norm
    state_batch = collection_batch(ctx.model.cfg, batch.tokens.shape[1], (STATE_NORM,), ctx.batch_size)
    states = probe_states(ctx.model, batch, ctx.layers, state_vars, top=opts.state_top, n_random=opts.state_random,
                          seed=seed, batch_size=state_batch, mask=acts.mask,
                          progress=lambda it: ctx.progress(it, desc="state probes"))
    amnesic = _amnesic(ctx, opts, ds, sets, report, kw) if opts.amnesic else {}

    state_json = {v: {str(i): sp.to_dict() for i, sp in by_layer.items()} for v, by_layer in states.items()}
    ctx.save_json(PROBES_FILE, {"report": report.to_dict(), "state_probes": state_json, "amnesic": amnesic})
    ctx.save_tensors(COEF_FILE, {str(i): torch.as_tensor(np.asarray(r.coef, dtype=np.float32))
                                 for i, r in enumerate(report.records) if r.coef is not None})
    data_out = _data(report, states, amnesic)
    metrics = _metrics(report, data_out, amnesic, hooks, ctx)
    return StepResult(metrics=metrics, reading=_reading(report, data_out, amnesic, ctx.model.cfg.arch),
                      data=data_out)


def _amnesic(ctx: StepContext, opts: Options, ds: dict, sets: dict, report: Any, kw: dict) -> dict[str, dict]:
    """The amnesic test of every variable's best probe: fitted on the probed tokens, evaluated on the first
    ``amnesic_sequences`` (at most ``amnesic_tokens`` tokens) of step 1's held-out sequences (the prompt set itself
    for the other prompt sets, and for finite tasks, whose held-out sample repeats the test split)."""
    from mamba_interp.pipeline.datasets import budget_sequences
    from mamba_interp.pipeline.sae_support import layer_inputs
    from mamba_interp.probing import amnesic_test, prepare_variables, run_model
    from mamba_interp.probing.search import cell_features

    heldout = ds.get("heldout")
    out: dict[str, dict] = {}
    for name, (b, a, d) in sets.items():
        own = heldout is not None and name == ds["primary"] and not getattr(ds.get("task"), "finite", False)
        pool = heldout if own else b
        ev = pool.select(slice(0, budget_sequences(opts.amnesic_sequences, opts.amnesic_tokens, pool.tokens.shape[1],
                                                   len(pool))))
        ev_vars = prepare_variables(ev, None, [n.split(":")[-1] for n in d], **kw)
        tests = [(v, var, report.best(v)) for v, var in d.items()
                 if v.split(":")[-1] in ev_vars and report.for_variable(v)]
        if not tests:
            continue
        # every pass starts at the erased layer from the cached residual stream entering it (the blocks before are
        # the clean model's); one layer's cache at a time, the tests taken in layer order
        tests.sort(key=lambda t: t[2].layer)
        start = (tests[0][2].layer, layer_inputs(ctx.model, ev, tests[0][2].layer, ctx.batch_size))
        clean = run_model(ctx.model, ev, ctx.batch_size, start=start)
        done: dict[str, dict] = {}
        for var_name, var, best in ctx.progress(tests, desc="amnesic tests"):
            if best.layer != start[0]:
                start = None  # free the previous layer's cache first
                start = (best.layer, layer_inputs(ctx.model, ev, best.layer, ctx.batch_size))
            acts = a if a is not None else _collect(ctx, b, best.layer, best.hook)
            x = torch.from_numpy(cell_features(acts, best.hook, best.layer, var)).float()
            positions = ev_vars[var_name.split(":")[-1]].positions
            test = amnesic_test(ctx.model, x, var.y, best.layer, best.hook, ev, positions, task=var.task,
                                variable=var_name, batch_size=ctx.batch_size, seed=kw["seed"],
                                n_resamples=opts.n_resamples, clean=clean, start=start)
            done[var_name] = {**test.to_dict(), "eval": "heldout" if own else name, "eval_sequences": len(ev)}
        out.update((v, done[v]) for v in d if v in done)  # the variables' order, not the layers'
    return out


def _collect(ctx: StepContext, batch: Any, layer: int, hook: str):
    from mamba_interp.pipeline.activation_stats import collect_activations

    return collect_activations(ctx.model, batch.tokens, [layer], [hook], ctx.batch_size,
                               attention_mask=batch.attention_mask)


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def _metrics(report: Any, data: dict, amnesic: dict, hooks: tuple, ctx: StepContext) -> dict[str, Any]:
    best = {}
    for v, b in data["best"].items():
        row = dict(b)
        if v in amnesic:
            row["amnesic_accuracy_change"] = amnesic[v]["erased"]["accuracy_change"]
            row["amnesic_control_accuracy_change"] = amnesic[v]["control"]["accuracy_change"]
        best[v] = row
    cells: dict[str, dict[str, dict]] = {}
    for v in report.variables:
        rows = report.for_variable(v)
        for key in dict.fromkeys((r.layer, r.hook) for r in rows):
            here = [r for r in rows if (r.layer, r.hook) == key]
            top = min(here, key=lambda r: (-r.score.value, r.k))
            cell = {"method": top.method, "score": _r(top.score.value), "score_ci": [_r(c) for c in top.score.ci],
                    "selectivity": None if top.selectivity is None else _r(top.selectivity.value),
                    "selectivity_ci": None if top.selectivity is None else [_r(c) for c in top.selectivity.ci],
                    "k": top.k, "support": top.support if top.k <= 32 else f"{top.k} dims (dense)",
                    "scores": {r.method: _r(r.score.value) for r in here}}
            am = amnesic.get(v)
            if am is not None and (am["layer"], am["hook"]) == key:
                cell["amnesic_accuracy_change"] = am["erased"]["accuracy_change"]
                cell["amnesic_control_accuracy_change"] = am["control"]["accuracy_change"]
            cells.setdefault(v, {})[f"L{key[0]}.{key[1]}"] = cell
    states = {v: {str(i): {"unit": sp.unit, "top": sp.top, "top_score": sp.top_score.value,
                           "top_score_ci": list(sp.top_score.ci), "random_mean": float(np.mean(sp.random_scores)),
                           "random_max": float(np.max(sp.random_scores))} for i, sp in by_layer.items()}
              for v, by_layer in data["state_details"].items() if by_layer}
    return {"best": best, "variables": report.variables, "methods": list(report.methods), "k": report.k,
            "hooks": list(hooks), "layers": list(ctx.layers), "skipped": report.skipped, "state_probes": states,
            "amnesic": {v: {"layer": a["layer"], "hook": a["hook"], "rank": a["rank"],
                            "relative_change": a["relative_change"],
                            "control_relative_change": a["control_relative_change"], "eval": a["eval"],
                            "eval_sequences": a.get("eval_sequences"),
                            "clean_accuracy": a["erased"]["clean_accuracy"],
                            "erased_accuracy": a["erased"]["erased_accuracy"],
                            "control_accuracy": a["control"]["erased_accuracy"],
                            "example_accuracy_change": a["erased"]["example_accuracy_change"],
                            "control_example_accuracy_change": a["control"]["example_accuracy_change"],
                            "loss_change": a["erased"]["loss_change"],
                            "control_loss_change": a["control"]["loss_change"]}
                        for v, a in amnesic.items()},
            "probes": cells}


def _ci(value: float, ci: list | tuple) -> str:
    return f"{value:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _reading(report: Any, data: dict, amnesic: dict, arch: str) -> str:
    best = data["best"]
    if not best:
        return "No variable could be probed: " + "; ".join(f"{v} ({why})" for v, why in report.skipped.items())
    parts = []
    for v, b in best.items():
        task = report.variables[v]["task"]
        metric = "balanced accuracy" if task == "classification" else "R²"
        sel = "" if b["selectivity"] is None else f", selectivity {_ci(b['selectivity'], b['selectivity_ci'])}"
        if b.get("control_constant"):
            sel += " (its control task is a constant: every token type there drew the same label)"
        text = (f"{v}: best probe {b['method']} (k={b['k']}) on layer {b['layer']} {b['hook']}, held-out {metric} "
                f"{_ci(b['score'], b['score_ci'])}{sel}")
        rows = [r for r in report.for_variable(v) if r.selectivity is not None]
        if rows and b["selectivity"] is not None:
            most = max(rows, key=lambda r: r.selectivity.value)
            if most.selectivity.value > b["selectivity"] + 0.05:
                text += (f"; the most selective is {most.method} (k={most.k}) on layer {most.layer} {most.hook}, "
                         f"score {_ci(most.score.value, most.score.ci)}, selectivity "
                         f"{_ci(most.selectivity.value, most.selectivity.ci)}")
        am = amnesic.get(v)
        if am is not None:
            e, c = am["erased"], am["control"]
            text += (f". Erasing it there (LEACE, rank {am['rank']}, moving the activation by "
                     f"{100 * am['relative_change']:.0f}%) changes the model's accuracy from {e['clean_accuracy']:.3f} "
                     f"to {e['erased_accuracy']:.3f} (per-example change "
                     f"{_ci(e['example_accuracy_change']['value'], e['example_accuracy_change']['ci'])}); "
                     f"erasing permuted labels of the same rank gives {c['erased_accuracy']:.3f}")
        parts.append(text + ".")
    unit = "head" if arch == "mamba2" else "channel"
    for v, by_layer in data["state_details"].items():
        if not by_layer:
            continue
        layer, sp = max(by_layer.items(), key=lambda kv: kv[1].top_score.value)
        parts.append(
            f"State probe: {v} is best read from layer {layer}'s state, where {len(sp.top)} {unit}s "
            f"({', '.join(str(u) for u in sp.top)}) together score {_ci(sp.top_score.value, sp.top_score.ci)} on "
            f"held-out sequences, against {np.mean(sp.random_scores):.2f} (max {np.max(sp.random_scores):.2f}) for "
            f"{len(sp.random_scores)} random sets of {len(sp.top)} {unit}s.")
    if report.skipped:
        parts.append("Not probed: " + "; ".join(f"{v} ({why})" for v, why in report.skipped.items()) + ".")
    parts.append("Scores are balanced accuracy (chance 0.5; a categorical variable's classes scored one against the "
                 "rest and averaged) or R² (chance 0), on held-out sequences with 95% bootstrap CIs over sequences; "
                 "selectivity = score − score on a control task typed by the current token.")
    return " ".join(parts)
