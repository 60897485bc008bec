"""Model profiles: what the cross-model steps (10 universality, 14 scaling) measure on every model of a family,
computed once per run with shared, cheap settings and kept in memory for the steps of the run.

:func:`model_profile` measures one model on the run's shared inputs (step 1's batch and held-out batch, the same
for every companion): the residual streams (for CKA across models), accuracy and loss at several multiples of the
training length (per-example, for CIs and fits), and a TopK SAE on the last residual stream (FVU at its fixed L0,
live-feature activations for MPPC, decoder rows for MMCS). :func:`family_profiles` does so for the analysed model
and each companion, loading the companions one at a time; results are cached by (model fingerprint, settings,
inputs), so step 14 reuses what step 10 computed.

For Mamba models it adds step 4's k-sparse probes of every ground-truth variable at every layer and a few hooks
(``probing.probe_model``: best site, score with CI, support; :func:`probe_profile`), and on recall tasks step 7's
lookup measures per layer (the hidden-attention induction score and the knockout accuracy drop,
``temporal_causality``) and step 8's input influence at the longest length (memory horizon, top-source hit), and
when ``mamba_interp.circuits`` is part of the build, step 5's circuit (:func:`circuit_profile`: the AtP-grown,
patching-pruned circuit of ``find_circuit`` and its held-out sufficiency from ``evaluate_circuit``, as steps 5 and 6
measure it). Without that module the circuit is listed by :func:`pending` instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mamba_interp import cross_model as XM
from mamba_interp.pipeline.companions import Companion

PENDING = ("circuit (step 5): recurrence of its units, its size and sufficiency (the mamba_interp.circuits module is "
           "not part of this build)",)


def circuits_available() -> bool:
    """Whether ``mamba_interp.circuits`` (steps 5 and 6) is importable in this build."""
    return importlib.util.find_spec("mamba_interp.circuits") is not None


def pending() -> tuple[str, ...]:
    """What the profiles cannot measure in this build (``PENDING`` when the circuits module is missing)."""
    return () if circuits_available() else PENDING


PROBE_HOOKS = ("resid_post", "x", "y")
"""Hooks the profile probes at every layer: the residual stream, the SSM input (after conv) and output."""
LOOKUP_THRESHOLD = 0.5
"""A layer is a model's lookup layer when its induction score (fraction of queries peaking at the source) is at
least this."""
HORIZON_THRESHOLD = 0.1
"""Memory horizon: the farthest source whose influence is at least this fraction of the peak (step 8's)."""


PROFILE_POSITIVE = ("sequences", "long_sequences", "sae_expansion", "sae_k", "sae_steps", "influence_sequences",
                    "probe_k", "probe_tokens", "circuit_sequences", "circuit_max_evals", "circuit_random")
CIRCUIT_THRESHOLD = 0.9
"""The circuit restores at least this fraction of the logit difference on its search batch (step 5's default)."""


@dataclass(frozen=True)
class ProfileSettings:
    """Shared settings of every profile in a run (part of the cache key)."""

    sequences: int = 64
    """Sequences of step 1's batch (every token) for streams and SAE features; as many of the held-out batch
    train the SAE."""
    length_multiples: tuple[int, ...] = (1, 4, 16)
    long_sequences: int = 32
    sae_expansion: int = 4
    sae_k: int = 8
    sae_steps: int = 300
    influence_sequences: int = 16
    """Sequences at the longest length for the input influence (memory horizon, top-source hit)."""
    probe_hooks: tuple[str, ...] = PROBE_HOOKS
    probe_k: int = 8
    """The k-sparse probes' k."""
    probe_tokens: int = 1000
    """Probed tokens per variable (step 4's class-balanced subsample)."""
    circuit_sequences: int = 32
    """Sequences of step 1's batch the circuit is searched on; twice as many held-out ones test it."""
    circuit_max_evals: int = 60
    """Real patches the circuit search may spend (``find_circuit``'s ``max_evals``)."""
    circuit_random: int = 10
    """Random circuits of the same layout in the sufficiency null (``evaluate_circuit``'s ``n_random``)."""
    seed: int = 0

    def __post_init__(self) -> None:
        check_options(self, PROFILE_POSITIVE)


def check_options(opts: Any, positive: tuple[str, ...]) -> None:
    """Validate the named positive-integer fields of an options dataclass and normalise its ``length_multiples``
    (if any) to a sorted tuple; shared by the profile settings and the options of steps 9, 10 and 14."""
    for name in positive:
        v = getattr(opts, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive integer")
    if hasattr(opts, "probe_hooks"):
        from mamba_interp.pipeline.config import HOOK_CHOICES

        hooks = opts.probe_hooks
        allowed = [h for h in HOOK_CHOICES if h != "state_norm"]
        if isinstance(hooks, str) or not isinstance(hooks, (list, tuple)) or not hooks or any(
                h not in allowed for h in hooks):
            raise ValueError(f"probe_hooks={hooks!r} must be a non-empty list of hooks from {', '.join(allowed)}")
        object.__setattr__(opts, "probe_hooks", tuple(dict.fromkeys(hooks)))
    if hasattr(opts, "length_multiples"):
        mult = opts.length_multiples
        if not isinstance(mult, (list, tuple)) or not mult or not all(
                isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in mult):
            raise ValueError(f"length_multiples={mult!r} must be positive integers, e.g. [1, 4, 16]")
        object.__setattr__(opts, "length_multiples", tuple(sorted(set(mult))))


@dataclass
class ModelProfile:
    """One model measured on the shared inputs. Arrays are CPU numpy (float64 unless noted)."""

    name: str
    role: str  # "primary" or a companion role
    arch: str
    n_params: int
    d_model: int
    seed: int | None
    streams: list[np.ndarray]  # [L + 1] of [n_tokens, d] (float32)
    length: dict[str, dict[str, Any]]  # "4x" -> accuracy, loss, n, per-example loss / correct
    sae: dict[str, Any]  # l0, fvu, dead_fraction, d_sae; features [n_tokens, live] (float32); decoder [live, d];
    # err2, var2 [n_tokens] (squared reconstruction error, squared distance from the mean, per token)
    lookup: dict[str, Any] = field(default_factory=dict)
    """Mamba models on recall tasks (:func:`lookup_profile`): per layer the hidden-attention induction score and
    the knockout accuracy drop (step 7's), and at the longest length the memory horizon and top-source hit."""
    probes: dict[str, Any] = field(default_factory=dict)
    """Mamba models (:func:`probe_profile`): step 4's k-sparse probes of every variable at every probed site."""
    circuit: dict[str, Any] = field(default_factory=dict)
    """Mamba models on tasks with a corrupted partner, when the circuits module is present
    (:func:`circuit_profile`)."""
    pending: tuple[str, ...] = field(default_factory=pending)
    extra: dict[str, Any] = field(default_factory=dict)
    """``null_streams``: the streams of a random-init model of the same architecture (Mamba models only)."""

    def summary(self) -> dict[str, Any]:
        """JSON-able numbers (no arrays)."""
        return {"name": self.name, "role": self.role, "arch": self.arch, "n_params": self.n_params,
                "d_model": self.d_model, "seed": self.seed,
                "length": {k: {m: v[m] for m in ("accuracy", "loss", "n")} for k, v in self.length.items()},
                "sae": {k: self.sae[k] for k in ("l0", "fvu", "dead_fraction", "d_sae", "live")},
                "lookup": self.lookup_summary(),
                "probes": {v: {k: b[k] for k in ("layer", "hook", "score", "score_ci", "k")}
                           for v, b in self.probes.get("best", {}).items()},
                "circuit": {k: v for k, v in self.circuit.items() if k not in ("circuit", "example_sufficiency")}}

    def lookup_summary(self) -> dict[str, Any]:
        if not self.lookup:
            return {}
        lk = self.lookup
        long = lk["long"]
        return {"lookup_layer": lk["lookup_layer"], "best_layer": lk["best_layer"],
                "induction_score": {str(i): v["induction_score"] for i, v in lk["layers"].items()},
                "knockout_drop": {str(i): v["knockout_drop"] for i, v in lk["layers"].items()},
                "peak_offset": {str(i): [v["peak_offset"], v["peak_offset_share"]] for i, v in lk["layers"].items()},
                f"memory_horizon_{long['multiple']}x": float(long["memory_horizon"].mean()),
                f"top_source_hit_{long['multiple']}x": float(long["top_source_hit"].mean())}


_CACHE: dict[tuple, ModelProfile] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _tokens_key(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_profile(model: nn.Module, task: Any, batch: Any, heldout: Any, settings: ProfileSettings, name: str,
                  role: str, seed: int | None = None, batch_size: int = 64) -> ModelProfile:
    """Measure ``model`` (see the module docstring); cached in memory for the run's process."""
    batch = batch.select(slice(0, settings.sequences))
    heldout = heldout.select(slice(0, settings.sequences))
    key = (model.fingerprint(), settings, _tokens_key(batch.tokens, heldout.tokens))
    if key in _CACHE:
        cached = _CACHE[key]
        if cached.name == name and cached.role == role:
            return cached
        return ModelProfile(**{**cached.__dict__, "name": name, "role": role})
    streams = [s.reshape(-1, s.shape[-1]) for s in XM.residual_streams(model, batch.tokens, batch_size)]
    train = XM.residual_streams(model, heldout.tokens, batch_size)[-1]
    train = train.reshape(-1, train.shape[-1])
    feats, metrics, sae = XM.sae_features(train, streams[-1], settings.sae_expansion, settings.sae_k,
                                          settings.sae_steps, settings.seed)
    live = (feats != 0).sum(0) >= 20
    with torch.no_grad():
        err2 = ((sae.decode(feats.to(sae.device)).cpu() - streams[-1]) ** 2).sum(-1)
        var2 = ((streams[-1] - streams[-1].mean(0)) ** 2).sum(-1)  # FVU = Σ err2 / Σ var2
        decoder = sae.W_dec.detach().cpu()[live]
    length = {}
    for mult in settings.length_multiples:
        seq_len = task.seq_len * mult
        got = XM.length_curve(model, task, [seq_len], settings.long_sequences, settings.seed + mult, batch_size)
        if seq_len in got:
            row = got[seq_len]
            length[f"{mult}x"] = {"accuracy": row["accuracy"], "loss": row["loss"], "n": row["n"],
                                  "example_loss": row["scores"]["loss"], "example_correct": row["scores"]["correct"]}
    cfg_d = model.config.n_embd if XM.is_transformer(model) else model.cfg.d_model
    arch = "transformer" if XM.is_transformer(model) else model.cfg.arch
    profile = ModelProfile(
        name=name, role=role, arch=arch, n_params=int(model.n_params()), d_model=int(cfg_d), seed=seed,
        streams=[s.float().numpy() for s in streams], length=length,
        sae={**metrics, "live": int(live.sum()), "features": feats[:, live].float().numpy(),
             "decoder": decoder.double().numpy(), "err2": err2.double().numpy(), "var2": var2.double().numpy()},
    )
    if not XM.is_transformer(model):
        profile.extra["null_streams"] = random_init_streams(model, batch.tokens, settings.seed + 1000, batch_size)
        profile.lookup = lookup_profile(model, task, batch, settings, batch_size)
        profile.probes = probe_profile(model, batch, settings, batch_size)
        profile.circuit = circuit_profile(model, task, batch, heldout, settings, batch_size)
    _CACHE[key] = profile
    return profile


def peak_offset(rows: torch.Tensor, lookup: Any) -> dict[str, Any]:
    """Where the query's hidden-attention row peaks relative to the source (p + 1): the most common offset
    (peak − source; 0 = the source, −1 = the trigger, +1 = the token after the source) and its share of queries,
    the query itself excluded. rows: [b, k, l] mean |α| (``temporal_causality.lookup_attention``)."""
    x = rows[:, -1].clone()  # (b, l) the last query
    q = lookup.query[:, -1]
    x[torch.arange(x.shape[-1])[None, :] >= q[:, None]] = -torch.inf
    offsets = (x.argmax(-1) - lookup.source[:, -1]).numpy()
    values, counts = np.unique(offsets, return_counts=True)
    return {"peak_offset": int(values[counts.argmax()]), "peak_offset_share": float(counts.max() / offsets.size)}


def lookup_layers(model: nn.Module, batch: Any, seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """Step 7's lookup measures at every layer (``temporal_causality``): the hidden-attention induction score (does
    the query's row peak at the source p + 1?) with its per-sequence values, where the row peaks relative to p + 1,
    and the accuracy lost when the source → query entry is knocked out (against a random source); the best layer
    (highest score) and the lookup layer (score >= ``LOOKUP_THRESHOLD``, else None). {} if the batch has no lookup
    source."""
    from mamba_interp import temporal_causality as TC

    lookup = TC.lookup_positions(batch)
    if lookup is None or lookup.source is None:
        return {}
    clean = TC.answer_correct(model, batch, lookup, batch_size)
    layers = {}
    for layer in range(model.cfg.n_layer):
        att = TC.lookup_attention(model, batch, layer, lookup, batch_size)
        score, per_seq = TC.induction_score(model, batch, layer, lookup, batch_size, attention=att)
        ko = TC.knockout_accuracy_drop(model, batch, layer, lookup, batch_size, seed, clean)
        layers[layer] = {"induction_score": score, "induction_per_seq": per_seq.double().numpy(),
                         "knockout_drop": ko["drop"], "knockout_control_drop": ko["control_drop"],
                         **peak_offset(att.rows, lookup)}
    best = max(layers, key=lambda i: layers[i]["induction_score"])
    return {"layers": layers, "best_layer": best,
            "lookup_layer": best if layers[best]["induction_score"] >= LOOKUP_THRESHOLD else None}


def lookup_profile(model: nn.Module, task: Any, batch: Any, settings: ProfileSettings, batch_size: int = 64
                   ) -> dict[str, Any]:
    """:func:`lookup_layers` and step 8's influence at the longest length (``temporal_causality``): memory horizon
    and top-source hit per sequence, for a task whose batches have a lookup source; {} otherwise."""
    from mamba_interp import temporal_causality as TC

    out = lookup_layers(model, batch, settings.seed, batch_size)
    if not out:
        return {}
    mult = max(settings.length_multiples)
    long = task.sample(settings.influence_sequences, settings.seed + 7 * mult, seq_len=task.seq_len * mult,
                       split="test")
    long_lookup = TC.lookup_positions(long)
    infl = TC.influence_on_answer(model, long, lookup=long_lookup, batch_size=max(1, batch_size // mult))["hook_embed"]
    last = long_lookup.column(-1)
    horizon = TC.memory_horizon(infl[:, None], HORIZON_THRESHOLD, last.query)[:, 0]
    _, hits = TC.top_source_hit(model, long, lookup=long_lookup, influence=infl)
    out["long"] = {"multiple": mult, "memory_horizon": horizon.double().numpy(),
                   "answer_distance": (last.query - last.source)[:, 0].double().numpy(),
                   "top_source_hit": hits.double().numpy()}
    return out


def circuit_profile(model: nn.Module, task: Any, batch: Any, heldout: Any, settings: ProfileSettings,
                    batch_size: int = 64) -> dict[str, Any]:
    """Step 5's circuit of ``model`` and step 6's test of it (``mamba_interp.circuits``): ``find_circuit`` on the
    first ``circuit_sequences`` sequences of ``batch`` and their corrupted partners (``task.corrupt``) at
    threshold ``CIRCUIT_THRESHOLD``, then ``evaluate_circuit`` on twice as many held-out sequences with
    ``circuit_random`` random circuits of the same layout. {} when the circuits module is not part of the build or
    the task has no corrupted partner.

    Returns ``sites`` (the circuit's sorted (layer, hook, position class) sites), ``n_sites`` (candidate sites the
    search scored: patched hooks × position classes), ``units``, ``channels`` (its size), ``reached``,
    ``search_sufficiency``, the held-out ``sufficiency`` with ``sufficiency_ci``, ``random_sufficiency_mean``,
    ``p_value``, ``example_sufficiency`` ([n] per held-out example) and ``circuit`` (``Circuit.to_dict()``); only
    ``skipped`` (the reason) when the model does not prefer the clean answer on average (no gap to restore)."""
    if not circuits_available():
        return {}
    from mamba_interp.circuits import PatchPair, evaluate_circuit, find_circuit

    n = min(settings.circuit_sequences, len(batch))
    clean, held = batch.select(slice(0, n)), heldout.select(slice(0, min(2 * n, len(heldout))))
    try:
        corrupt, held_corrupt = task.corrupt(clean, settings.seed + 1), task.corrupt(held, settings.seed + 2)
    except (AttributeError, NotImplementedError):
        return {}
    pair = PatchPair.build(model, clean, corrupt, batch_size=batch_size)
    gap = float(pair.clean_values.mean() - pair.corrupt_values.mean())
    if gap <= 0:
        return {"skipped": f"no metric gap to restore (clean minus corrupted {gap:.3g})"}
    circuit = find_circuit(pair, threshold=CIRCUIT_THRESHOLD, max_evals=settings.circuit_max_evals)
    test = evaluate_circuit(PatchPair.build(model, held, held_corrupt, batch_size=batch_size), circuit,
                            n_random=settings.circuit_random, null_examples=n, seed=settings.seed)
    d = test.to_dict()
    return {"sites": sorted({u.site for u in circuit.units}), "n_sites": len(pair.shapes) * len(pair.classes),
            "units": len(circuit.units), "channels": int(circuit.size(pair.shapes)),
            "reached": bool(circuit.info["reached"]), "search_sufficiency": float(circuit.info["sufficiency"]),
            "sufficiency": d["sufficiency"], "sufficiency_ci": d["sufficiency_ci"],
            "random_sufficiency_mean": d["random_sufficiency_mean"], "p_value": d["p_value"],
            "example_sufficiency": test.per_example["sufficiency"].double().numpy(), "circuit": circuit.to_dict()}


def site(layer: int, hook: str) -> str:
    """A probed site's label, ``"layer.hook"``."""
    return f"{layer}.{hook}"


def probe_profile(model: nn.Module, batch: Any, settings: ProfileSettings, batch_size: int = 64) -> dict[str, Any]:
    """Step 4's k-sparse probes (``probing.probe_model``, without the control task that step 4 adds) of every
    ground-truth variable of ``batch`` at every layer and each of ``settings.probe_hooks``; {} when the batch
    defines no variable.

    Returns ``best`` (``ProbeReport.best_table()``: per variable the best site, its held-out score with a CI over
    sequences, the support), ``scores`` / ``supports`` ({variable: {site: held-out score / support}}), ``widths``
    ({site: features}), ``acts`` ({site: [n_tokens, width] float32}, every token of the batch: for matching
    dimensions across models) and ``heldout`` ({variable: (task, per-sequence sufficient statistics [S, m] of the
    best probe's held-out predictions)}, refitted exactly as the search fitted it), from which
    :func:`probe_error` recomputes 1 − score on resampled sequences."""
    from mamba_interp.pipeline.activation_stats import collect_activations
    from mamba_interp.probing import (
        fit_probe,
        prepare_variables,
        probe_model,
        split_indices,
    )
    from mamba_interp.probing.scores import _group_sums

    layers = list(range(model.cfg.n_layer))
    hooks = list(settings.probe_hooks)
    acts = collect_activations(model, batch.tokens, layers, hooks, batch_size, attention_mask=batch.attention_mask)
    data = prepare_variables(batch, acts.mask, None, settings.probe_tokens, seed=settings.seed)
    if not data:
        return {}
    report = probe_model(model, batch, layers, hooks, variables=data, methods=("ksparse",), ks=(settings.probe_k,),
                         k=settings.probe_k, control=False, acts=acts, batch_size=batch_size, seed=settings.seed,
                         n_resamples=200)
    best = report.best_table()
    heldout = {}
    for name, b in best.items():
        var = data[name]
        x = acts.tokens(b["hook"], b["layer"])[torch.as_tensor(var.rows)].double().numpy()
        probe = fit_probe(x, var.y, "ksparse", k=b["k"], cv=3, groups=var.groups, seed=settings.seed, task=var.task,
                          split=split_indices(len(var.y), var.groups, 0.25, settings.seed))
        heldout[name] = (var.task, _group_sums(probe.heldout, var.task)[0])
    scores: dict[str, dict[str, float]] = {}
    supports: dict[str, dict[str, list[int]]] = {}
    for r in report.records:
        scores.setdefault(r.variable, {})[site(r.layer, r.hook)] = r.score.value
        supports.setdefault(r.variable, {})[site(r.layer, r.hook)] = list(r.support)
    flat = {site(i, h): acts.tokens(h, i).numpy() for h in hooks for i in layers}
    return {"best": best, "scores": scores, "supports": supports, "acts": flat,
            "widths": {k: int(v.shape[1]) for k, v in flat.items()}, "heldout": heldout,
            "k": settings.probe_k, "skipped": dict(report.skipped)}


def probe_error(task: str, sums: np.ndarray) -> float:
    """1 − the held-out score (balanced accuracy or R²) from per-sequence sufficient statistics [S, m] (rows:
    sequences, as :func:`probe_profile` keeps them), for resampling sequences in a scaling fit."""
    from mamba_interp.probing.scores import _score_from_sums

    return float(1.0 - _score_from_sums(np.asarray(sums).sum(0), task))


def family_profiles(ctx: Any, companions: list[Companion], settings: ProfileSettings) -> list[ModelProfile]:
    """Profiles of the analysed model (role ``"primary"``) and of each companion trained on the same task, loaded
    one at a time. Companions on another task, or that cannot read the task's sequences, are left out."""
    d1 = ctx.data(1)
    task, batch = d1["task"], d1["batch"]
    heldout = d1.get("heldout") if d1.get("heldout") is not None else batch
    card = ctx.source.card or {}
    out = [model_profile(ctx.model, task, batch, heldout, settings, ctx.source.name, "primary", card.get("seed"),
                         ctx.batch_size)]
    for comp in companions:
        if (comp.task, comp.task_params) != (ctx.source.task, ctx.source.task_params):
            continue
        model = comp.load().to(ctx.device)
        out.append(model_profile(model, task, batch, heldout, settings, comp.name, comp.role, comp.seed,
                                 ctx.batch_size))
        del model  # one companion in memory at a time
    return out


def random_init_streams(model: nn.Module, tokens: torch.Tensor, seed: int, batch_size: int = 64) -> list[np.ndarray]:
    """Residual streams of a freshly initialised model of the same architecture (a null for CKA across seeds)."""
    from mamba_interp.models import HookedMamba

    torch.manual_seed(seed)
    fresh = HookedMamba(model.cfg).to(next(model.parameters()).device).eval()
    return [s.reshape(-1, s.shape[-1]).float().numpy() for s in XM.residual_streams(fresh, tokens, batch_size)]
