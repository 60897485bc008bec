"""Step 13 (dictionary): classical sparse dictionary learning next to step 3's SAEs.

For each chosen SAE of step 3 (default: the residual-stream ones), scikit-learn's ``MiniBatchDictionaryLearning``
(Mairal et al. 2009; ``mamba_interp.dictionary_learning.fit_dictionary``) is fitted on a seeded subset of the same
training activations, with as many atoms as the SAE has latents, non-negative codes, centred and scaled to
E‖x‖ = 1 (so ``alpha`` transfers across hooks). On a seeded subset of the same held-out tokens as step 3:

* ``compare_with_sae``: MMCS between the two dictionaries (each direction, and weighted by how often an atom is
  used), FVU and L0 of the SAE encoder and of the dictionary's lasso codes;
* ``amortisation_gap``: the SAE's own decoder used with OMP at the SAE's L0 per token (and a least-squares refit on
  the SAE's support): FVU(SAE) − FVU(OMP) > 0 is reconstruction the amortised encoder leaves on the table
  (O'Neill et al. 2024, arXiv 2411.13117).

Fit and encode times are not deterministic, so they are kept out of ``metrics``: they go to ``timings.json`` and
the reading. Figure: ``comparison_<key>.png`` per SAE (FVU and L0 bars).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import StepSkipped, register_step
from mamba_interp.pipeline.steps.s03_sae import SAE_HOOKS, _tuple_of, sae_activations
from mamba_interp.pipeline.steps.s12_superposition import span


@dataclass(frozen=True)
class Options:
    hooks: tuple[str, ...] = ("resid_post",)
    """Compare the step-3 SAEs of these hooks (at every layer step 3 trained one)."""
    alpha: float = 0.1
    """L1 weight of the dictionary fit and of its lasso encoding (activations centred, scaled to E‖x‖ = 1)."""
    n_components: int | None = None
    """Atoms; None: the SAE's number of latents."""
    fit_tokens: int = 4000
    """Training tokens the dictionary is fitted on (a seeded subset; sklearn codes every sample iteratively)."""
    eval_tokens: int = 2000
    """Held-out tokens both are evaluated on (sklearn's lasso encoding costs ~0.2 ms per token)."""
    gap_tokens: int = 2000
    """Held-out tokens for the amortisation gap (OMP on the SAE decoder)."""
    max_iter: int = 5
    batch_size: int = 256
    gap_algorithm: str = "omp"

    def __post_init__(self) -> None:
        hooks = _tuple_of(self.hooks, "hooks", str)
        bad = [h for h in hooks if h not in SAE_HOOKS]
        if not hooks or bad:
            raise ValueError(f"hooks={self.hooks!r} must name step-3 SAE hooks from {', '.join(SAE_HOOKS)}")
        object.__setattr__(self, "hooks", tuple(dict.fromkeys(hooks)))
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha!r} must be a positive number")
        for name in ("fit_tokens", "eval_tokens", "gap_tokens", "max_iter", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.n_components is not None and (not isinstance(self.n_components, int) or self.n_components < 1):
            raise ValueError(f"n_components={self.n_components!r} must be a positive integer or null")
        if self.gap_algorithm not in ("omp", "lars"):
            raise ValueError(f"gap_algorithm={self.gap_algorithm!r} must be 'omp' or 'lars'")


def _subset(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]


TIMING_KEYS = ("fit_seconds_sae", "fit_seconds_dictionary", "encode_seconds_sae", "encode_seconds_dictionary")


@register_step(13, "dictionary", requires=(3,), title="Dictionary learning vs the SAE", options=Options, version=1)
def run(ctx: StepContext) -> StepResult:
    from mamba_interp.dictionary_learning import (
        DictionaryLearningConfig,
        amortisation_gap,
        compare_with_sae,
        fit_dictionary,
        plot_comparison,
    )

    opts: Options = ctx.options or Options()
    s3 = ctx.data(3)
    chosen = {k: t for k, t in s3["saes"].items() if t.hook in opts.hooks}
    if not chosen:
        raise StepSkipped(f"step 3 trained no SAE on {', '.join(opts.hooks)}; set the dictionary hooks to some of "
                          f"{', '.join(sorted({t.hook for t in s3['saes'].values()}))}")
    hooks = tuple(dict.fromkeys(t.hook for t in chosen.values()))
    layers = tuple(sorted({t.layer for t in chosen.values()}))
    data = sae_activations(ctx, hooks, layers, s3["options"].eval_fraction)
    seed = ctx.seed % 2**31
    metrics: dict[str, Any] = {}
    timings: dict[str, dict[str, float]] = {}
    artifacts: list[str] = []
    for idx, (key, t) in enumerate(ctx.progress(list(chosen.items()), desc="dictionaries")):
        x_train = data.train.tokens(t.hook, t.layer)
        x_eval = _subset(data.eval.tokens(t.hook, t.layer), opts.eval_tokens, seed + idx)
        cfg = DictionaryLearningConfig(
            n_components=opts.n_components or t.sae.cfg.d_sae, alpha=opts.alpha, batch_size=opts.batch_size,
            max_iter=opts.max_iter, max_samples=opts.fit_tokens, center=True, normalize=True, seed=seed + idx,
        )
        dictionary = fit_dictionary(x_train, cfg)
        sae = t.sae
        comp = compare_with_sae(sae, dictionary, x_eval)
        gap = amortisation_gap(sae, data.eval.tokens(t.hook, t.layer), opts.gap_algorithm,
                               max_tokens=opts.gap_tokens, seed=seed + idx)
        c = comp.to_dict()
        timings[key] = {k: c.pop(k) for k in TIMING_KEYS}
        timings[key]["seconds_sparse_coding"] = gap.seconds_sparse_coding
        timings[key]["encode_ms_per_token_dictionary"] = 1e3 * timings[key]["encode_seconds_dictionary"] / comp.n_tokens
        timings[key]["encode_ms_per_token_sae"] = 1e3 * timings[key]["encode_seconds_sae"] / comp.n_tokens
        g = {k: v for k, v in gap.to_dict().items() if not k.startswith("seconds")}
        metrics[key] = {
            "hook": t.hook, "layer": t.layer, "atoms": cfg.n_components, "fit_tokens": dictionary.n_fit_samples,
            "fit_iterations": dictionary.n_iter,
            **{k: v for k, v in c.items() if not k.startswith("recovery")},
            **{f"gap_{k}" if not k.startswith("gap") else k: v for k, v in g.items() if k != "n_tokens"},
            "gap_tokens": gap.n_tokens,
        }
        if ctx.config.figures:
            plot_comparison(comp, gap, ctx.path(f"comparison_{key}.png"))
            artifacts.append(f"comparison_{key}.png")
    ctx.save_json("timings", timings)
    return StepResult(metrics={"alpha": opts.alpha, "comparisons": metrics},
                      reading=_reading(metrics, timings, opts), artifacts=artifacts,
                      data={"comparisons": metrics})


def _reading(m: dict[str, dict], timings: dict[str, dict], opts: Options) -> str:
    parts = []
    for key, c in m.items():
        better = "lower" if c["fvu_dictionary"] < c["fvu_sae"] else "higher"
        shared = "largely share directions" if c["mmcs_sae_to_dictionary"] >= 0.9 else "share directions only partly"
        parts.append(
            f"{key}: dictionary learning (α={opts.alpha:g}) reaches FVU {c['fvu_dictionary']:.3f} at L0 "
            f"{c['l0_dictionary']:.1f}, {better} than the SAE's {c['fvu_sae']:.3f} at L0 {c['l0_sae']:.1f}; the two "
            f"dictionaries {shared} (MMCS SAE→dictionary {c['mmcs_sae_to_dictionary']:.2f}, "
            f"usage-weighted {c['weighted_mmcs_sae_to_dictionary']:.2f}). {opts.gap_algorithm.upper()} on the SAE's "
            f"own decoder at the same L0 gives FVU {c['gap_fvu_sparse_coding']:.3f} (amortisation gap "
            f"{c['gap']:+.3f}; least squares on the SAE's support {c['gap_fvu_support_refit']:.3f})."
        )
    if timings:
        enc = [t["encode_ms_per_token_dictionary"] / max(t["encode_ms_per_token_sae"], 1e-9) for t in timings.values()]
        parts.append(
            f"In this run the lasso encoding took {span(enc, '.0f')}x the SAE encoder's time per token "
            f"(timings.json)."
        )
    return " ".join(parts)
