"""Step 12 (superposition): feature geometry, interference and dimensionality, in the toy model and in the SAEs.

1. The Toy Models of Superposition reproduction (Elhage et al. 2022, arXiv 2209.10652):
   5 features in 2 hidden dimensions, importance 0.9^i, one model per feature probability p = 1 − S
   (default S = 0, 0.8, 0.9, 0.95), ``n_init`` initialisations each, trained together (``train_toy_models``); per
   sparsity the initialisation with the lowest loss on fresh data is reported (with the geometries of all).
   Expected: dense → the two most important features orthogonal; S = 0.8 → two antipodal pairs; S ≥ 0.9 → a
   pentagon (D_i = 2/5). Per model: feature norms ‖W_i‖, dimensionality D_i, interference, D* = m/‖W‖²_F,
   biases, and a geometry label (``classify_toy``).
2. The same measures on the decoder directions of step 3's SAEs (``decoder_geometry`` over the latents alive on the
   held-out tokens, density > ``alive_density``): D_i, interference Σ_{j≠i} cos², max |cos| and dimensions per
   feature, against the same number of random unit directions in the same space (what no structure would give).

Figures: ``toy_features.png`` (the paper's arrows), ``toy_dimensionality.png``, ``toy_interference.png`` (WᵀW of
the sparsest toy model), ``sae_decoder_geometry.png`` (D_i and max |cos| histograms per SAE),
``sae_interference.png`` (cosines of one SAE's live decoder directions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import register_step
from mamba_interp.superposition import (
    ToyModels,
    angle_gaps_deg,
    decoder_geometry,
    plot_decoder_geometry,
    plot_dimensionality,
    plot_feature_arrows,
    plot_interference,
    sample_toy_batch,
    toy_forward,
    toy_geometry,
    train_toy_models,
)

REPRESENTED = 0.5  # ‖W_i‖ above this: the feature is represented (the paper's reading of the norm plots)


@dataclass(frozen=True)
class Options:
    n_features: int = 5
    n_hidden: int = 2
    sparsities: tuple[float, ...] = (0.0, 0.8, 0.9, 0.95)
    """S = 1 − feature probability; one toy model each."""
    importance: float = 0.9
    """I_i = importance^i."""
    steps: int = 2000
    lr: float = 1e-2
    batch_size: int = 1024
    n_init: int = 3
    """Independent initialisations per sparsity; the one with the lowest loss on fresh data is reported (training
    can stall in a local optimum, e.g. antipodal pairs where a pentagon is better; the counts are reported too)."""
    eval_samples: int = 20_000
    alive_density: float = 1e-4
    """SAE latents firing on more than this fraction of the held-out tokens count as alive."""

    def __post_init__(self) -> None:
        sp = self.sparsities
        if isinstance(sp, (int, float)) and not isinstance(sp, bool):
            sp = (sp,)
        if not isinstance(sp, (list, tuple)) or not sp or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s < 1 for s in sp):
            raise ValueError(f"sparsities={self.sparsities!r} must be a non-empty list of numbers in [0, 1)")
        object.__setattr__(self, "sparsities", tuple(float(s) for s in sp))
        for name in ("n_features", "n_hidden", "steps", "batch_size", "n_init", "eval_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_hidden >= self.n_features:
            raise ValueError(f"n_hidden={self.n_hidden} must be < n_features={self.n_features} for superposition")
        if not 0 < self.importance <= 1:
            raise ValueError(f"importance={self.importance!r} must be in (0, 1]")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if not 0 <= self.alive_density < 1:
            raise ValueError(f"alive_density={self.alive_density!r} must be in [0, 1)")


def classify_toy(W: Tensor, norms: Tensor) -> dict[str, Any]:
    """Geometry of a toy model W [m, n]: represented features, antipodal pairs, and (m = 2) the polygon test."""
    rep = (norms > REPRESENTED).nonzero().flatten().tolist()
    Wd = W.double()
    unit = Wd / Wd.norm(dim=0).clamp_min(1e-12)
    cos = unit.T @ unit  # (n, n)
    pairs = sum(1 for a in rep for b in rep if a < b and cos[a, b] < -0.95)
    out: dict[str, Any] = {"n_represented": len(rep), "n_antipodal_pairs": pairs, "max_abs_cos_represented": None,
                           "angle_gaps_deg": None, "max_gap_deviation_deg": None}  # same keys always: one table
    if len(rep) >= 2:
        out["max_abs_cos_represented"] = float(max(abs(float(cos[a, b])) for a in rep for b in rep if a < b))
    if W.shape[0] == 2 and len(rep) >= 3:
        gaps = angle_gaps_deg(W, rep)
        out["angle_gaps_deg"] = [round(float(g), 2) for g in gaps]
        out["max_gap_deviation_deg"] = float((gaps - 360.0 / len(rep)).abs().max())
    if len(rep) == W.shape[0] and (out["max_abs_cos_represented"] or 0.0) < 0.1:
        label = "orthogonal"
    elif pairs and 2 * pairs == len(rep):
        label = "antipodal pairs"
    elif len(rep) >= 3 and out["max_gap_deviation_deg"] is not None and out["max_gap_deviation_deg"] < 10:
        label = {3: "triangle", 4: "square", 5: "pentagon"}.get(len(rep), f"{len(rep)}-gon")
    else:
        label = "other"
    out["geometry"] = label
    return out


@register_step(12, "superposition", requires=(3,), title="Superposition: toy-model geometry and SAE decoder geometry",
               options=Options, version=1)
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    toy, losses = _train_toys(opts, ctx.seed)
    toy_metrics: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(opts.sparsities):
        g = toy_geometry(toy.W[i], toy.b[i], REPRESENTED)
        shape = classify_toy(toy.W[i], g.norms)
        rep = g.norms > REPRESENTED
        toy_metrics[f"S={s:g}"] = {
            "sparsity": s,
            **shape,
            "eval_loss": losses["best"][i],
            "init_geometries": ", ".join(f"{g} {c}" for g, c in losses["geometries"][i].items()),
            "n_init_same_geometry": losses["geometries"][i].get(shape["geometry"], 0),
            "dims_per_feature": g.dims_per_feature,
            "mean_dimensionality_represented": float(g.dimensionality[rep].mean()) if bool(rep.any()) else 0.0,
            "norms": [round(float(v), 4) for v in g.norms],
            "dimensionality": [round(float(v), 4) for v in g.dimensionality],
            "interference": [round(float(v), 4) for v in g.interference],
            "bias": [round(float(v), 4) for v in g.bias],
        }

    saes = ctx.data(3)["saes"]
    geoms, sae_metrics = {}, {}
    gen = torch.Generator().manual_seed(ctx.seed % 2**31)
    for key, t in saes.items():
        alive = t.density > opts.alive_density
        n_alive = int(alive.sum())
        if n_alive < 2:
            sae_metrics[key] = {"n_alive": n_alive}
            continue
        geo = decoder_geometry(t.sae.W_dec.detach().cpu(), alive=alive)
        d = geo.d
        rand = decoder_geometry(torch.randn(n_alive, d, generator=gen, dtype=torch.float64))
        geoms[key] = geo
        sae_metrics[key] = {
            "n_alive": n_alive, "d": d, "features_per_dim": n_alive / d,
            **{k: v for k, v in geo.to_dict().items() if k not in ("n_features", "d", "normalized")},
            "random_mean_dimensionality": rand.mean_dimensionality,
            "random_median_max_abs_cos": float(rand.max_abs_cos.median()),
            "random_mean_interference": float(rand.interference.mean()),
        }

    if ctx.config.figures:
        _figures(ctx, opts, toy, geoms, saes)
    metrics: dict[str, Any] = {"toy": toy_metrics, "sae_decoders": sae_metrics}
    artifacts = [a for a in ("toy_features.png", "toy_dimensionality.png", "toy_interference.png",
                             "sae_decoder_geometry.png", "sae_interference.png") if (ctx.out_dir / a).is_file()]
    reading = _reading(toy_metrics, sae_metrics, opts.n_features, opts.n_hidden, opts.n_init)
    return StepResult(metrics=metrics, reading=reading, artifacts=artifacts,
                      data={"toy": toy, "decoder_geometry": geoms})


def span(values: list[float], fmt: str) -> str:
    """``"lo–hi"`` of the values in format ``fmt``, or one number when both ends print the same."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def _train_toys(opts: Options, seed: int) -> tuple[ToyModels, dict[str, list]]:
    """Train ``n_init`` toy models per sparsity at once; keep, per sparsity, the one with the lowest loss on a fixed
    fresh batch. Returns the kept models (one instance per sparsity) and their losses / the geometries of all."""
    n, k = len(opts.sparsities), opts.n_init
    probs = [1.0 - s for s in opts.sparsities for _ in range(k)]
    toy = train_toy_models(opts.n_features, opts.n_hidden, probs, opts.importance, steps=opts.steps, seed=seed,
                           batch_size=opts.batch_size, lr=opts.lr)
    gen = torch.Generator().manual_seed(seed % 2**31 + 1)
    with torch.no_grad():
        x = sample_toy_batch(opts.eval_samples, toy.feature_probability, opts.n_features, gen)
        loss = (toy.importance * (x - toy_forward(toy.W, toy.b, x)).pow(2)).mean(dim=(0, 2)).view(n, k)  # (S, init)
    best = loss.argmin(1)
    keep = torch.arange(n) * k + best
    geometries = []
    for i in range(n):
        labels = [classify_toy(toy.W[i * k + j], toy.W[i * k + j].double().norm(dim=0))["geometry"] for j in range(k)]
        geometries.append({g: labels.count(g) for g in dict.fromkeys(labels)})
    kept = ToyModels(W=toy.W[keep], b=toy.b[keep], feature_probability=toy.feature_probability[keep],
                     importance=toy.importance, final_loss=loss[torch.arange(n), best])
    return kept, {"best": [float(v) for v in kept.final_loss], "geometries": geometries}


def _reading(toy: dict[str, dict], saes: dict[str, dict], n_features: int, n_hidden: int, n_init: int) -> str:
    parts = []
    desc = []
    for name, t in toy.items():
        extra = ""
        if t["geometry"] in ("pentagon", "square", "triangle") and t["max_gap_deviation_deg"] is not None:
            extra = f", angles within {t['max_gap_deviation_deg']:.0f}° of regular"
        desc.append(f"{name}: {t['n_represented']} features represented, {t['geometry']} "
                    f"(mean D_i {t['mean_dimensionality_represented']:.2f}{extra}; {t['n_init_same_geometry']} of "
                    f"{n_init} initialisations)")
    parts.append(f"Toy model ({n_features} features in {n_hidden} dimensions, lowest-loss initialisation per "
                 f"sparsity S): " + "; ".join(desc) + ".")
    live = {k: s for k, s in saes.items() if "mean_dimensionality" in s}
    if live:
        ratio = {k: s["mean_dimensionality"] / max(s["random_mean_dimensionality"], 1e-12) for k, s in live.items()}
        lo, hi = min(ratio, key=ratio.get), max(ratio, key=ratio.get)
        examples = "; ".join(f"{k}: {live[k]['mean_dimensionality']:.3f} vs {live[k]['random_mean_dimensionality']:.3f}"
                             for k in dict.fromkeys((lo, hi)))
        parts.append(
            f"SAE decoders: {span([s['features_per_dim'] for s in live.values()], '.1f')} live latents per "
            f"dimension; their mean D_i is {span(list(ratio.values()), '.2f')}x that of as many random directions "
            f"({examples}), and the median max |cos| with another latent is "
            f"{span([s['median_max_abs_cos'] for s in live.values()], '.2f')}."
        )
    dead = [k for k, s in saes.items() if "mean_dimensionality" not in s]
    if dead:
        parts.append(f"{', '.join(dead)}: fewer than two live latents, no geometry.")
    return " ".join(parts)


def _figures(ctx: StepContext, opts: Options, toy: Any, geoms: dict, saes: dict) -> None:
    titles = [f"S = {s:g}" for s in opts.sparsities]
    if opts.n_hidden == 2:
        plot_feature_arrows(list(toy.W), ctx.path("toy_features.png"), titles=titles, importance=toy.importance)
    plot_dimensionality([1.0 - s for s in opts.sparsities], list(toy.W), ctx.path("toy_dimensionality.png"),
                        title="toy model: dimensions per feature")
    plot_interference(toy.W[-1], ctx.path("toy_interference.png"), title=f"WᵀW at S = {opts.sparsities[-1]:g}")
    if geoms:
        plot_decoder_geometry(geoms, ctx.path("sae_decoder_geometry.png"))
        key = max(geoms, key=lambda k: geoms[k].n_features)
        ids = geoms[key].feature_ids
        order = ids[torch.argsort(saes[key].density[ids], descending=True)]  # most frequent latents first
        W = saes[key].sae.W_dec.detach().cpu()[order].T  # (d, n_alive): features as columns
        plot_interference(W, ctx.path("sae_interference.png"), normalize=True, max_features=128,
                          title=f"{key}: cos of the 128 most frequent live decoder directions")
