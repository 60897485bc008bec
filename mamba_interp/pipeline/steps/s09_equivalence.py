"""Step 9 (equivalence): the analysed Mamba model against a transformer trained on the same task, on the same inputs.

The transformer is the run's companion with ``arch == "transformer"`` (``pipeline/companions.py``: the zoo's GPT-2
baseline of the same task, or one named with ``--compare``); the step is skipped when there is none, when the model
has no task, or when the transformer was trained on another task.

1. Representations: layer × layer debiased linear CKA (``comparison.cka``; Kornblith et al. 2019 with the unbiased
   HSIC of Song et al. 2012) between the residual streams (``cross_model.residual_streams``: the stream entering the
   first block, then after each block) over every token of ``sequences`` sequences, with a sequence-bootstrap CI and
   a sequence-permutation null (whole sequences re-paired, positions kept aligned, so that what every sequence shares
   — position, the final trigger — is part of the null). The same matrix on RMS-normalised rows shows how much the
   large-norm positions drive it.
2. The transformer's mechanism, found from its attention patterns and confirmed by patching
   (``attention_heads``): every head's previous-token score and induction score (Olsson et al. 2022; here the
   query's attention on the answer position p + 1), then denoising patches on the answer-swap corruption of the task
   (``task.corrupt``: only the stored token X changes) — each head at every position, scored by the logit difference
   between the clean and the corrupted answer (``patch_restored``). What supplies the previous-token information
   ("the token before p + 1 was the trigger") is measured with a second corruption that removes the first trigger:
   each head, attention layer and MLP below the induction layer is patched at the answer position p + 1 only, scored
   by the log-probability of the answer; the component restoring most is the supplier, whether or not it is a
   previous-token head by its attention pattern.
3. Influence by distance (step 8's ``temporal_causality.influence_on_answer``: ‖∂ log p(answer) / ∂ token
   embedding‖ per source position; for GPT-2 through its embedding module) for both models at 1×, 4× and 16× the
   training length, with accuracy at each length: the extrapolation gap and whether each model still draws on the
   answer position at long range (``top_source_hit``: the most influential earlier position is the trigger p or the
   answer p + 1; exact binomial CI).
4. SAE features: a TopK SAE per model on the last residual stream (``cross_model.sae_features``, shared settings),
   MPPC (Wang et al. 2024) of the Mamba features against the transformer's and back, each against a random-rotation
   null of the other side's latent space; raw residual dimensions ("neurons") as the baseline and a second SAE seed
   on the Mamba model as the skyline.

5. The Mamba side of the mechanism, beside the transformer's: step 7's lookup measures at every Mamba layer
   (``profiles.lookup_layers``: does the final query's hidden-attention row peak at p + 1, and how much accuracy is
   lost when that one source → query entry is knocked out, against a random source) — where the Mamba model reads
   the answer back, as the induction heads' attention on p + 1 and their patching do for the transformer.

6. The Mamba circuit of step 5 beside the transformer's heads, when ``mamba_interp.circuits`` is part of the build
   (``profiles.circuit_profile``: the AtP-grown, patching-pruned circuit and its held-out sufficiency against random
   circuits of the same layout, as steps 5 and 6 measure it): at which (layer, hook, position class) sites the
   Mamba model carries what the transformer's heads do. Without the module, ``pending`` says so.

Metrics: ``transformer``, ``cka`` (``matrix``, ``ci``, ``p_value``, ``null_mean``, ``rms_normalised``,
``best_match``), ``transformer_heads`` (``{"L.H": {"induction_score", "prev_token_score", "value_trigger_score",
"patch_restored", "patch_restored_ci", "prev_info_restored"}}``), ``induction_heads``, ``previous_token_heads``,
``previous_token_supplier``, ``components`` (attention/MLP patches), ``answer_location`` (the residual stream
after each block restored at p + 1 or at the query: where the transformer keeps the answer), ``length`` (per model
and length: accuracy with CI, top-source hit with CI, answer share, influence by distance),
``card_accuracy_by_seq_len`` (both zoo cards' reference numbers), ``features`` (MPPC both ways with nulls,
baseline, skyline), ``mamba_lookup`` (per Mamba layer: ``induction_score``, ``peak_offset`` and its share,
``knockout_drop`` and ``knockout_control_drop`` with CIs; ``best_layer``, ``lookup_layer``), ``mamba_circuit``
(sites, size, held-out sufficiency with CI, random-circuit mean and p-value; None without the circuits module),
``pending``. Files: ``cka.json``, ``head_scores.safetensors``, ``influence.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mamba_interp import attention_heads as AH
from mamba_interp import comparison as C
from mamba_interp import cross_model as XM
from mamba_interp import temporal_causality as TC
from mamba_interp.pipeline.companions import (
    Companion,
    no_companions_reason,
    resolve_companions,
)
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.profiles import (
    LOOKUP_THRESHOLD,
    ProfileSettings,
    check_options,
    circuit_profile,
    lookup_layers,
    pending,
)
from mamba_interp.pipeline.registry import StepSkipped, register_step
from mamba_interp.stats import estimate


@dataclass(frozen=True)
class Options:
    sequences: int = 128
    """Sequences of step 1's batch (all their tokens) for CKA, head scores, patching and SAE features."""
    permutations: int = 100
    """Sequence permutations per CKA cell (the null)."""
    bootstrap: int = 200
    """Bootstrap resamples for CIs (CKA: whole sequences; patching: examples)."""
    length_multiples: tuple[int, ...] = (1, 4, 16)
    """Lengths (multiples of the task's training length) for accuracy and influence."""
    long_sequences: int = 32
    """Fresh sequences per length for accuracy and influence."""
    sae_expansion: int = 4
    sae_k: int = 8
    sae_steps: int = 500
    rotations: int = 20
    """Random rotations in the MPPC null."""
    head_threshold: float = 0.5
    """A head counts as an induction / previous-token head when its score is at least this."""

    def __post_init__(self) -> None:
        check_options(self, ("sequences", "permutations", "bootstrap", "long_sequences", "sae_expansion", "sae_k",
                             "sae_steps", "rotations"))
        if self.sequences < 4:
            raise ValueError(f"sequences={self.sequences} must be >= 4 (debiased CKA needs 4 samples)")
        if not 0 < self.head_threshold <= 1:
            raise ValueError(f"head_threshold={self.head_threshold} must be in (0, 1]")


def pick_transformer(ctx: StepContext) -> Companion:
    """The run's transformer companion trained on the analysed model's task, or StepSkipped saying why not."""
    if ctx.source.task is None:
        raise StepSkipped("needs a task model: the Mamba model and the transformer are compared on the same task")
    found = [c for c in resolve_companions(ctx.source, ctx.config.compare) if c.is_transformer]
    if not found:
        raise StepSkipped(no_companions_reason(ctx.source, "transformer"))
    same = [c for c in found if (c.task, c.task_params) == (ctx.source.task, ctx.source.task_params)]
    if not same:
        raise StepSkipped(f"the transformer companion(s) {', '.join(c.name for c in found)} were trained on another "
                          f"task than {ctx.source.task!r} {ctx.source.task_params}")
    return same[0]


def _flat(streams: list[torch.Tensor]) -> list[np.ndarray]:
    return [s.reshape(-1, s.shape[-1]).double().numpy() for s in streams]


def _rms(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x**2).mean(1, keepdims=True) + 1e-12)


def cka_comparison(xs: list[np.ndarray], ys: list[np.ndarray], groups: np.ndarray, opts: Options, seed: int
                   ) -> dict[str, Any]:
    """Every (Mamba layer, transformer layer) CKA with CI and null; the best transformer match per Mamba layer."""
    n_x, n_y = len(xs), len(ys)
    mat, lo, hi = np.zeros((n_x, n_y)), np.zeros((n_x, n_y)), np.zeros((n_x, n_y))
    pval, null_mean, null_q95 = np.zeros((n_x, n_y)), np.zeros((n_x, n_y)), np.zeros((n_x, n_y))
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            est = C.bootstrap_indices(C.GroupedLinearCKA(x, y, groups), len(np.unique(groups)),
                                      n_resamples=opts.bootstrap, seed=seed + 7 * i + j)
            test = C.cka_permutation_test(x, y, n_permutations=opts.permutations, seed=seed + 11 * i + j,
                                          groups=groups).to_dict()
            mat[i, j], lo[i, j], hi[i, j] = est.value, est.ci_low, est.ci_high
            pval[i, j], null_mean[i, j], null_q95[i, j] = test["p_value"], test["null_mean"], test["null_q95"]
    rms = C.cka_matrix([_rms(x) for x in xs], [_rms(y) for y in ys])
    return {"matrix": mat.tolist(), "ci_low": lo.tolist(), "ci_high": hi.tolist(), "p_value": pval.tolist(),
            "null_mean": null_mean.tolist(), "null_q95": null_q95.tolist(), "rms_normalised": rms.tolist(),
            "best_match": [int(np.argmax(r)) for r in mat], "n_tokens": int(xs[0].shape[0]),
            "n_sequences": int(len(np.unique(groups))), "null": "sequence permutation"}


def _logit_diff(answer: torch.Tensor, wrong: torch.Tensor):
    def metric(logits: torch.Tensor, index: slice) -> torch.Tensor:
        last = logits[:, -1].float()
        rows = torch.arange(last.shape[0], device=last.device)
        return last[rows, answer[index].to(last.device)] - last[rows, wrong[index].to(last.device)]
    return metric


def _answer_logprob(answer: torch.Tensor):
    def metric(logits: torch.Tensor, index: slice) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, -1].float(), -1)
        return logp[torch.arange(logp.shape[0], device=logp.device), answer[index].to(logp.device)]
    return metric


def remove_trigger(batch: Any, vocab_size: int, seed: int) -> torch.Tensor:
    """The batch's tokens with the first trigger (position p) replaced by a random content token."""
    rng = np.random.default_rng([int(seed), 5])
    tokens = batch.tokens.clone()
    rows = torch.arange(len(batch))
    tokens[rows, batch.metadata["trigger_pos"]] = torch.as_tensor(rng.integers(1, vocab_size - 1, len(batch)))
    return tokens


def transformer_mechanism(baseline: Any, batch: Any, task: Any, opts: Options, seed: int) -> dict[str, Any]:
    """Head scores and the two patching experiments (see the module docstring)."""
    meta = batch.metadata
    patterns = AH.attention_patterns(baseline, batch.tokens)
    prev = AH.previous_token_score(patterns)
    has_positions = all(k in meta for k in ("query_pos", "value_pos", "trigger_pos"))
    if has_positions:
        ind = AH.induction_score(patterns, meta["query_pos"], meta["value_pos"])
        value_trigger = AH.position_score(patterns, meta["value_pos"], meta["trigger_pos"])
    else:
        ind, value_trigger = AH.duplicate_shift_score(patterns, batch.tokens), None
    n_layer, n_head = prev.shape
    heads = [("head", layer, h) for layer in range(n_layer) for h in range(n_head)]
    layers = [(kind, layer) for layer in range(n_layer) for kind in ("attn", "mlp")]
    out: dict[str, Any] = {"scores": {"prev_token": prev, "induction": ind}}
    table: dict[str, dict[str, Any]] = {}
    for comp in heads:
        key = AH.component_label(comp)
        table[key] = {"induction_score": float(ind[comp[1], comp[2]]),
                      "prev_token_score": float(prev[comp[1], comp[2]])}
        if value_trigger is not None:
            table[key]["value_trigger_score"] = float(value_trigger[comp[1], comp[2]])
    if not hasattr(task, "corrupt") or "answer" not in meta:
        out["heads"] = table
        return out
    corrupt = task.corrupt(batch, seed)
    swap = AH.patch_components(baseline, batch.tokens, corrupt.tokens, _logit_diff(meta["answer"],
                               corrupt.metadata["answer"]), heads + layers)
    components: dict[str, Any] = {}
    for comp in heads + layers:
        est = AH.restored_fraction(swap["patched"][comp], swap["clean"], swap["corrupt"], opts.bootstrap, seed)
        if comp[0] == "head":
            table[AH.component_label(comp)].update(patch_restored=est.value, patch_restored_ci=list(est.ci))
        else:
            components[AH.component_label(comp)] = {"answer_swap_restored": est.to_dict()}
    out["answer_swap"] = {"clean_logit_diff": float(swap["clean"].mean()),
                          "corrupt_logit_diff": float(swap["corrupt"].mean())}
    if has_positions:  # where the answer is stored: the residual stream after each block, at p + 1 or at the query
        blocks = [("block", layer) for layer in range(n_layer)]
        where: dict[str, Any] = {}
        for pos_name in ("value_pos", "query_pos"):
            res = AH.patch_components(baseline, batch.tokens, corrupt.tokens, _logit_diff(
                meta["answer"], corrupt.metadata["answer"]), blocks, positions=meta[pos_name])
            where[pos_name] = {f"block{c[1]}": AH.restored_fraction(res["patched"][c], res["clean"], res["corrupt"],
                                                                     opts.bootstrap, seed).to_dict() for c in blocks}
        out["answer_location"] = where
    if has_positions:
        ind_layer = max(range(n_layer), key=lambda layer: float(ind[layer].max()))
        below = [c for c in heads if c[1] < ind_layer] + [c for c in layers if c[1] < ind_layer]
        if below:
            removed = remove_trigger(batch, task.vocab_size, seed)
            rem = AH.patch_components(baseline, batch.tokens, removed, _answer_logprob(meta["answer"]), below,
                                      positions=meta["value_pos"])
            for comp in below:
                est = AH.restored_fraction(rem["patched"][comp], rem["clean"], rem["corrupt"], opts.bootstrap, seed)
                if comp[0] == "head":
                    table[AH.component_label(comp)].update(prev_info_restored=est.value,
                                                           prev_info_restored_ci=list(est.ci))
                else:
                    components.setdefault(AH.component_label(comp), {})["prev_info_restored"] = est.to_dict()
            out["trigger_removal"] = {"clean_logprob": float(rem["clean"].mean()),
                                      "corrupt_logprob": float(rem["corrupt"].mean()), "patched_at": "value_pos"}
        out["induction_layer"] = ind_layer
    out["heads"], out["components"] = table, components
    return out


def _distance_bins(profile: torch.Tensor, n_bins: int = 8) -> dict[str, float]:
    """Influence shares by distance from the query, summed over log-spaced distance bins ("lo-hi" tokens)."""
    length = profile.shape[0]
    edges = np.unique(np.round(np.geomspace(1, max(length, 2), n_bins + 1)).astype(int))
    prof = profile.double().numpy()
    return {f"{lo}-{hi - 1}": float(prof[lo:hi].sum()) for lo, hi in zip(edges[:-1], edges[1:]) if lo < length}


def influence_at_lengths(models: dict[str, Any], task: Any, opts: Options, seed: int, batch_size: int
                         ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Accuracy and input influence (``temporal_causality.influence_on_answer`` w.r.t. the token embedding) of each
    model at each length multiple: top-source hit, the share of influence on {p, p + 1}, influence by distance."""
    base = task.seq_len
    out: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for mult in opts.length_multiples:
        length = base * mult
        batch = task.sample(opts.long_sequences, seed + mult, seq_len=length, split="test")
        lookup = TC.lookup_positions(batch)
        for name, model in models.items():
            if XM.is_transformer(model) and length > model.n_positions:
                continue
            scores = XM.example_scores(model, batch, batch_size)
            src = XM.embedding_source(model)
            infl = TC.influence_on_answer(model, batch, sources=(src,), lookup=lookup,
                                          batch_size=max(1, batch_size // mult))[src]  # (b, l)
            last = lookup.column(-1)
            row = {"accuracy": float(scores["hits"].sum() / max(scores["scored"].sum(), 1)),
                   "accuracy_ci": list(estimate(scores["correct"], seed=seed).ci),
                   "loss": float(scores["loss"].mean()), "n": len(batch),
                   "by_distance": _distance_bins(TC.influence_profile(infl[:, None], last.query))}
            if last.source is not None:
                _, hits = TC.top_source_hit(model, batch, lookup=lookup, influence=infl)
                shares = TC.class_shares(infl, TC.position_classes(last, length))
                row["top_source_hit"] = {**estimate(hits.double().numpy(), seed=seed).to_dict(),
                                         "ci": TC.proportion_ci(hits.numpy())}
                row["answer_share"] = estimate(shares["source"] + shares.get("trigger", 0.0), seed=seed).to_dict()
            out.setdefault(name, {})[f"{mult}x"] = row
            tensors[f"{name}.{mult}x"] = infl
    return out, tensors


def feature_similarity(xm: np.ndarray, xt: np.ndarray, train_m: np.ndarray, train_t: np.ndarray, opts: Options,
                       seed: int) -> dict[str, Any]:
    """MPPC of SAE features both ways with rotation nulls, the neuron baseline and a second-seed skyline."""
    def sae(train, evaluate_on, s):
        feats, metrics, _ = XM.sae_features(torch.from_numpy(train), torch.from_numpy(evaluate_on),
                                            opts.sae_expansion, opts.sae_k, opts.sae_steps, s)
        return XM.live_features(feats).double().numpy(), metrics

    fm, met_m = sae(train_m, xm, seed)
    ft, met_t = sae(train_t, xt, seed)
    fm2, _ = sae(train_m, xm, seed + 1)
    if fm.shape[1] == 0 or ft.shape[1] == 0:
        return {"note": "an SAE has no live feature (>= 20 activations)", "sae": {"mamba": met_m, "transformer": met_t}}
    m2t = C.rotation_test(C.mppc, fm, ft, n_rotations=opts.rotations, seed=seed).to_dict()
    t2m = C.rotation_test(C.mppc, ft, fm, n_rotations=opts.rotations, seed=seed + 1).to_dict()
    return {
        "mppc_mamba_to_transformer": m2t, "mppc_transformer_to_mamba": t2m,
        "neuron_baseline": {"mamba_to_transformer": C.mppc(xm, xt), "transformer_to_mamba": C.mppc(xt, xm)},
        "skyline_mamba_sae_seeds": C.mppc(fm, fm2) if fm2.shape[1] else float("nan"),
        "live_features": {"mamba": int(fm.shape[1]), "transformer": int(ft.shape[1])},
        "sae": {"mamba": met_m, "transformer": met_t},
    }


def _figures(ctx: StepContext, cka: dict, mech: dict, length: dict, names: tuple[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for ax, key, title in ((axes[0], "matrix", "debiased linear CKA"), (axes[1], "rms_normalised",
                                                                       "CKA, RMS-normalised rows")):
        m = np.array(cka[key])
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set(title=title, xlabel=f"{names[1]} stream (0 = embeddings)", ylabel=f"{names[0]} stream")
        fig.colorbar(im, ax=ax, fraction=0.04)
    ctx.save_figure(fig, "cka")
    scores = mech["scores"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for ax, key in zip(axes, ("prev_token", "induction")):
        m = scores[key].numpy()
        im = ax.imshow(m, vmin=0, vmax=1, cmap="magma")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set(title=f"{key.replace('_', '-')} score", xlabel="head", ylabel="layer")
        fig.colorbar(im, ax=ax, fraction=0.05)
    ctx.save_figure(fig, "head_scores")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for name, rows in length.items():
        mults = sorted(rows, key=lambda k: int(k[:-1]))
        axes[0].plot([int(k[:-1]) for k in mults], [rows[k]["accuracy"] for k in mults], "o-", label=name)
        for k in mults:
            d = rows[k]["by_distance"]
            centres = [np.sqrt(float(a) * float(b)) for a, b in (key.split("-") for key in d)]
            axes[1].plot(centres, list(d.values()), "o-" if k == "1x" else "s--", label=f"{name} {k}")
    axes[0].set(xscale="log", xlabel="length / training length", ylabel="accuracy", ylim=(0, 1.05),
                title="length generalisation")
    axes[1].set(xscale="log", xlabel="distance from the query (tokens, log-spaced bins)",
                ylabel="share of input influence per bin",
                title="influence by distance")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6)
    ctx.save_figure(fig, "influence")


def _reading(names: tuple[str, str], cka: dict, mech: dict, length: dict, feats: dict, opts: Options,
             card_acc: dict[str, dict], task_len: int, mamba_lookup: dict | None = None,
             mamba_circuit: dict | None = None) -> str:
    m_name, t_name = names
    mat = np.array(cka["matrix"])
    last = mat.shape[0] - 1
    j = cka["best_match"][last]
    parts = [f"Mamba {m_name!r} vs transformer {t_name!r} on {cka['n_sequences']} shared sequences "
             f"({cka['n_tokens']} tokens). Debiased linear CKA of the last Mamba stream peaks at transformer stream "
             f"{j}: {mat[last, j]:.3f} [{cka['ci_low'][last][j]:.3f}, {cka['ci_high'][last][j]:.3f}] against a "
             f"sequence-permutation null of {cka['null_mean'][last][j]:.3f} (p = {cka['p_value'][last][j]:.3g}); "
             f"the highest cell is Mamba stream {np.unravel_index(mat.argmax(), mat.shape)[0]} vs transformer "
             f"stream {np.unravel_index(mat.argmax(), mat.shape)[1]} ({mat.max():.3f})."]
    heads = mech.get("heads", {})
    ind = [k for k, v in heads.items() if v["induction_score"] >= opts.head_threshold]
    if ind:
        def head(k: str) -> str:
            h = heads[k]
            patch = (f", patch restores {h['patch_restored']:.2f} [{h['patch_restored_ci'][0]:.2f}, "
                     f"{h['patch_restored_ci'][1]:.2f}]" if "patch_restored" in h else "")
            return f"{k} ({h['induction_score']:.3f}{patch})"
        desc = ", ".join(head(k) for k in ind)
        parts.append(f"Induction heads (query's attention on p + 1 >= {opts.head_threshold}): {desc}.")
    else:
        best = max(heads, key=lambda k: heads[k]["induction_score"]) if heads else None
        if best:
            parts.append(f"No head reaches induction score {opts.head_threshold}; the best is {best} "
                         f"({heads[best]['induction_score']:.3f}).")
    layer_attn = mech.get("components", {}).get(f"attn{mech.get('induction_layer', -1)}", {})
    if "answer_swap_restored" in layer_attn:
        e = layer_attn["answer_swap_restored"]
        parts.append(f"Patching all of layer {mech['induction_layer']}'s attention (its heads together) restores "
                     f"{e['value']:.2f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}] of the logit difference.")
    where = mech.get("answer_location")
    if where:
        first = "block0"
        v, q = where["value_pos"][first], where["query_pos"][first]
        parts.append(f"The answer lives in the residual stream at p + 1: restoring the stream after block 0 there "
                     f"restores {v['value']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}] of the logit difference, at the "
                     f"query only {q['value']:.2f}; attention moves it to the query.")
    sup = mech.get("previous_token_supplier")
    if sup:
        prev_heads = mech.get("previous_token_heads") or []
        how = (f"previous-token head(s) {', '.join(prev_heads)} (score >= {opts.head_threshold})" if prev_heads else
               f"no head has a previous-token score >= {opts.head_threshold} (best "
               f"{max(v['prev_token_score'] for v in heads.values()):.3f})")
        name = f"head {sup['component']}" if "." in sup["component"] else sup["component"]
        attends = (f" (its attention from p + 1 to p is {sup['value_trigger_score']:.3f})"
                   if sup.get("value_trigger_score") is not None else "")
        others = [f"head {k} {v['prev_info_restored']:.2f}" for k, v in heads.items()
                  if "prev_info_restored" in v and k != sup["component"]]
        others += [f"{k} {v['prev_info_restored']['value']:.2f}" for k, v in mech.get("components", {}).items()
                   if "prev_info_restored" in v and k != sup["component"]]
        parts.append(f"Previous-token information: {how}; patched at p + 1 after removing the first trigger, {name} "
                     f"restores {sup['restored']:.2f} [{sup['ci'][0]:.2f}, {sup['ci'][1]:.2f}] of the answer's "
                     f"log-probability{attends}, so it supplies 'the token before p + 1 was the trigger' (others: "
                     f"{', '.join(others)}).")
    if mamba_lookup:
        layer = str(mamba_lookup["best_layer"])
        row = mamba_lookup["layers"][layer]
        ko, ctrl = row["knockout_drop"], row["knockout_control_drop"]
        others = ", ".join(f"layer {i} {v['induction_score']:.2f}" for i, v in mamba_lookup["layers"].items()
                           if i != layer)
        measured = (f"the final query's hidden-attention row peaks at p + 1 for {row['induction_score']:.0%} of "
                    f"sequences ({others}), and knocking out that one p + 1 → query entry there costs "
                    f"{ko['value']:.2f} [{ko['ci'][0]:.2f}, {ko['ci'][1]:.2f}] accuracy (a random source: "
                    f"{ctrl['value']:.2f})")
        if mamba_lookup["lookup_layer"] is not None:
            parts.append(f"Mamba reads the answer back in layer {layer}: {measured} — it reads what the SSM state "
                         "took in at p + 1, the position the transformer's induction heads attend to.")
        else:
            parts.append(f"No Mamba layer's hidden attention peaks at p + 1 for >= {LOOKUP_THRESHOLD:.0%} of "
                         f"sequences; in the best, layer {layer}, {measured}.")
    if mamba_circuit and "sites" in mamba_circuit:
        c = mamba_circuit
        parts.append(f"Step 5's Mamba circuit: {', '.join(f'L{a} {h}@{k}' for a, h, k in c['sites'])} "
                     f"({c['channels']} channels) restores {c['sufficiency']:.2f} [{c['sufficiency_ci'][0]:.2f}, "
                     f"{c['sufficiency_ci'][1]:.2f}] of the logit difference on held-out sequences (random circuits "
                     f"of the same layout {c['random_sufficiency_mean']:.2f}, p = {c['p_value']:.3g}).")
    acc = {name: {k: v["accuracy"] for k, v in rows.items()} for name, rows in length.items()}
    longest = f"{max(opts.length_multiples)}x"
    if all(longest in a for a in acc.values()):
        hits = []
        for name, rows in length.items():
            hit = rows[longest].get("top_source_hit")
            ci = rows[longest]["accuracy_ci"]
            hits.append(f"{name} {rows[longest]['accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" + (
                f" (top-source hit {hit['value']:.2f} [{hit['ci'][0]:.2f}, {hit['ci'][1]:.2f}] vs "
                f"{rows['1x']['top_source_hit']['value']:.2f} at 1x)" if hit and "1x" in rows else ""))
        parts.append(f"At {longest} the training length ({opts.long_sequences} sequences), accuracy: "
                     f"{'; '.join(hits)}.")
        cards = {n: c.get(str(16 * task_len)) for n, c in card_acc.items() if c}
        if len(cards) == 2 and all(v is not None for v in cards.values()):
            parts.append("The zoo cards (1000 sequences at 16x) report " + " vs ".join(
                f"{n} {v:.3f}" for n, v in cards.items()) + ".")
    if "mppc_mamba_to_transformer" in feats:
        a, b = feats["mppc_mamba_to_transformer"], feats["mppc_transformer_to_mamba"]
        parts.append(f"SAE features: MPPC Mamba→transformer {a['observed']:.3f} (rotation null {a['null_mean']:.3f}, "
                     f"p = {a['p_value']:.3g}), transformer→Mamba {b['observed']:.3f} (null {b['null_mean']:.3f}); "
                     f"raw dimensions give {feats['neuron_baseline']['mamba_to_transformer']:.3f}, a second Mamba SAE "
                     f"seed {feats['skyline_mamba_sae_seeds']:.3f}.")
    return " ".join(parts)


@register_step(9, "equivalence", requires=(1,), title="Mamba vs transformer: representations and mechanisms",
               options=Options, reads=("compare", "batch_size", "figures"))
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    comp = pick_transformer(ctx)
    d1 = ctx.data(1)
    task = d1["task"]
    batch = d1["batch"].select(slice(0, opts.sequences))
    heldout = d1["heldout"].select(slice(0, opts.sequences)) if d1.get("heldout") is not None else batch
    baseline = comp.load().to(ctx.device)
    names = (ctx.source.name, comp.name)
    if task.vocab_size > baseline.config.vocab_size or batch.seq_len > baseline.n_positions:
        raise StepSkipped(f"the transformer {comp.name!r} cannot read this task's sequences")
    groups = np.repeat(np.arange(len(batch)), batch.seq_len)
    xs = _flat(XM.residual_streams(ctx.model, batch.tokens, ctx.batch_size))
    ys = _flat(XM.residual_streams(baseline, batch.tokens, ctx.batch_size))
    cka = cka_comparison(xs, ys, groups, opts, ctx.seed)
    mech = transformer_mechanism(baseline, batch, task, opts, ctx.seed)
    heads = mech.get("heads", {})
    mech["induction_heads"] = [k for k, v in heads.items() if v["induction_score"] >= opts.head_threshold]
    mech["previous_token_heads"] = [k for k, v in heads.items() if v["prev_token_score"] >= opts.head_threshold]
    cands = {k: (v["prev_info_restored"], v["prev_info_restored_ci"], v.get("value_trigger_score"))
             for k, v in heads.items() if "prev_info_restored" in v}
    # single components only (heads and MLPs): a whole attention layer is their sum, reported beside them
    cands.update({k: (v["prev_info_restored"]["value"], v["prev_info_restored"]["ci"], None)
                  for k, v in mech.get("components", {}).items() if "prev_info_restored" in v
                  and not k.startswith("attn")})
    if cands:
        best = max(cands, key=lambda k: cands[k][0])
        mech["previous_token_supplier"] = {"component": best, "restored": cands[best][0], "ci": cands[best][1],
                                           "value_trigger_score": cands[best][2]}
    lookup = lookup_layers(ctx.model, batch, ctx.seed, ctx.batch_size)
    mamba_lookup = {} if not lookup else {
        "layers": {str(i): {k: v[k] for k in ("induction_score", "peak_offset", "peak_offset_share", "knockout_drop",
                                              "knockout_control_drop")} for i, v in lookup["layers"].items()},
        "best_layer": lookup["best_layer"], "lookup_layer": lookup["lookup_layer"]}
    # the run's seed and the default shared settings, as step 10's profile uses: the same circuit in both steps
    circuit = circuit_profile(ctx.model, task, batch, heldout, ProfileSettings(seed=ctx.config.seed),
                              ctx.batch_size)
    mamba_circuit = {k: v for k, v in circuit.items() if k not in ("circuit", "example_sufficiency")} or None
    if "circuit" in circuit:
        ctx.save_json("mamba_circuit", circuit["circuit"])
    length, infl = influence_at_lengths({ctx.source.name: ctx.model, comp.name: baseline}, task, opts,
                                        ctx.seed, ctx.batch_size)
    train_x = _flat(XM.residual_streams(ctx.model, heldout.tokens, ctx.batch_size))[-1]
    train_y = _flat(XM.residual_streams(baseline, heldout.tokens, ctx.batch_size))[-1]
    feats = feature_similarity(xs[-1], ys[-1], train_x, train_y, opts, ctx.seed)
    if ctx.config.figures:
        _figures(ctx, cka, mech, length, names)
    ctx.save_json("cka", cka)
    ctx.save_tensors("head_scores", {k: v.contiguous() for k, v in mech["scores"].items()})
    ctx.save_tensors("influence", infl)
    card_acc = {ctx.source.name: (ctx.source.card or {}).get("accuracy_by_seq_len"),
                comp.name: comp.card.get("accuracy_by_seq_len")}
    metrics = {
        "transformer": comp.describe(),
        "card_accuracy_by_seq_len": card_acc,
        "cka": {k: cka[k] for k in ("matrix", "ci_low", "ci_high", "p_value", "null_mean", "rms_normalised",
                                    "best_match", "n_tokens", "n_sequences", "null")},
        "transformer_heads": mech.get("heads", {}),
        "induction_heads": mech["induction_heads"],
        "previous_token_heads": mech["previous_token_heads"],
        "previous_token_supplier": mech.get("previous_token_supplier"),
        "induction_layer": mech.get("induction_layer"),
        "components": mech.get("components", {}),
        "patching": {k: mech[k] for k in ("answer_swap", "trigger_removal") if k in mech},
        "answer_location": mech.get("answer_location"),
        "length": length,
        "features": feats,
        "mamba_lookup": mamba_lookup,
        "mamba_circuit": mamba_circuit,
        "pending": list(pending()),
    }
    reading = _reading(names, cka, mech, length, feats, opts, card_acc, task.seq_len, mamba_lookup, mamba_circuit)
    return StepResult(metrics=metrics, reading=reading,
                      data={"transformer": comp, "cka": cka, "mechanism": mech})
