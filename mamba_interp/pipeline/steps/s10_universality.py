"""Step 10 (universality): do the analysed model's representations and features recur across seeds and sizes of
its family?

Companions (``pipeline/companions.py``): the zoo family's other seeds (role ``seed``: same architecture and size)
and sizes (role ``size``), or the models named with ``--compare``; transformers and models of other tasks are left
out. Every model is measured once with shared settings (``pipeline/profiles.py``, shared with step 14). For each
pair of seeds (every pair) and each (analysed model, other size) pair:

* Representations: debiased linear CKA of the residual streams at the same depth (``comparison.cka``), with a
  sequence-bootstrap CI (``comparison.GroupedLinearCKA``), against a random-init null (the first model against a
  freshly initialised model of the second's architecture, Kornblith et al. 2019's random baseline).
* Lookup (Mamba models on recall tasks; step 7's ``temporal_causality`` measures): each model's lookup layer
  (where the hidden-attention row of the query peaks at the source most often), whether the models agree on it,
  and at that layer the induction score and the knockout accuracy drop across the models.
* SAE features (a TopK SAE on the last residual stream of each model, same settings): MPPC of the first model's
  live features' activations against the second's (Wang et al. 2024) with a random-rotation null of the second's
  latent space, and MMCS of the decoder directions after mapping the first model's residual basis onto the
  second's by orthogonal Procrustes on the shared tokens (``comparison.procrustes_rotation``; two models' bases are
  unrelated until aligned), against Haar-random rotations in place of the Procrustes map.
* Probes (step 4's k-sparse probes of every ground-truth variable at every layer and the profile's hooks,
  ``probing.probe_model``): do the same sites decode the same variables (Jaccard of the decoded (variable, layer,
  hook) cells against random cell sets), is each variable's best site the same, and do the supports recur — the
  first model's support mapped onto the second's dimensions by a one-to-one matching of their activations
  (``comparison.match_features``), Jaccard with the second's support against random supports.

One statistic per question and group: the mean over pairs with a t-interval over the pairs (pairs share seeds, so
the interval is optimistic; each pair's own CI and null are listed), and "recurs" when every pair beats its null.

* Circuits (when ``mamba_interp.circuits`` is part of the build; ``profiles.circuit_profile``: step 5's AtP-grown,
  patching-pruned circuit, tested on held-out sequences as step 6 does): Jaccard of the two circuits' (layer, hook,
  position class) sites against random circuits of the same numbers of sites drawn from the candidate sites
  (``comparison.random_jaccard_null``; the circuits module's channel-level ``random_circuits`` keep each unit's site,
  so they cannot be a null for which sites recur), and each model's held-out sufficiency against its random
  circuits of the same layout. Without the module this is listed under ``pending``.

Metrics: ``models`` (each profile's summary), ``seeds`` / ``sizes`` (``pairs``: per pair ``cka`` by stream,
``mppc``, ``mmcs``, ``probe_sites``, ``probe_supports``, ``probe_best_site``, ``circuit_sites``; ``summary``: per
question value, t-interval, ``recurs``, ``lookup`` and ``circuit``), ``behaviour`` (accuracy at each length per
model), ``probe_scores``
(per variable, each model's best probe score), ``pending``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from mamba_interp import comparison as C
from mamba_interp.pipeline.companions import no_companions_reason, resolve_companions
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.profiles import (
    LOOKUP_THRESHOLD,
    PROBE_HOOKS,
    PROFILE_POSITIVE,
    ModelProfile,
    ProfileSettings,
    check_options,
    family_profiles,
    pending,
    site,
)
from mamba_interp.pipeline.registry import StepSkipped, register_step


@dataclass(frozen=True)
class Options:
    sequences: int = ProfileSettings.sequences
    """Shared profile settings, defaults from ``ProfileSettings`` (steps 10 and 14 share these options, so the
    profiles are computed once)."""
    length_multiples: tuple[int, ...] = ProfileSettings.length_multiples
    long_sequences: int = ProfileSettings.long_sequences
    sae_expansion: int = ProfileSettings.sae_expansion
    sae_k: int = ProfileSettings.sae_k
    sae_steps: int = ProfileSettings.sae_steps
    influence_sequences: int = ProfileSettings.influence_sequences
    probe_hooks: tuple[str, ...] = ProfileSettings.probe_hooks
    probe_k: int = ProfileSettings.probe_k
    probe_tokens: int = ProfileSettings.probe_tokens
    circuit_sequences: int = ProfileSettings.circuit_sequences
    circuit_max_evals: int = ProfileSettings.circuit_max_evals
    circuit_random: int = ProfileSettings.circuit_random
    bootstrap: int = 200
    """Sequence-bootstrap resamples per CKA."""
    rotations: int = 20
    """Random rotations per MPPC / MMCS null."""
    probe_threshold: float = 0.9
    """A site decodes a variable when its k-sparse probe's held-out score (balanced accuracy, or R²) is at least
    this."""
    null_samples: int = 1000
    """Random sets per Jaccard null (probe sites and supports)."""

    def __post_init__(self) -> None:
        check_options(self, (*PROFILE_POSITIVE, "bootstrap", "rotations", "null_samples"))
        if not 0 < self.probe_threshold <= 1:
            raise ValueError(f"probe_threshold={self.probe_threshold} must be in (0, 1]")

    def profile_settings(self, seed: int) -> ProfileSettings:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(ProfileSettings) if f.name != "seed"}
        return ProfileSettings(**shared, seed=seed)


def same_family(ctx: StepContext, settings: ProfileSettings) -> list[ModelProfile]:
    """Profiles of the analysed model and its Mamba companions of the same task (skip if there are none)."""
    comps = [c for c in resolve_companions(ctx.source, ctx.config.compare) if c.role in ("seed", "size")]
    if ctx.source.task is None:
        raise StepSkipped("needs a task model: the family is compared on its task's sequences")
    if not comps:
        raise StepSkipped(no_companions_reason(ctx.source, "other seed or size of the same architecture and task"))
    return family_profiles(ctx, comps, settings)


def t_interval(values: list[float], confidence: float = 0.95) -> list[float]:
    """Student-t interval of the mean of a few values (``scipy.stats.t``); the value itself for one."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return [float(v.mean()), float(v.mean())] if v.size else [float("nan")] * 2
    half = stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return [float(v.mean() - half), float(v.mean() + half)]


def pair_similarity(a: ModelProfile, b: ModelProfile, groups: np.ndarray, opts: Options, seed: int) -> dict:
    """CKA per stream (with CI and random-init null), MPPC and MMCS (with rotation nulls) and the recurrence of
    probes (:func:`probe_recurrence`) of profiles a → b."""
    n_groups = len(np.unique(groups))
    cka = {}
    null_streams = b.extra.get("null_streams")
    for i, (x, y) in enumerate(zip(a.streams, b.streams)):
        est = C.bootstrap_indices(C.GroupedLinearCKA(x, y, groups), n_groups, n_resamples=opts.bootstrap,
                                  seed=seed + i)
        row = est.to_dict()
        if null_streams is not None:
            null = C.bootstrap_indices(C.GroupedLinearCKA(x, null_streams[i], groups), n_groups,
                                       n_resamples=opts.bootstrap, seed=seed + i)
            row["random_init"] = null.to_dict()
            row["above_null"] = bool(est.ci_low > null.ci_high)
        cka[f"stream{i}"] = row
    fa, fb = a.sae["features"].astype(np.float64), b.sae["features"].astype(np.float64)
    out: dict[str, Any] = {"cka": cka}
    if fa.shape[1] and fb.shape[1]:
        out["mppc"] = C.rotation_test(C.mppc, fa, fb, n_rotations=opts.rotations, seed=seed).to_dict()
        rot = C.procrustes_rotation(a.streams[-1], b.streams[-1])
        da, db = a.sae["decoder"], b.sae["decoder"]
        rng = np.random.default_rng(seed)
        null = []
        for _ in range(opts.rotations):
            q = C.random_rotation(max(da.shape[1], db.shape[1]), rng)[: da.shape[1], : db.shape[1]]
            null.append(C.mmcs(da, db, rotation=q))
        out["mmcs"] = C.null_test(C.mmcs(da, db, rotation=rot), null, "random rotation").to_dict()
    if a.probes and b.probes:
        out.update(probe_recurrence(a.probes, b.probes, opts.probe_threshold, opts.null_samples, seed))
    if "sites" in a.circuit and "sites" in b.circuit:
        out["circuit_sites"] = circuit_site_overlap(a.circuit, b.circuit, opts.null_samples, seed)
    return out


def circuit_site_overlap(ca: dict[str, Any], cb: dict[str, Any], n_null: int = 1000, seed: int = 0
                         ) -> dict[str, Any]:
    """Jaccard of two circuits' (layer, hook, position class) sites (``profiles.circuit_profile``) against random
    site sets of the same sizes from the candidate sites (``comparison.random_jaccard_null``)."""
    sa, sb = ({tuple(x) for x in c["sites"]} for c in (ca, cb))
    universe = max(ca["n_sites"], cb["n_sites"], len(sa | sb))
    out = C.null_test(C.jaccard(sa, sb), C.random_jaccard_null(len(sa), len(sb), universe, n_null, seed),
                      "random sites").to_dict()
    return {**out, "sites_a": sorted(sa), "sites_b": sorted(sb), "candidate_sites": universe}


def circuit_recurrence(models: list[ModelProfile]) -> dict[str, Any] | None:
    """Each model's circuit (size, held-out sufficiency with its CI against random circuits of the same layout);
    the mean sufficiency and size with t-intervals over the models, and whether every circuit beats its null."""
    with_circuit = [m for m in models if "sites" in m.circuit]
    if len(with_circuit) < 2:
        return None
    per = {m.name: {k: m.circuit[k] for k in ("sites", "units", "channels", "reached", "sufficiency",
                                             "sufficiency_ci", "random_sufficiency_mean", "p_value")}
           for m in with_circuit}
    suff = [v["sufficiency"] for v in per.values()]
    size = [float(v["channels"]) for v in per.values()]
    return {"per_model": per, "sufficiency": {"value": float(np.mean(suff)), "ci": t_interval(suff)},
            "channels": {"value": float(np.mean(size)), "ci": t_interval(size)},
            "beats_random": bool(all(v["p_value"] < 0.05 for v in per.values())), "n_models": len(with_circuit)}


def probe_recurrence(pa: dict[str, Any], pb: dict[str, Any], threshold: float, n_null: int = 1000, seed: int = 0
                     ) -> dict[str, Any]:
    """Do two models' probes (``profiles.probe_profile``) recur?

    * ``probe_sites``: Jaccard of the (variable, layer, hook) cells each model decodes (k-sparse held-out score
      >= ``threshold``) among the cells probed in both, against random cell sets of the same sizes
      (``comparison.random_jaccard_null``).
    * ``probe_supports``: per variable that both models decode at a's best site, a's k-sparse support there
      mapped onto b's dimensions by the one-to-one matching of the two models' activations at that site
      (``comparison.match_features``: two models' dimensions are unrelated until matched) against b's support
      there; the mean Jaccard over those variables against the mean of random supports of the same sizes.
    * ``probe_best_site``: each variable's best site in both models (the summary counts the agreements)."""
    cells = sorted({(v, s) for v, row in pa["scores"].items() for s in row}
                   & {(v, s) for v, row in pb["scores"].items() for s in row})
    decoded = [{c for c in cells if p["scores"][c[0]][c[1]] >= threshold} for p in (pa, pb)]
    sites = C.null_test(C.jaccard(*decoded), C.random_jaccard_null(len(decoded[0]), len(decoded[1]), len(cells),
                                                                   n_null, seed), "random cells").to_dict()
    sites.update(decoded_a=len(decoded[0]), decoded_b=len(decoded[1]), cells=len(cells), threshold=threshold)
    per_var: dict[str, Any] = {}
    nulls = []
    for k, (var, best) in enumerate(sorted(pa["best"].items())):
        at = profile_site(best)
        if min(best["score"], pb["scores"].get(var, {}).get(at, -np.inf)) < threshold:
            continue  # the support of a probe that does not decode the variable says nothing about it
        mapping = C.match_features(pa["acts"][at], pb["acts"][at])
        mapped = {int(mapping[i]) for i in best["support"] if mapping[i] >= 0}
        sup_b = pb["supports"][var][at]
        null = C.random_jaccard_null(len(mapped), len(sup_b), pb["widths"][at], n_null, seed + k)
        nulls.append(null)
        per_var[var] = {"site": at, "jaccard": C.jaccard(mapped, sup_b), "null_mean": float(null.mean()),
                        "score_a": best["score"], "score_b": pb["scores"][var][at]}
    both = sorted(set(pa["best"]) & set(pb["best"]))
    out: dict[str, Any] = {"probe_sites": sites, "probe_best_site": {
        v: [profile_site(pa["best"][v]), profile_site(pb["best"][v])] for v in both}}
    if per_var:
        obs = float(np.mean([v["jaccard"] for v in per_var.values()]))
        out["probe_supports"] = {**C.null_test(obs, np.mean(nulls, axis=0), "random supports").to_dict(),
                                 "per_variable": per_var, "k": pa["k"]}
    return out


def profile_site(best: dict[str, Any]) -> str:
    return site(best["layer"], best["hook"])


def _summary(pairs: dict[str, dict], last_stream: str) -> dict[str, Any]:
    """Per question: the mean over pairs with a t-interval, the mean null, and whether every pair beats its null."""
    def null_test_q(key: str) -> tuple:
        return (lambda p: p[key]["observed"] if key in p else float("nan"),
                lambda p: key in p and p[key]["p_value"] < 0.05,
                lambda p: p[key]["null_mean"] if key in p else None)

    def cka_value(p: dict) -> float:
        return p["cka"][last_stream]["value"]

    questions = {
        "representations_cka_last": (cka_value, lambda p: p["cka"][last_stream].get("above_null"),
                                     lambda p: p["cka"][last_stream].get("random_init", {}).get("value")),
        "features_mppc": null_test_q("mppc"),
        "features_mmcs": null_test_q("mmcs"),
        "probe_sites_jaccard": null_test_q("probe_sites"),
        "probe_supports_jaccard": null_test_q("probe_supports"),
        "circuit_sites_jaccard": null_test_q("circuit_sites"),
    }
    out: dict[str, Any] = {}
    for q, (value, beats, null) in questions.items():
        if q.endswith("_jaccard") and not any(q[:-len("_jaccard")] in p for p in pairs.values()):
            continue  # no probes (e.g. no task variable) or no circuits
        vals = [value(p) for p in pairs.values()]
        nulls = [v for v in (null(p) for p in pairs.values()) if v is not None]
        out[q] = {"value": float(np.nanmean(vals)), "ci": t_interval(vals), "n_pairs": len(vals),
                  "null_mean": float(np.nanmean(nulls)) if nulls else None,
                  "recurs": bool(all(beats(p) for p in pairs.values())), "per_pair": vals}
    same = [float(np.mean([a == b for a, b in p["probe_best_site"].values()])) for p in pairs.values()
            if p.get("probe_best_site")]
    if same:
        out["probe_best_site"] = {"value": float(np.mean(same)), "ci": t_interval(same), "n_pairs": len(same),
                                  "per_pair": same}
    return out


def lookup_recurrence(models: list[ModelProfile]) -> dict[str, Any] | None:
    """Do step 7's lookup results recur? Per model its best layer (highest hidden-attention induction score), that
    score and the knockout accuracy drop there (against the random-source control); whether every model has a
    lookup layer (score >= ``LOOKUP_THRESHOLD``) and it is the same one. Means with t-intervals over the models."""
    with_lookup = [m for m in models if m.lookup]
    if len(with_lookup) < 2:
        return None
    per = {m.name: {"best_layer": int(m.lookup["best_layer"]),
                    "lookup_layer": m.lookup["lookup_layer"],
                    "induction_score": m.lookup["layers"][m.lookup["best_layer"]]["induction_score"],
                    "knockout_drop": m.lookup["layers"][m.lookup["best_layer"]]["knockout_drop"]["value"],
                    "control_drop": m.lookup["layers"][m.lookup["best_layer"]]["knockout_control_drop"]["value"],
                    "peak_offset": {int(i): [v["peak_offset"], v["peak_offset_share"]]
                                    for i, v in m.lookup["layers"].items()}}
           for m in with_lookup}
    layers = {v["lookup_layer"] for v in per.values()}
    scores = [v["induction_score"] for v in per.values()]
    drops = [v["knockout_drop"] for v in per.values()]
    return {"per_model": per, "threshold": LOOKUP_THRESHOLD,
            "with_lookup_layer": sum(v["lookup_layer"] is not None for v in per.values()),
            "recurs": bool(None not in layers and len(layers) == 1),
            "induction_score": {"value": float(np.mean(scores)), "ci": t_interval(scores)},
            "knockout_drop": {"value": float(np.mean(drops)), "ci": t_interval(drops),
                              "control_mean": float(np.mean([v["control_drop"] for v in per.values()]))},
            "n_models": len(with_lookup)}


def probe_scores(models: list[ModelProfile]) -> dict[str, dict[str, float | None]]:
    """{variable: {model: its best k-sparse probe's held-out score (None: not probed)}}."""
    names = sorted({v for m in models for v in m.probes.get("best", {})})
    return {v: {m.name: m.probes.get("best", {}).get(v, {}).get("score") for m in models} for v in names}


def _figure(ctx: StepContext, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in ("seeds", "sizes") if results.get(g)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.8), layout="constrained", squeeze=False)
    for ax, g in zip(axes[0], groups):
        for pair, res in results[g]["pairs"].items():
            keys = sorted(res["cka"], key=lambda k: int(k[6:]))
            vals = [res["cka"][k]["value"] for k in keys]
            # a percentile interval need not contain the point estimate: clip the bars at it
            err = np.maximum(np.array([[v - res["cka"][k]["ci"][0], res["cka"][k]["ci"][1] - v]
                                       for k, v in zip(keys, vals)]).T, 0.0)
            ax.errorbar(range(len(keys)), vals, yerr=err, marker="o", capsize=3, label=pair)
            nulls = [res["cka"][k].get("random_init", {}).get("value") for k in keys]
            if all(n is not None for n in nulls):
                ax.plot(range(len(keys)), nulls, ls=":", color="grey")
        ax.set(title=f"CKA across {g} (dotted: random-init null)", xlabel="residual stream (0 = embeddings)",
               ylabel="debiased linear CKA", ylim=(-0.05, 1.05))
        ax.legend(fontsize=6)
    ctx.save_figure(fig, "cka_across_models")


def _fmt(q: dict[str, Any], null: str) -> str:
    verdict = "every pair beats it" if q["recurs"] else "not every pair beats it"
    null_mean = "n/a" if q["null_mean"] is None else f"{q['null_mean']:.3f}"
    return f"{q['value']:.3f} [{q['ci'][0]:.3f}, {q['ci'][1]:.3f}] vs {null} {null_mean} ({verdict})"


def _reading(results: dict[str, dict], profiles: list[ModelProfile]) -> str:
    parts = [f"{len(profiles)} models of the family measured on the same {profiles[0].streams[0].shape[0]} tokens."]
    for g in ("seeds", "sizes"):
        res = results.get(g)
        if not res:
            continue
        s = res["summary"]
        parts.append(f"Across {g} ({s['representations_cka_last']['n_pairs']} pairs): last-stream CKA "
                     f"{_fmt(s['representations_cka_last'], 'random-init model')}; SAE-feature MPPC "
                     f"{_fmt(s['features_mppc'], 'rotation null')}; decoder MMCS after Procrustes "
                     f"{_fmt(s['features_mmcs'], 'random rotations')}.")
        if "probe_sites_jaccard" in s:
            parts.append(f"Probes: Jaccard of the sites that decode each variable (score >= "
                         f"{next(iter(res['pairs'].values()))['probe_sites']['threshold']}) "
                         f"{_fmt(s['probe_sites_jaccard'], 'random cells')}")
            if "probe_supports_jaccard" in s:
                parts[-1] += (f"; Jaccard of the k-sparse supports at the first model's best site (variables both "
                              f"decode there) after matching dimensions "
                              f"{_fmt(s['probe_supports_jaccard'], 'random supports')}")
            if "probe_best_site" in s:
                b = s["probe_best_site"]
                parts[-1] += (f"; the best site agrees for {b['value']:.0%} [{b['ci'][0]:.0%}, {b['ci'][1]:.0%}] of "
                              "the variables")
            parts[-1] += "."
        if "circuit_sites_jaccard" in s:
            parts.append("Circuits (step 5's, per model): Jaccard of their (layer, hook, position class) sites "
                         f"{_fmt(s['circuit_sites_jaccard'], 'random sites')}.")
        cr = s.get("circuit")
        if cr:
            each = "; ".join(f"{n}: {', '.join(f'L{a} {h}@{c}' for a, h, c in v['sites'])} ({v['channels']} "
                             f"channels), held-out sufficiency {v['sufficiency']:.2f} [{v['sufficiency_ci'][0]:.2f}, "
                             f"{v['sufficiency_ci'][1]:.2f}] vs random {v['random_sufficiency_mean']:.2f}"
                             for n, v in cr["per_model"].items())
            ms = cr["sufficiency"]
            parts.append(f"{each}; mean sufficiency {ms['value']:.2f} [{ms['ci'][0]:.2f}, {ms['ci'][1]:.2f}]"
                         + (", every circuit beats its random circuits (p < 0.05)." if cr["beats_random"] else
                            ", not every circuit beats its random circuits."))
        lk = s.get("lookup")
        if lk:
            def where(v: dict) -> str:
                return ", ".join(f"L{i} {o:+d} ({sh:.0%})" for i, (o, sh) in v["peak_offset"].items())
            each = "; ".join(f"{n}: layer {v['best_layer']}, score {v['induction_score']:.2f}, knockout drop "
                             f"{v['knockout_drop']:.2f}, row peak vs p + 1 {where(v)}"
                             for n, v in lk["per_model"].items())
            parts.append(f"Lookup (step 7's measures, best layer per model): {each}. "
                         f"{lk['with_lookup_layer']} of {lk['n_models']} models have a layer whose hidden attention "
                         f"peaks at p + 1 for >= {lk['threshold']:.0%} of queries"
                         + (" and it is the same layer in all." if lk["recurs"] else
                            ", so this lookup does not recur across them."))
    scores = probe_scores(profiles)
    if scores:
        parts.append("Best k-sparse probe score per variable (" + ", ".join(p.name for p in profiles) + "): "
                     + "; ".join(f"{v} " + "/".join(f"{x:.2f}" if x is not None else "–" for x in row.values())
                                 for v, row in scores.items()) + ".")
    parts.append("Intervals are t-intervals over pairs, which share models (optimistic)."
                 + (" Not measured in this build: " + "; ".join(pending()) + "." if pending() else ""))
    return " ".join(parts)


@register_step(10, "universality", requires=(1,), title="Universality across seeds and sizes", options=Options,
               reads=("compare", "batch_size", "figures"))
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    profiles = same_family(ctx, opts.profile_settings(ctx.config.seed))
    primary = profiles[0]
    seeds = [p for p in profiles if p.role in ("primary", "seed")]
    sizes = [p for p in profiles if p.role == "size"]
    if len(seeds) < 2 and not sizes:
        raise StepSkipped("the family has no other seed or size that was trained on the same task")
    n_tokens = primary.streams[0].shape[0]
    seq_len = ctx.data(1)["batch"].seq_len
    groups = np.repeat(np.arange(n_tokens // seq_len), seq_len)
    results: dict[str, dict] = {}
    for label, pairs in (("seeds", list(combinations(seeds, 2))), ("sizes", [(primary, p) for p in sizes])):
        if not pairs:
            continue
        res = {f"{a.name}|{b.name}": pair_similarity(a, b, groups, opts, ctx.seed + 31 * k)
               for k, (a, b) in enumerate(pairs)}
        results[label] = {"pairs": res, "summary": _summary(res, f"stream{len(primary.streams) - 1}")}
        members = seeds if label == "seeds" else [primary, *sizes]
        lookup = lookup_recurrence(members)
        if lookup is not None:
            results[label]["summary"]["lookup"] = lookup
        circuits = circuit_recurrence(members)
        if circuits is not None:
            results[label]["summary"]["circuit"] = circuits
    if ctx.config.figures:
        _figure(ctx, results)
    metrics = {
        "models": [p.summary() for p in profiles],
        **results,
        "behaviour": {p.name: {k: v["accuracy"] for k, v in p.length.items()} for p in profiles},
        "probe_scores": probe_scores(profiles),
        "pending": list(pending()),
    }
    return StepResult(metrics=metrics, reading=_reading(results, profiles), data={"profiles": profiles})
