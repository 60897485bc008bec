#!/usr/bin/env python
"""A guided tour of mamba_interp on the embedded default model (under a minute on a laptop CPU).

    python demo.py                      # the zoo's default model (an induction-trained Mamba-1)
    python demo.py --model FOLDER       # any model whose card/training log names its task

It walks through: loading a model and its task, the hook points, caching activations (Δ, the SSM state),
activation patching (which layer and position carry the answer), and a figure. Each section prints what it does
and the code it uses; the figure goes to ``results/demo/demo.png``. The full analysis is one command:
``python mamba_mechanistic_analysis.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="zoo name or checkpoint folder (default: the zoo's default)")
    p.add_argument("--out", default="results/demo", help="folder for the figure")
    p.add_argument("--samples", type=int, default=64, help="sequences to analyse")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.perf_counter()

    # ---- 1. load ---------------------------------------------------------------------------------
    section("1. Load a model and the task it was trained on")
    from mamba_interp.pipeline.config import UsageError
    from mamba_interp.pipeline.model_source import load_model_source
    from mamba_interp.tasks import get_task

    try:
        src = load_model_source(args.model)
    except UsageError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    model, cfg = src.model, src.model.cfg
    if src.task is None:
        print("demo: this model's card names no task; use a zoo model or a folder written by `mamba-interp train`",
              file=sys.stderr)
        return 2
    print("    from mamba_interp import zoo; model = zoo.load(zoo.DEFAULT)")
    print(f"model {src.name}: {cfg.arch}, {cfg.n_layer} layers, d_model {cfg.d_model}, d_state {cfg.d_state}, "
          f"{model.n_params():,} parameters")
    task = get_task(src.task, **src.task_params)
    batch = task.sample(args.samples, seed=0, split="test")
    with torch.no_grad():
        logits = model(batch.tokens)
    print(f"task {task!r}: accuracy {task.accuracy(logits, batch):.3f} on {len(batch)} fresh sequences "
          f"(chance {task.chance if task.chance is not None else float('nan'):.3f})")
    print("ground truth per sequence:", ", ".join(sorted(batch.metadata)))

    # ---- 2. hooks ------------------------------------------------------------------------------------
    section("2. Hook points: every activation has a name")
    names = list(model.hook_dict)
    print(f"{len(names)} hook points, in execution order; layer 0's mixer:")
    print("   ", ", ".join(n.split(".")[-1] for n in names if n.startswith("blocks.0.mixer.")))
    print("    model.hook_names('blocks.*.mixer.hook_dt') ->", model.hook_names("blocks.*.mixer.hook_dt"))

    # ---- 3. cache ---------------------------------------------------------------------------------------
    section("3. Cache activations: Δ and the SSM state")
    last = cfg.n_layer - 1
    print(f"    logits, cache = model.run_with_cache(tokens, names_filter=['blocks.*.mixer.hook_dt', "
          f"'blocks.{last}.mixer.hook_ssm_state'])")
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, names_filter=["blocks.*.mixer.hook_dt",
                                                                    f"blocks.{last}.mixer.hook_ssm_state"])
    dts = cache.stack("blocks.*.mixer.hook_dt")  # [n_layer, b, l, e] (Mamba-2: [n_layer, b, l, h])
    for i in range(cfg.n_layer):
        print(f"layer {i}: median Δ {dts[i].median():.4f}, 99th percentile {dts[i].float().quantile(0.99):.4f}")
    state = cache["ssm_state", last]  # Mamba-1 [b, l, e, n]; Mamba-2 [b, l, h, p, n]
    norm = state.flatten(2).norm(dim=-1).mean(0)  # [l]
    print(f"layer {last} state norm: {norm[0]:.3f} after the first token, {norm[-1]:.3f} after the last")

    # ---- 4. patch -------------------------------------------------------------------------------------------
    section("4. Activation patching: where does the answer live?")
    corrupted = task.corrupt(batch, seed=1)
    b = len(batch)
    rows = torch.arange(b)
    right, wrong = batch.metadata["answer"], corrupted.metadata["answer"]
    if right.dim() > 1:  # several answers per example: patch against the first
        right, wrong = right[:, 0], wrong[:, 0]
    pos = batch.metadata["answer_pos"]
    pos = pos[:, 0] if pos.dim() > 1 else pos

    def logit_diff(lg: torch.Tensor) -> float:  # clean answer minus corrupted answer, at the answer position
        at = lg[rows, pos]
        return float((at[rows, right] - at[rows, wrong]).mean())

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(batch.tokens, names_filter="blocks.*.hook_resid_pre")
        clean_ld, corrupt_ld = logit_diff(model(batch.tokens)), logit_diff(model(corrupted.tokens))
    print(f"logit difference (clean answer - corrupted answer): clean {clean_ld:.2f}, corrupted {corrupt_ld:.2f}")
    roles = {}
    for key, value in batch.metadata.items():  # positions named in the ground truth: one per example
        if key.endswith("_pos") and isinstance(value, torch.Tensor) and value.dim() == 1:
            if not any(torch.equal(value, v) for v in roles.values()):
                roles[key] = value
    print("    a hook returns a new tensor; here it copies the clean residual stream at one position per sequence:")
    print("    def patch(resid, hook): out = resid.clone(); out[rows, p] = clean[rows, p]; return out")
    recovery = torch.zeros(cfg.n_layer, len(roles))
    for i in range(cfg.n_layer):
        clean = clean_cache["resid_pre", i]
        for j, p_role in enumerate(roles.values()):
            def patch(resid, hook, p_role=p_role, clean=clean):
                out = resid.clone()
                out[rows, p_role] = clean[rows, p_role]
                return out

            with torch.no_grad():
                lg = model.run_with_hooks(corrupted.tokens, fwd_hooks=[(f"blocks.{i}.hook_resid_pre", patch)])
            recovery[i, j] = (logit_diff(lg) - corrupt_ld) / (clean_ld - corrupt_ld + 1e-9)
    header = "".join(f"{k:>14}" for k in roles)
    print(f"fraction of the logit difference restored by patching resid_pre:\n{'':>9}{header}")
    for i in range(cfg.n_layer):
        print(f"layer {i:>2} " + "".join(f"{float(v):>14.2f}" for v in recovery[i]))
    for i in range(cfg.n_layer):  # layer 0 at the corrupted position is trivially 1: it is the changed token
        j = int(recovery[i].argmax())
        print(f"-> entering layer {i}, the answer is carried mostly at {list(roles)[j]} "
              f"({float(recovery[i, j]):.0%} restored)")

    # ---- 5. figure ------------------------------------------------------------------------------------------
    section("5. A figure")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    im = axes[0].imshow(recovery.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    axes[0].set_xticks(range(len(roles)), list(roles), rotation=20)
    axes[0].set_yticks(range(cfg.n_layer), [f"layer {i}" for i in range(cfg.n_layer)])
    axes[0].set_title("activation patching: logit difference restored")
    fig.colorbar(im, ax=axes[0])
    axes[1].plot(norm.numpy())
    axes[1].set(title=f"layer {last}: mean SSM state norm", xlabel="position", ylabel="‖h_t‖")
    fig.savefig(out / "demo.png", dpi=100)
    plt.close(fig)
    print(f"saved {out / 'demo.png'}")

    section("Next")
    print("the full pipeline (JSON + PNG per step and report.html): python mamba_mechanistic_analysis.py")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
