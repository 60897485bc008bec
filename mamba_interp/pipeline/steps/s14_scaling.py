"""Step 14 (scaling): how the measured quantities change along the size ladder of the analysed model's family.

The ladder is the analysed model and its companions of the same architecture and task (``pipeline/companions.py``:
the zoo family's sizes and seeds, or ``--compare``), each measured once with the settings shared with step 10
(``pipeline/profiles.py``). Per size (every seed at that size is a point of its own): loss and error rate at each
multiple of the training length, the FVU of a TopK SAE at its fixed L0 (k) on the last residual stream, and for
recall tasks step 7's best-layer induction score and step 8's memory horizon and top-source hit at the longest
length (``temporal_causality``), and per ground-truth variable the error (1 − held-out score) of its best k-sparse
probe (step 4's ``probing.probe_model``; the CI resamples the probe's held-out sequences).
Against the parameter count N, each quantity gets a two-parameter log-log fit y = a·N^b (``scaling.power_law_fit``)
with a bootstrap CI on the exponent (examples resampled within each point) where at least three distinct sizes
exist; a quantity that is 0 at some size (a perfect accuracy) is not fitted.

What three sizes can support: the sign of a trend and a rough slope over the ~16× range of N, not a functional form
(an offset a·N^−α + c is unidentified with three points, so none is fitted) and no extrapolation; the exponent's CI
covers the measurement noise of the per-size values only. Where the largest size has several seeds, the spread
between them is set beside the change across sizes: a trend smaller than the seed spread is not a size effect.

With ``mamba_interp.circuits`` in the build (``profiles.circuit_profile``), step 5's circuit size (channels;
a count without a sampling distribution, so its exponent CI is degenerate) and step 6's held-out sufficiency (per
example) are fitted too; without it they are listed under ``pending``.

Metrics: ``table`` (one row per model: n_params, d_model, seed, per length accuracy and loss, SAE FVU / L0, the
best probe per variable),
``fits`` (per quantity: exponent with CI, prefactor, R², points; or ``not_fitted`` with the reason),
``seed_spread`` (per quantity, the range across seeds at the largest size), ``pending``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.profiles import ModelProfile, pending, probe_error
from mamba_interp.pipeline.registry import StepSkipped, register_step
from mamba_interp.pipeline.steps.s10_universality import Options, same_family
from mamba_interp.scaling import MIN_SIZES, power_law_fit


def _fvu(sample: np.ndarray) -> float:
    return float(sample[:, 0].sum() / sample[:, 1].sum())


def quantities(p: ModelProfile) -> dict[str, tuple[np.ndarray, Any]]:
    """name -> (per-example sample of this model, statistic)."""
    out: dict[str, tuple[np.ndarray, Any]] = {}
    for mult, row in p.length.items():
        out[f"loss_{mult}"] = (row["example_loss"], np.mean)
        out[f"error_{mult}"] = (1.0 - row["example_correct"], np.mean)
    out["sae_fvu"] = (np.column_stack([p.sae["err2"], p.sae["var2"]]), _fvu)
    if p.lookup:  # step 7's best-layer induction score, step 8's memory horizon and top-source hit at long range
        best = p.lookup["layers"][p.lookup["best_layer"]]
        out["induction_score"] = (best["induction_per_seq"], np.mean)
        long = p.lookup["long"]
        out[f"memory_horizon_{long['multiple']}x"] = (long["memory_horizon"], np.mean)
        out[f"top_source_hit_{long['multiple']}x"] = (long["top_source_hit"], np.mean)
    for var, (task, sums) in p.probes.get("heldout", {}).items():  # rows: the best probe's held-out sequences
        out[f"probe_error_{var}"] = (sums, partial(probe_error, task))
    if "sites" in p.circuit:  # step 5's circuit size and step 6's held-out sufficiency
        out["circuit_channels"] = (np.array([float(p.circuit["channels"])]), np.mean)
        out["circuit_sufficiency"] = (p.circuit["example_sufficiency"], np.mean)
    return out


def fit_all(profiles: list[ModelProfile], n_resamples: int, seed: int) -> dict[str, Any]:
    sizes = [p.n_params for p in profiles]
    qs = [quantities(p) for p in profiles]
    fits: dict[str, Any] = {}
    for name in qs[0]:
        if not all(name in q for q in qs):
            continue
        samples = [q[name][0] for q in qs]
        stat = qs[0][name][1]
        values = [stat(s) for s in samples]
        if len(set(sizes)) < MIN_SIZES:
            fits[name] = {"not_fitted": f"{len(set(sizes))} distinct sizes (a fit needs {MIN_SIZES})"}
        elif min(values) <= 0:
            fits[name] = {"not_fitted": "the value is 0 at some size (log-log fit undefined)"}
        else:
            fits[name] = power_law_fit(sizes, samples, stat, n_resamples=n_resamples, seed=seed).to_dict()
        fits[name]["values"] = [float(v) for v in values]
    return fits


def seed_spread(profiles: list[ModelProfile]) -> dict[str, Any]:
    """Range of each quantity across the seeds of the largest size (where it has more than one)."""
    top = max(p.n_params for p in profiles)
    at_top = [p for p in profiles if p.n_params == top]
    if len(at_top) < 2:
        return {}
    qs = [quantities(p) for p in at_top]
    common = [name for name in qs[0] if all(name in q for q in qs)]
    return {name: {"min": float(min(q[name][1](q[name][0]) for q in qs)),
                   "max": float(max(q[name][1](q[name][0]) for q in qs)), "seeds": len(at_top)} for name in common}


def _figure(ctx: StepContext, profiles: list[ModelProfile], fits: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(fits)
    fig, axes = plt.subplots(1, 5, figsize=(22, 3.8), layout="constrained")
    sizes = np.array([p.n_params for p in profiles], dtype=float)
    grid = np.geomspace(sizes.min(), sizes.max(), 50)
    for ax, prefix in zip(axes, ("loss_", "error_", "sae_fvu", ("induction", "memory", "top_source"),
                                 "probe_error_")):
        for name in (n for n in names if n.startswith(prefix)):
            vals = np.array(fits[name]["values"])
            pos = vals > 0  # a log axis cannot show zeros (e.g. no error at all)
            line = ax.plot(sizes[pos], vals[pos], "o", label=f"{name} ({(~pos).sum()} zeros not drawn)"
                           if (~pos).any() else name)[0]
            if "exponent" in fits[name]:
                ax.plot(grid, fits[name]["prefactor"] * grid ** fits[name]["exponent"], "-", color=line.get_color(),
                        lw=1)
        title = ("lookup (steps 7, 8)" if isinstance(prefix, tuple) else
                 "probe error (1 - score)" if prefix == "probe_error_" else prefix.strip("_"))
        ax.set(xscale="log", yscale="log", xlabel="parameters N", title=title)
        ax.legend(fontsize=6)
    ctx.save_figure(fig, "scaling")


def _reading(profiles: list[ModelProfile], fits: dict[str, Any], spread: dict[str, Any]) -> str:
    sizes = sorted({p.n_params for p in profiles})
    parts = [f"{len(profiles)} models at {len(sizes)} sizes (N = {', '.join(f'{n:,}' for n in sizes)}; "
             f"{sizes[-1] / sizes[0]:.1f}x range)."]
    fitted = {k: v for k, v in fits.items() if "exponent" in v}
    for name, f in fitted.items():
        lo, hi = f["exponent_ci"]
        ci = (f"[{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else
              "(CI undefined: some resamples reach a zero value)")
        parts.append(f"{name}: exponent {f['exponent']:.2f} {ci} (R² {f['r2']:.2f}; values "
                     f"{', '.join(f'{v:.3g}' for v in f['values'])}).")
    skipped = [k for k, v in fits.items() if "not_fitted" in v]
    if skipped:
        parts.append(f"Not fitted: {', '.join(skipped)} ({fits[skipped[0]]['not_fitted']}).")
    noisy = [k for k, s in spread.items() if k in fitted
             and s["max"] - s["min"] >= abs(max(fitted[k]["values"]) - min(fitted[k]["values"])) / 2]
    if spread:
        parts.append(f"Across the {next(iter(spread.values()))['seeds']} seeds of the largest size the quantities "
                     f"vary too: for {', '.join(noisy) or 'none of the fitted quantities'} the seed range is at least "
                     "half the range across sizes, so those trends are not separable from seed variation.")
    parts.append(f"With {len(sizes)} sizes these fits give the sign and a rough slope of each trend, not a law: no "
                 "offset term is identifiable, nothing is extrapolated, and the CIs cover the measurement noise of the "
                 "per-size values only." + (" Not measured in this build: " + "; ".join(pending()) + "."
                                            if pending() else ""))
    return " ".join(parts)


@register_step(14, "scaling", requires=(1,), title="Scaling along the size ladder", options=Options,
               reads=("compare", "batch_size", "figures"))
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    profiles = same_family(ctx, opts.profile_settings(ctx.config.seed))
    if len({p.n_params for p in profiles}) < 2:
        raise StepSkipped("the family has a single size (its companions differ only in the seed); scaling needs "
                          "other sizes")
    profiles = sorted(profiles, key=lambda p: (p.n_params, p.role != "primary", str(p.seed)))
    fits = fit_all(profiles, opts.bootstrap, ctx.seed)
    spread = seed_spread(profiles)
    if ctx.config.figures:
        _figure(ctx, profiles, fits)
    table = [{**p.summary(), "sae_fvu": p.sae["fvu"], "sae_l0": p.sae["l0"]} for p in profiles]
    metrics = {"table": table, "fits": fits, "seed_spread": spread, "pending": list(pending())}
    return StepResult(metrics=metrics, reading=_reading(profiles, fits, spread))
