"""Step 5 (circuits): candidate circuits at the granularity (layer, hook, position class, channel/head).

For each analysed dataset with a corrupted partner (the task's ``corrupt``: induction changes the value X after
the trigger; IOI's ABC prompts; factual recall's swapped subject; repeated tokens with a fresh first copy), on
``n_search`` examples of step 1's primary batch (``mamba_interp.circuits``):

* ``atp``: every unit scored by attribution patching, grown greedily by score and pruned by real patching
  (ACDC-style) to the smallest set whose joint denoising patch restores ≥ ``threshold`` of the metric gap
  (``find_circuit``);
* one circuit per evidence source, placed at the position classes where real patching says it acts
  (``circuits.evidence.place``): ``sae`` (step 3: decoder directions of the latents tracking task variables with
  |r| ≥ ``sae_min_r``), ``probes`` and ``state_probes`` (step 4: best sparse-probe supports; top state channels),
  ``hidden_attention`` (step 7: top-``attention_k`` channels by hidden attention from the answer to the final
  position), ``temporal`` (step 8: the layers and source position classes with most influence).

Sources whose step did not run (or is not implemented in this installation) are listed in ``unavailable`` with
the reason. Position classes come from the task metadata (``activation_patching.position_classes``; induction:
trigger p, answer p+1, final, other). Step 6 tests every circuit on held-out data against random controls.

Outputs: ``circuits.json`` (every circuit, ``Circuit.to_dict``), ``atp_scores.json`` (the top-scored units), and
``growth.png`` (sufficiency of the AtP-ranked prefixes tried during growth). Data: ``circuits`` {dataset:
[Circuit]}, ``datasets`` {dataset: {"metric", "classes"}}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mamba_interp.activation_patching.sites import DEFAULT_HOOKS, HOOK_LIKE
from mamba_interp.circuits import (
    Circuit,
    PatchPair,
    attention_units,
    find_circuit,
    influence_units,
    place,
    probe_units,
    sae_units,
    state_probe_units,
)
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import StepSkipped, register_step
from mamba_interp.pipeline.steps.s03_sae import _tuple_of

EVIDENCE_STEPS = {3: "sae", 4: "probes", 7: "hidden_attention", 8: "temporal"}
INFLUENCE_CLASSES = {"query": "final", "source": "answer", "trigger": "trigger", "recent": "other", "other": "other"}
"""Step 8's source classes (of the final query) onto this step's position classes (induction's)."""
LM_SETS = ("ioi", "factual_recall")


@dataclass(frozen=True)
class Options:
    n_search: int = 64
    """Examples of the primary batch the circuits are searched on (step 6 tests them on held-out data)."""
    threshold: float = 0.9
    """Fraction of the metric gap the AtP circuit's joint denoising patch must restore."""
    hooks: tuple[str, ...] = DEFAULT_HOOKS
    """Short hook names the AtP search scores (every layer)."""
    method: str = "atp"
    """``atp`` or ``ig`` (integrated gradients over interpolated input embeddings, ``ig_steps`` passes)."""
    ig_steps: int = 5
    max_evals: int = 150
    """Real patches the growth and pruning may spend."""
    min_share: float = 0.1
    """An evidence unit is placed at every position class where it restores ≥ this share of its best class."""
    sae_min_r: float = 0.5
    """SAE latents whose |correlation| with a task variable reaches this go into the ``sae`` circuit."""
    attention_k: int = 10
    state_probe_k: int = 10
    probe_max_dims: int = 32
    """Best probes with a larger support (dense probes) are left out of the ``probes`` circuit."""
    datasets: tuple[str, ...] | None = None
    """Step-1 datasets to analyse; None: the primary one, plus IOI and factual recall when present."""

    def __post_init__(self) -> None:
        for name in ("n_search", "ig_steps", "max_evals", "attention_k", "state_probe_k", "probe_max_dims"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold!r} must be in (0, 1]")
        if not 0 <= self.min_share <= 1 or not 0 <= self.sae_min_r <= 1:
            raise ValueError("min_share and sae_min_r must be in [0, 1]")
        if self.method not in ("atp", "ig"):
            raise ValueError(f"method={self.method!r} is unknown; use atp or ig")
        hooks = _tuple_of(self.hooks, "hooks", str)
        bad = [h for h in hooks if h not in HOOK_LIKE]
        if not hooks or bad:
            raise ValueError(f"hooks={self.hooks!r}: use short hook names from {', '.join(HOOK_LIKE)}")
        object.__setattr__(self, "hooks", hooks)
        if self.datasets is not None:
            object.__setattr__(self, "datasets", _tuple_of(self.datasets, "datasets", str))


# ---- the datasets and their corrupted partners (shared with step 6) ------------------------------
def corrupt_partner(ctx: StepContext, name: str, batch: Any, seed: int) -> Any:
    """The corrupted partner of ``batch`` (dataset ``name`` of step 1); StepSkipped-worthy ValueError if none."""
    from mamba_interp.tasks import get_task
    from mamba_interp.tasks.base import TaskBatch

    ds = ctx.data(1)
    if name == "repeated_tokens":  # no tokenizer: a fresh random first copy (text_induction's corruption)
        g = np.random.default_rng([int(seed), 13])
        off, half = int(batch.metadata["first_start"]), int(batch.metadata["period"])
        tokens = batch.tokens.clone()
        tokens[:, off:off + half] = torch.from_numpy(g.integers(1, ctx.model.cfg.vocab_size, (len(batch), half)))
        return TaskBatch(tokens, batch.targets.clone(), dict(batch.metadata), task=batch.task)
    task = ds.get("task") if name == ds["primary"] else None
    if task is None or getattr(task, "name", None) != batch.task:
        if name not in LM_SETS and name != "text_induction":
            raise ValueError(f"dataset {name!r} has no task to build a corrupted partner")
        task = get_task(name, tokenizer=ctx.source.tokenizer())
    try:
        return task.corrupt(batch, seed)
    except NotImplementedError as exc:
        raise ValueError(str(exc)) from None


def fresh_sample(ctx: StepContext, name: str, n: int, seed: int) -> Any:
    """Held-out examples of dataset ``name``: step 1's ``heldout`` for the primary set, a new sample otherwise."""
    from mamba_interp.tasks import get_task

    ds = ctx.data(1)
    if name == ds["primary"] and ds.get("heldout") is not None:
        held = ds["heldout"]
        return held.select(slice(0, min(n, len(held))))
    return get_task(name, tokenizer=ctx.source.tokenizer()).sample(n, seed=seed)


def chosen_datasets(ctx: StepContext, wanted: tuple[str, ...] | None) -> tuple[list[str], dict[str, str]]:
    """(datasets to analyse, {dataset: why it is skipped})."""
    ds = ctx.data(1)
    sets = ds["sets"]
    names = list(wanted) if wanted is not None else [ds["primary"]] + [s for s in LM_SETS if s in sets]
    unknown = [n for n in names if n not in sets]
    if unknown:
        raise ValueError(f"dataset {unknown[0]!r} was not built by step 1; it has {', '.join(sets)}")
    keep, skipped = [], {}
    for name in names:
        try:
            corrupt_partner(ctx, name, sets[name].select(slice(0, 2)), 0)
            keep.append(name)
        except ValueError as exc:
            skipped[name] = str(exc).splitlines()[0]
    return keep, skipped


def load(ctx: StepContext) -> dict:
    import json

    data = json.loads((ctx.out_dir / "circuits.json").read_text())
    return {"circuits": {k: [Circuit.from_dict(c) for c in v] for k, v in data["circuits"].items()}}


def _evidence(ctx: StepContext) -> tuple[dict[int, dict], dict[str, str]]:
    """In-memory data of the evidence steps (required ones, and others that ran earlier in this process), and why
    the others are unavailable."""
    from mamba_interp.pipeline.registry import all_steps

    steps = all_steps()
    found, missing = {}, {}
    for n, label in EVIDENCE_STEPS.items():
        result = ctx.results.get(n)
        if n in ctx.step.requires:
            found[n] = ctx.data(n)
        elif n not in steps:
            missing[label] = f"step {n} is not implemented in this installation"
        elif result is None:
            missing[label] = f"step {n} did not run before step 5 (add it to --steps)"
        elif not result.data:
            missing[label] = f"step {n} was resumed from disk without its in-memory data"
        else:
            found[n] = result.data
    return found, missing


def _evidence_circuits(ctx: StepContext, pair: PatchPair, opts: Options, evidence: dict[int, dict],
                       missing: dict[str, str]) -> list[Circuit]:
    out = []

    def add(name: str, units: list, info: dict) -> None:
        if units:
            out.append(place(pair, units, name, name, opts.min_share, info))
        else:
            missing[name] = info.get("why", "the step gave no units")

    if 3 in evidence:
        best = ctx.metrics(3).get("best_by_variable", {})
        saes = evidence[3].get("saes", {})
        latents, used = [], []
        for var, rec in best.items():
            if rec["abs_r"] >= opts.sae_min_r and rec["sae"] in saes:
                t = saes[rec["sae"]]
                latents.append((t.layer, t.hook, t.sae.W_dec[rec["latent"]].detach().cpu()))
                used.append({"variable": var, "sae": rec["sae"], "latent": rec["latent"], "abs_r": rec["abs_r"]})
        add("sae", sae_units(latents), {"latents": used, "why": f"no SAE latent reaches |r| >= {opts.sae_min_r}"})
    if 4 in evidence:
        best = {v: r for v, r in evidence[4].get("best", {}).items() if ":" not in v}  # the primary set's variables
        add("probes", probe_units(best, opts.probe_max_dims),
            {"variables": sorted(v for v, r in best.items() if len(r.get("support") or []) <= opts.probe_max_dims),
             "why": f"step 4's best probes are all dense (support > {opts.probe_max_dims} dims)"})
        add("state_probes", state_probe_units(evidence[4].get("state_probes", {}), opts.state_probe_k),
            {"why": "step 4 reported no state probes"})
    if 7 in evidence:
        add("hidden_attention", attention_units(evidence[7].get("top_channels", {}), opts.attention_k),
            {"why": "step 7 reported no top channels"})
    if 8 in evidence:
        influence = {0 if k == "embed" else int(k): v for k, v in evidence[8].get("influence", {}).items()}
        units = influence_units(influence, list(pair.classes), rename=INFLUENCE_CLASSES)
        add("temporal", units, {"why": "step 8's influence has no entry for this task's position classes",
                                "influence": {str(k): v for k, v in influence.items()}})
    return out


@register_step(5, "circuits", requires=(1, 3, 4, 7, 8), title="Candidate circuits: attribution search and evidence circuits",
               options=Options, load=load, version=1, reads=("batch_size", "figures"))
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    if ctx.model.cfg.n_layer == 0:
        raise StepSkipped("the model has no layers")
    names, skipped = chosen_datasets(ctx, opts.datasets)
    if not names:
        raise StepSkipped("no dataset has a corrupted partner to patch against: " +
                          "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    evidence, missing = _evidence(ctx)
    sets = ctx.data(1)["sets"]
    circuits: dict[str, list[Circuit]] = {}
    per_set: dict[str, Any] = {}
    scores_out: dict[str, Any] = {}
    for i, name in enumerate(ctx.progress(names, desc="datasets")):
        batch = sets[name]
        batch = batch.select(slice(0, min(opts.n_search, len(batch))))
        corrupt = corrupt_partner(ctx, name, batch, ctx.seed + i)
        pair = PatchPair.build(ctx.model, batch, corrupt, batch_size=ctx.batch_size)
        if float(pair.clean_values.mean() - pair.corrupt_values.mean()) <= 0:
            skipped[name] = ("the model does not prefer the clean answer over the corrupted one on average "
                             f"(metric {pair.clean_values.mean():.3g} vs {pair.corrupt_values.mean():.3g})")
            continue
        atp = find_circuit(pair, hooks=opts.hooks, threshold=opts.threshold, method=opts.method,
                           steps=opts.ig_steps, max_evals=opts.max_evals)
        found = [atp] + (_evidence_circuits(ctx, pair, opts, evidence, missing) if name == ctx.data(1)["primary"]
                         else [])
        circuits[name] = found
        scores_out[name] = [{"score": s, **u} for s, u in zip(atp.info["scores"][:64], atp.info["ranking"][:64])]
        per_set[name] = {
            "search_examples": len(pair), "metric": pair.main_metric.name, "classes": list(pair.classes),
            "clean_metric": float(pair.clean_values.mean()), "corrupt_metric": float(pair.corrupt_values.mean()),
            "clean_accuracy": pair.clean_accuracy,
            "circuits": {c.name: {"units": c.size(pair.shapes), "layout": c.layout(pair.shapes),
                                  "search_sufficiency": float(pair.sufficiency(c).mean())} for c in found},
            "atp_reached_threshold": bool(atp.info["reached"]), "atp_evaluations": atp.info["evaluations"],
            "atp_growth": atp.info["growth"],
        }
    if not circuits:
        raise StepSkipped("; ".join(f"{k}: {v}" for k, v in skipped.items()))
    ctx.save_json("circuits", {"circuits": {k: [c.to_dict() for c in v] for k, v in circuits.items()}})
    ctx.save_json("atp_scores", scores_out)
    if ctx.config.figures:
        _figure(ctx, per_set)
    metrics = {"datasets": per_set, "unavailable": missing, "skipped_datasets": skipped,
               "threshold": opts.threshold, "method": opts.method}
    return StepResult(metrics=metrics, reading=_reading(per_set, missing, skipped, opts), data={"circuits": circuits})


def _reading(per_set: dict, missing: dict, skipped: dict, opts: Options) -> str:
    parts = []
    for name, m in per_set.items():
        c = m["circuits"]
        atp = c["atp"]
        layout = ", ".join(f"{k} ({v})" for k, v in atp["layout"].items())
        verdict = "reaches" if m["atp_reached_threshold"] else "does not reach"
        parts.append(
            f"{name}: the attribution circuit has {atp['units']} units ({layout}) and restores "
            f"{atp['search_sufficiency']:.3f} of the {m['metric']} gap on the {m['search_examples']} search examples "
            f"({verdict} the {opts.threshold:g} target; {m['atp_evaluations']} real patches)."
        )
        others = [f"{k} {v['units']} units, {v['search_sufficiency']:.3f}" for k, v in c.items() if k != "atp"]
        if others:
            parts.append("Evidence circuits: " + "; ".join(others) + ".")
    if missing:
        parts.append("Not available: " + "; ".join(f"{k} ({v})" for k, v in missing.items()) + ".")
    if skipped:
        parts.append("Skipped datasets: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + ".")
    parts.append("Step 6 tests these circuits on held-out examples against random controls.")
    return " ".join(parts)


def _figure(ctx: StepContext, per_set: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    for name, m in per_set.items():
        g = sorted(m["atp_growth"])
        ax.plot([k for k, _ in g], [v for _, v in g], "o-", label=name)
    ax.axhline(ctx.options.threshold if ctx.options else 0.9, color="grey", ls="--", lw=1, label="threshold")
    ax.set(xscale="log", xlabel="top-k units by AtP score", ylabel="fraction of the gap restored",
           title="AtP-ranked growth (search examples)")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "growth")
