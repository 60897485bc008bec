"""Step 17 (spd): Stochastic Parameter Decomposition of the analysed layers' Linears.

Decomposes ``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj`` (Mamba-2: ``in_proj``, ``out_proj``) of the analysed
layers into rank-one subcomponents with per-token causal importances (Bushnaq, Braun & Sharkey 2025, arXiv
2506.20790; ``mamba_interp.parameter_decomposition``), trained on fresh sequences of the model's task (or repeated
random tokens) with KL over all positions, stochastic and subset-routed reconstruction and importance minimality.
Conv, A_log, D, biases and norms stay at the target's values.

Reports: faithfulness (accuracy / answer loss / KL of the decomposed layers with every mask 1 and with the
importance masks, against the target, at 1x and 4x the length, with bootstrap CIs), alive subcomponents and CI-L0
per token per matrix, and for task models the subcomponents most important at each position class with the task
variable their importance tracks. The decomposition is saved (``decomposition.safetensors``) for step 19 and for
notebooks (``load_decomposition``).

Too slow for the default run on 2 CPU cores (a few minutes): ``default=False``; run it with ``--steps 17``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from mamba_interp.parameter_decomposition.analysis import (
    importance_report,
    importances_on,
    length_batches,
    mode_report,
    position_report,
    training_sampler,
)
from mamba_interp.parameter_decomposition.decomposition import load_decomposition
from mamba_interp.parameter_decomposition.mamba import mamba_modules, modules_target
from mamba_interp.parameter_decomposition.spd import run_spd
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import register_step

CHECKPOINT = "decomposition.safetensors"


def as_tuple(value: Any, name: str, kind: type) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [v.strip() for v in value.split(",")] if isinstance(value, str) else [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name}={value!r} must be a non-empty list")
    try:
        return tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a list of {kind.__name__}") from None


@dataclass(frozen=True)
class Options:
    layers: tuple[int, ...] | None = None
    """Layers to decompose; None: the run's analysed layers."""
    matrices: tuple[str, ...] | None = None
    """Linears per layer; None: all of the architecture's."""
    C: int | None = None
    """Subcomponents per matrix; None: max(8, min(d_in, d_out)) for each."""
    steps: int = 800
    batch_size: int | None = None
    """Sequences per step; None: 1024 tokens per step (``1024 // train_len`` sequences, at least 1)."""
    train_len: int | None = None
    """Training sequence length; None: the longest evaluated length (``max(eval_multiples)`` x the task's). The
    causal-importance functions then see every position they are evaluated at: trained on 32 tokens of the default
    model's 64-token task, the importance masks lost 0.055 of accuracy at 4x the length (0.000 at 1x)."""
    lr: float = 2e-3
    lr_final_frac: float = 0.1
    faithfulness_coeff: float = 1e4
    faithfulness_warmup_steps: int = 200
    importance_minimality_coeff: float = 3e-3
    pnorm: float = 1.0
    stochastic_recon_coeff: float = 1.0
    layerwise_recon_coeff: float = 1.0
    ci_recon_coeff: float = 0.0
    routing: str = "subset"
    d_gate: int = 16
    n_eval: int = 256
    eval_multiples: tuple[int, ...] = (1, 4)
    alive_threshold: float = 0.5
    top_k: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", as_tuple(self.layers, "layers", int))
        object.__setattr__(self, "matrices", as_tuple(self.matrices, "matrices", str))
        object.__setattr__(self, "eval_multiples", as_tuple(self.eval_multiples, "eval_multiples", int))
        for name in ("steps", "batch_size", "n_eval", "top_k", "d_gate"):
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.C is not None and (not isinstance(self.C, int) or self.C < 1):
            raise ValueError(f"C={self.C!r} must be a positive integer or null")
        if self.train_len is not None and self.train_len < 3:
            raise ValueError(f"train_len={self.train_len!r} must be >= 3 or null")
        if any(k < 1 for k in self.eval_multiples):
            raise ValueError(f"eval_multiples={self.eval_multiples!r} must be positive")
        if not 0 < self.alive_threshold < 1:
            raise ValueError(f"alive_threshold={self.alive_threshold!r} must be in (0, 1)")
        self.spd_config(dict.fromkeys(["m"], 1))  # validates the SPD fields (lr, routing, coefficients, ...)

    def spd_config(self, C: dict[str, int], **extra: Any):
        from mamba_interp.parameter_decomposition.spd import SPDConfig

        shared = {f.name for f in fields(SPDConfig)} & {f.name for f in fields(self)}
        kwargs = {k: getattr(self, k) for k in shared if k != "C" and k not in extra}
        if kwargs.get("batch_size", 0) is None:
            kwargs.pop("batch_size")
        return SPDConfig(C=C, **kwargs, **extra)


def default_C(model: Any, names: tuple[str, ...], C: int | None) -> dict[str, int]:
    out = {}
    for name in names:
        o, i = model.get_submodule(name).weight.shape
        out[name] = C if C is not None else max(8, min(o, i))
    return out


def decomposition_inputs(ctx: StepContext, opts: Any) -> tuple[tuple[str, ...], Any, Any, int]:
    """(module names, task, eval batch, training length) of a decomposition step."""
    data = ctx.data(1)
    layers = opts.layers if opts.layers is not None else tuple(ctx.layers)
    names = mamba_modules(ctx.model, layers, opts.matrices)
    batch = data["batch"]
    task = data["task"]
    train_len = opts.train_len or batch.seq_len * max(opts.eval_multiples)
    return names, task, batch, train_len


TOKENS_PER_STEP = 1024
"""Training tokens per SPD step when ``batch_size`` is None."""


def train_batch_size(opts: Any, train_len: int) -> int:
    return opts.batch_size if opts.batch_size is not None else max(1, TOKENS_PER_STEP // train_len)


def load(ctx: StepContext) -> dict:
    opts: Options = ctx.options or Options()
    names, task, _, train_len = decomposition_inputs(ctx, opts)
    sample = training_sampler(task, ctx.model.cfg.vocab_size, train_len)
    dec = load_decomposition(ctx.path(CHECKPOINT), modules_target(ctx.model, sample, names))
    return {"decomposition": dec, "modules": names}


@register_step(17, "spd", requires=(1,), title="Stochastic parameter decomposition (SPD) of the mixers' Linears",
               options=Options, load=load, version=2, default=False, reads=("layers", "batch_size", "figures"))
def run(ctx: StepContext) -> StepResult:
    opts: Options = ctx.options or Options()
    names, task, batch, train_len = decomposition_inputs(ctx, opts)
    sample = training_sampler(task, ctx.model.cfg.vocab_size, train_len)
    C = default_C(ctx.model, names, opts.C)
    batch_size = train_batch_size(opts, train_len)
    cfg = opts.spd_config(C, seed=ctx.seed % 2**31, log_every=max(1, opts.steps // 20), progress=False,
                          checkpoint_path=str(ctx.path(CHECKPOINT)), batch_size=batch_size)
    dec = run_spd(modules_target(ctx.model, sample, names), cfg,
                  progress=lambda it, total: ctx.progress(it, total=total, desc="SPD"))
    return summarise(ctx, opts, dec, task, batch, "spd", extra={"C": C, "train_len": train_len,
                                                                "train_batch_size": batch_size})


def summarise(ctx: StepContext, opts: Any, dec: Any, task: Any, batch: Any, method: str,
              extra: dict[str, Any]) -> StepResult:
    """Metrics, figures and reading shared by steps 17 and 18."""
    seed = ctx.seed % 2**31
    n = min(opts.n_eval, len(batch))
    batches, notes = length_batches(task, ctx.model.cfg.vocab_size, batch, n, opts.eval_multiples, seed)
    modes = mode_report(dec, batches, ctx.batch_size, seed)
    imps = importances_on(dec, batches["1x"], ctx.batch_size)
    per_module = importance_report(dec, imps, batches["1x"], opts.alive_threshold, seed)
    metrics: dict[str, Any] = {
        "method": method, "modules": list(dec.target.modules), **extra, "steps": opts.steps,
        "batch_size": opts.batch_size, "faithfulness_mse": float(dec.model.faithfulness(dec.target).detach()),
        "final_losses": dec.history[-1] if dec.history else {}, "by_length": modes, "by_module": per_module,
        "notes": notes,
    }
    if task is not None and ctx.data(1)["kind"] == "task":
        metrics["by_position_class"] = position_report(imps, batches["1x"], opts.top_k, seed)
    ctx.save_json("history", dec.history)
    if ctx.config.figures:
        _figures(ctx, dec, modes, imps, batches["1x"])
    artifacts = ["decomposition.safetensors"] if ctx.path("decomposition.safetensors").is_file() else []
    return StepResult(metrics=metrics, reading=reading(metrics, method), artifacts=artifacts,
                      data={"decomposition": dec, "modules": dec.target.modules, "eval_batch": batches["1x"]})


def _fmt(e: dict[str, Any], digits: int = 3) -> str:
    return f"{e['value']:.{digits}f} [{e['ci'][0]:.{digits}f}, {e['ci'][1]:.{digits}f}]"


def reading(m: dict[str, Any], method: str) -> str:
    parts = []
    for label, entry in m["by_length"].items():
        t, o, i = entry["target"], entry["ones"], entry["importance"]
        parts.append(
            f"At {label} length ({entry['seq_len']} tokens, {entry['n']} sequences) the target's accuracy is "
            f"{_fmt(t['accuracy'])}; the decomposed layers give {_fmt(o['accuracy'])} with every mask 1 "
            f"(difference {_fmt(o['accuracy_minus_target'])}, KL {o['kl']['value']:.3g}) and "
            f"{_fmt(i['accuracy'])} with the {'causal-importance' if method == 'spd' else 'top-k'} masks "
            f"(difference {_fmt(i['accuracy_minus_target'])}, KL {i['kl']['value']:.3g}).")
    mods = m["by_module"]
    alive = ", ".join(f"{k.split('.', 1)[1]} {v['alive']}/{v['C']}" for k, v in mods.items())
    key_l0 = [k for k in next(iter(mods.values())) if k.startswith("ci_l0_") and k != "ci_l0_0.1"][0]
    l0 = sum(v[key_l0]["value"] for v in mods.values())
    parts.append(f"Alive subcomponents (importance > {key_l0[6:]} on some token): {alive}; on average "
                 f"{l0:.1f} subcomponents over all decomposed matrices are important per token.")
    pos = m.get("by_position_class") or {}
    for cls, rows in pos.items():
        if not rows or cls in ("other", "all"):
            continue
        r0 = rows[0]
        var = (f", tracking {r0['best_variable']} (r = {r0['r']:.2f}, shuffled {r0['shuffled_best_abs_r']:.2f})"
               if "best_variable" in r0 else "")
        parts.append(f"At the {cls} position the most important is {r0['module']}[{r0['subcomponent']}] "
                     f"(mean importance {r0['mean_importance']:.2f} there vs "
                     f"{r0['mean_importance_elsewhere']:.2f} elsewhere{var}).")
    return " ".join(parts)


def _figures(ctx: StepContext, dec: Any, modes: dict, imps: dict, batch: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from mamba_interp.parameter_decomposition.mamba import position_classes

    hist = [h for h in dec.history if h.get("step", 0) >= 0]
    if hist:
        fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
        steps = [h["step"] for h in hist]
        for k in hist[0]:
            if k not in ("step",) and all(k in h for h in hist):
                ax.semilogy(steps, [max(h[k], 1e-12) for h in hist], label=k)
        ax.set(xlabel="step", title=f"{dec.method.upper()} training losses")
        ax.legend(fontsize=7)
        ctx.save_figure(fig, "training")
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    labels = list(modes)
    kinds = ["target", "ones", "importance"]
    x = np.arange(len(labels))
    for j, kind in enumerate(kinds):
        vals = [modes[lab][kind]["accuracy"]["value"] for lab in labels]
        lo = [modes[lab][kind]["accuracy"]["ci"][0] for lab in labels]
        hi = [modes[lab][kind]["accuracy"]["ci"][1] for lab in labels]
        ax.bar(x + (j - 1) * 0.27, vals, 0.27, yerr=[np.subtract(vals, lo), np.subtract(hi, vals)], label=kind)
    ax.set_xticks(x, labels)
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title="target vs decomposed layers (95% CI)")
    ax.legend(fontsize=7)
    ctx.save_figure(fig, "accuracy_by_mode")
    classes = position_classes(batch)
    names = list(imps)
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.2 * len(names) + 1), layout="constrained", squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        ci = imps[name]
        rows = np.stack([ci[m].double().mean(0).numpy() if bool(m.any()) else np.zeros(ci.shape[-1])
                         for m in classes.values()])
        im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(classes)), list(classes), fontsize=6)
        ax.set_title(f"{name}: mean importance per position class", fontsize=8)
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.02)
    ctx.save_figure(fig, "importance_by_position")
