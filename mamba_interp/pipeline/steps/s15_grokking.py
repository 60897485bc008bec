"""Step 15 (grokking): Nanda et al. (2023)'s progress measures over a modular-addition training run.

Needs a model folder (or zoo entry, e.g. ``modadd-mamba2``) with ``training_log.json`` and weight snapshots
``snapshot_stepNNNNNN.safetensors`` (``mamba-interp train --snapshot-steps ...`` writes them), on the
modular-addition task; otherwise the step is skipped with the reason. At every snapshot and the final checkpoint
(methods in :mod:`mamba_interp.grokking`): train/test loss and accuracy on all p² pairs, the embedding's and the
SSM inputs' (x, B, C at the first position) energy per Fourier frequency, its Gini coefficient and the fraction
the top ``top_k`` frequencies hold, the logits' energy along the (a + b) directions, the excluded loss (train
pairs, key frequencies removed) and restricted loss (all pairs, only key frequencies kept) with the final
model's key frequencies, and Σw². The phases (memorisation, circuit formation, cleanup) are located on the
training log's curves, which are far finer than the snapshots.

Outputs: ``curves.png`` (log curves, snapshot measures, phases), ``fourier.png`` (energy per frequency by
snapshot, top-k fraction and Gini), ``fourier_final.png`` (embedding, SSM inputs and logits of the final model),
``fourier.safetensors`` (per-snapshot energies).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mamba_interp.grokking import GrokkingRun, analyse_run, key_frequencies, top_fraction
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import StepSkipped, register_step
from mamba_interp.stats import estimate


@dataclass(frozen=True)
class Options:
    threshold: float = 0.85
    """Key frequencies: the fewest top frequencies holding this fraction of the final embedding's energy ..."""
    max_key: int = 8
    """... and at most this many."""
    top_k: int = 8
    """The fraction of energy held by the top ``top_k`` frequencies is reported at every snapshot."""
    accuracy: float = 0.99
    """Memorisation / generalisation = the first evaluation with train / test accuracy at least this."""
    n_resamples: int = 2000

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1 or not 0 < self.accuracy <= 1:
            raise ValueError(f"threshold={self.threshold} and accuracy={self.accuracy} must be in (0, 1]")
        for name in ("max_key", "top_k", "n_resamples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")


def _folder(ctx: StepContext) -> Path | None:
    if ctx.source.kind == "zoo":
        from mamba_interp.tasks import zoo

        return zoo.path(ctx.source.name)
    return ctx.source.path


def _inputs(ctx: StepContext) -> tuple[dict[int, Path], dict[str, Any]]:
    """The run's snapshots and training log, or StepSkipped saying what is missing."""
    from mamba_interp.tasks.zoo import snapshot_files

    folder = _folder(ctx)
    hint = "e.g. --model modadd-mamba2, or a folder written by mamba-interp train --snapshot-steps ..."
    if folder is None or not (folder / "training_log.json").is_file():
        raise StepSkipped(f"no training_log.json next to the checkpoint of {ctx.source.name!r}; grokking "
                          f"measures need a training run's log and weight snapshots ({hint})")
    snapshots = snapshot_files(folder)
    if not snapshots:
        raise StepSkipped(f"{folder} has a training log but no snapshot_stepNNNNNN.safetensors weight snapshots "
                          f"({hint})")
    if ctx.source.task != "modular_addition":
        raise StepSkipped(f"the Fourier progress measures are defined for modular addition; {ctx.source.name!r} "
                          f"was trained on {ctx.source.task or 'no known task'}")
    log = json.loads((folder / "training_log.json").read_text())
    if not log.get("evals"):
        raise StepSkipped(f"{folder}/training_log.json holds no evaluations to locate the phases on")
    return snapshots, log


def _table(run: GrokkingRun, opts: Options, seed: int) -> list[dict[str, Any]]:
    kw = dict(n_resamples=opts.n_resamples, seed=seed)
    rows = []
    for m in run.measures:
        rows.append({
            "step": m.step,
            "train_loss": estimate(m.per_example["train_ce"], **kw).to_dict(),
            "test_loss": estimate(m.per_example["test_ce"], **kw).to_dict(),
            "train_accuracy": m.train_accuracy, "test_accuracy": m.test_accuracy,
            "excluded_loss": estimate(m.per_example["excluded"], **kw).to_dict(),
            "restricted_loss": m.restricted_loss,
            "weight_norm_sq": m.weight_norm_sq,
            "embed_gini": m.embed_gini,
            f"embed_top{opts.top_k}_fraction": m.embed_top_fraction,
            "embed_key_fraction": _fraction_in(m.embed_energy, run.key_frequencies),
            "ssm_gini": m.ssm_gini,
        })
    return rows


def _fraction_in(energy: list[float], freqs: list[int]) -> float:
    e = torch.tensor(energy)
    return float(e[freqs].sum() / e[1:].sum())


def _bracket(steps: list[int], boundary: int | None) -> list[int] | None:
    """The snapshots on either side of a boundary step (the snapshots cannot place it more finely)."""
    if boundary is None:
        return None
    before = [s for s in steps if s <= boundary]
    after = [s for s in steps if s >= boundary]
    return [before[-1] if before else None, after[0] if after else None]


def _log_check(run: GrokkingRun, evals: list[dict[str, Any]]) -> float | None:
    """Largest |measured − logged| train/test loss at the snapshot steps the log also evaluated."""
    logged = {e["step"]: e for e in evals}
    diffs = [abs(m.train_loss - logged[m.step]["train_loss"]) for m in run.measures if m.step in logged]
    diffs += [abs(m.test_loss - logged[m.step]["test_loss"]) for m in run.measures if m.step in logged]
    return max(diffs) if diffs else None


@register_step(15, "grokking", requires=(0,), title="Grokking: progress measures over training snapshots",
               options=Options, version=1)
def run(ctx: StepContext) -> StepResult:
    from mamba_interp.tasks import get_task

    opts: Options = ctx.options or Options()
    snapshots, log = _inputs(ctx)
    task = get_task(ctx.source.task, **ctx.source.task_params)
    p = task.p.p
    is_train = torch.zeros(p * p, dtype=torch.bool)
    is_train[torch.from_numpy(task.split_indices("train"))] = True
    final_step = int(log.get("final", {}).get("steps_run") or log["evals"][-1]["step"])
    result = analyse_run(ctx.model, final_step, snapshots, p, is_train, log["evals"], opts.threshold, opts.max_key,
                         opts.top_k, opts.accuracy, opts.n_resamples, ctx.seed % 2**31)
    final = result.measures[-1]
    first = result.measures[0]
    steps = result.steps
    boundaries = {k: result.phases[k] for k in ("memorised_at", "cleanup_from", "generalised_at")}
    metrics = {
        "p": p, "non_constant_frequencies": p // 2, "snapshot_steps": steps, "final_step": final_step,
        "key_frequencies": result.key_frequencies,
        "key_fraction_final": _fraction_in(final.embed_energy, result.key_frequencies),
        "key_fraction_first": _fraction_in(first.embed_energy, result.key_frequencies),
        f"top{opts.top_k}_fraction": {str(m.step): m.embed_top_fraction for m in result.measures},
        "logit_key_frequencies": key_frequencies(torch.tensor(final.logit_energy), opts.threshold, opts.max_key),
        "ssm_key_frequencies": {k: key_frequencies(torch.tensor(v), opts.threshold, opts.max_key)
                                for k, v in final.ssm_energy.items()},
        "ssm_top_fraction_final": {k: top_fraction(torch.tensor(v), opts.top_k) for k, v in final.ssm_energy.items()},
        "snapshots": _table(result, opts, ctx.seed),
        "phases": result.phases["phases"],
        "boundaries": boundaries,
        "boundary_snapshots": {k: _bracket(steps, v) for k, v in boundaries.items()},
        "excluded_rise": result.excluded_rise,
        "restricted_below_test": all(m.restricted_loss <= m.test_loss for m in result.measures
                                     if m.step >= (boundaries["memorised_at"] or 0)),
        "log_max_abs_difference": _log_check(result, log["evals"]),
    }
    energies = {"steps": torch.tensor(steps), "embed": torch.tensor([m.embed_energy for m in result.measures])}
    for name in final.ssm_energy:
        energies[f"ssm.{name}"] = torch.tensor([m.ssm_energy[name] for m in result.measures])
    energies["logits"] = torch.tensor([m.logit_energy for m in result.measures])
    ctx.save_tensors("fourier", energies)
    if ctx.config.figures:
        _figures(ctx, result, log["evals"], opts.top_k)
    return StepResult(metrics=metrics, reading=_reading(metrics, opts, log["evals"]))


def _at(evals: list[dict[str, Any]], step: int | None, key: str) -> float | None:
    if step is None:
        return None
    return min(evals, key=lambda e: abs(e["step"] - step))[key]


def _reading(m: dict[str, Any], opts: Options, evals: list[dict[str, Any]]) -> str:
    k = opts.top_k
    snaps = m["snapshots"]
    first, last = snaps[0], snaps[-1]
    key = m["key_frequencies"]
    parts = [
        f"Modular addition mod {m['p']} ({m['non_constant_frequencies']} non-constant frequencies), "
        f"{len(snaps)} snapshots (steps {', '.join(map(str, m['snapshot_steps']))}). The final embedding's key "
        f"frequencies {key} hold {100 * m['key_fraction_final']:.1f}% of its mean-centred Fourier energy "
        f"({100 * m['key_fraction_first']:.1f}% at step {first['step']}); the top {k} frequencies hold "
        f"{100 * last[f'embed_top{k}_fraction']:.1f}% at step {last['step']} and "
        f"{100 * first[f'embed_top{k}_fraction']:.1f}% at step {first['step']}; Gini over frequencies "
        f"{first['embed_gini']:.2f} -> {last['embed_gini']:.2f}. The logits' key frequencies along (a + b) are "
        f"{m['logit_key_frequencies']}, the SSM input x's {m['ssm_key_frequencies'].get('x')}.",
    ]
    b = m["boundaries"]
    if m["phases"]:
        ph = m["phases"]
        w = [_at(evals, s, "weight_norm_sq") for s in (b["memorised_at"], b["cleanup_from"], b["generalised_at"])]
        parts.append(
            f"From the training log (evaluated every {evals[1]['step'] - evals[0]['step'] if len(evals) > 1 else '?'} "
            f"steps): memorisation {ph['memorisation'][0]}–{ph['memorisation'][1]} (train accuracy ≥ "
            f"{opts.accuracy:g} at step {b['memorised_at']}), circuit formation {ph['circuit_formation'][0]}–"
            f"{ph['circuit_formation'][1]}, cleanup {ph['cleanup'][0]}–{ph['cleanup'][1]} (the fast fall of the test "
            f"loss starts at step {b['cleanup_from']}; test accuracy ≥ {opts.accuracy:g} at step "
            f"{b['generalised_at']}). Σw² is {w[0]:.0f}, {w[1]:.0f} and {w[2]:.0f} at these boundaries.")
        brackets = m["boundary_snapshots"]
        parts.append(f"The snapshots only bracket the boundaries: the cleanup start lies between snapshots "
                     f"{brackets['cleanup_from'][0]} and {brackets['cleanup_from'][1]}.")
    else:
        parts.append(f"The log does not show both memorisation and generalisation (train accuracy ≥ "
                     f"{opts.accuracy:g} at {b['memorised_at']}, test at {b['generalised_at']}): no phases located.")
    ex = m["excluded_rise"]
    if ex and ex.get("delta"):
        d = ex["delta"]
        verdict = "rises" if ex["rises"] else "does not rise significantly"
        parts.append(f"The excluded loss {verdict} before the test loss falls: {ex['from']:.3g} at step "
                     f"{ex['from_step']} -> {ex['to']:.3g} at step {ex['to_step']} (change {d['value']:.3g} "
                     f"[{d['ci'][0]:.3g}, {d['ci'][1]:.3g}] over {d['n']} train pairs, while the train loss is "
                     f"{ex['train_loss_at_to']:.3g}).")
    elif ex:
        parts.append(f"Whether the excluded loss rises before the test loss falls cannot be told: {ex.get('reason')}.")
    rl = ", ".join(f"{s['step']}: {s['restricted_loss']:.3g}/{s['test_loss']['value']:.3g}" for s in snaps)
    parts.append(f"Restricted / test loss by snapshot: {rl} (restricted ≤ test after memorisation at every "
                 f"snapshot: {'yes' if m['restricted_below_test'] else 'no'}).")
    return " ".join(parts)


def _figures(ctx: StepContext, run: GrokkingRun, evals: list[dict[str, Any]], top_k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = np.array(run.steps)
    log_steps = np.array([e["step"] for e in evals])
    phases = run.phases["phases"]
    colours = {"memorisation": "tab:blue", "circuit_formation": "tab:orange", "cleanup": "tab:green"}

    def shade(ax):
        for name, (a, b) in phases.items():
            ax.axvspan(a, b, color=colours[name], alpha=0.08, label=name.replace("_", " "))

    # 1. curves: log losses + snapshot excluded / restricted; accuracies; weight norm
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    ax = axes[0]
    shade(ax)
    ax.plot(log_steps, [e["train_loss"] for e in evals], label="train loss (log)")
    ax.plot(log_steps, [e["test_loss"] for e in evals], label="test loss (log)")
    ax.plot(steps, [m.excluded_loss for m in run.measures], "o-", label="excluded loss (train)")
    ax.plot(steps, [m.restricted_loss for m in run.measures], "s-", label="restricted loss (all)")
    ax.set(yscale="log", xlabel="training step", ylabel="cross-entropy (nats)",
           title=f"losses; key frequencies {run.key_frequencies}")
    ax.legend(fontsize=7)
    ax = axes[1]
    shade(ax)
    ax.plot(log_steps, [e["train_acc"] for e in evals], label="train accuracy")
    ax.plot(log_steps, [e["test_acc"] for e in evals], label="test accuracy")
    ax.plot(steps, [m.test_accuracy for m in run.measures], "o", color="k", ms=4, label="snapshots")
    ax.set(xlabel="training step", ylabel="accuracy", title="accuracy", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
    ax = axes[2]
    shade(ax)
    ax.plot(log_steps, [e["weight_norm_sq"] for e in evals], label="Σw² (log)")
    ax.plot(steps, [m.weight_norm_sq for m in run.measures], "o", color="k", ms=4, label="snapshots")
    ax.set(xlabel="training step", ylabel="Σw²", title="weight norm")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "curves")

    # 2. embedding energy per frequency by snapshot; top-k fraction and Gini over snapshots
    energy = np.array([m.embed_energy for m in run.measures])[:, 1:]
    frac = energy / energy.sum(1, keepdims=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")
    im = axes[0].imshow(frac.T, aspect="auto", origin="lower", cmap="viridis",
                        extent=(-0.5, len(steps) - 0.5, 0.5, frac.shape[1] + 0.5))
    axes[0].set_xticks(range(len(steps)), [str(s) for s in steps])
    axes[0].set(xlabel="snapshot step", ylabel="frequency k", title="embedding: energy fraction per frequency")
    fig.colorbar(im, ax=axes[0], fraction=0.05)
    ax = axes[1]
    ax.plot(steps, [m.embed_top_fraction for m in run.measures], "o-", label=f"top {top_k} frequencies")
    ax.plot(steps, frac[:, [k - 1 for k in run.key_frequencies]].sum(1), "s-",
            label=f"final key frequencies {run.key_frequencies}")
    ax.plot(steps, [m.embed_gini for m in run.measures], "^-", label="Gini over frequencies")
    ax.axhline(0.85, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="training step", ylim=(0, 1.02), title="sparsity of the embedding in the Fourier basis")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "fourier")

    # 3. the final model: embedding, SSM inputs and logits per frequency
    final = run.measures[-1]
    series = {"embedding": final.embed_energy, **{f"SSM {k}": v for k, v in final.ssm_energy.items()},
              "logits (a+b)": final.logit_energy}
    fig, ax = plt.subplots(figsize=(9, 3.6), layout="constrained")
    ks = np.arange(1, run.p // 2 + 1)
    width = 0.8 / len(series)
    for j, (name, e) in enumerate(series.items()):
        e = np.asarray(e)[1:]
        ax.bar(ks + (j - (len(series) - 1) / 2) * width, e / e.sum(), width, label=name)
    ax.set_xticks(ks)
    ax.set(xlabel="frequency k", ylabel="energy fraction", title=f"final model (step {final.step})")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "fourier_final")
