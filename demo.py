#!/usr/bin/env python
"""A guided tour of mamba_interp on the embedded default model (under a minute on a laptop CPU).

    python demo.py                      # the zoo's default model (an induction-trained Mamba-1)
    python demo.py --model NAME         # another zoo model (mamba-interp list-models)
    python demo.py --model FOLDER       # a checkpoint folder whose card.json / training_log.json names its task

It walks through: loading a model and its task, the hook points, caching activations (Δ, the SSM state and its
norm), activation patching of the residual stream and of the SSM state (which layer and position carry the
answer), and a figure. Each section prints the public calls it makes, then their results; the figure goes to
``results/demo/demo.png``. The full analysis is one command: ``python mamba_mechanistic_analysis.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def code(*lines: str) -> None:
    """Print the calls a section makes, as they appear below it."""
    for line in lines:
        print(f"    >>> {line}")


def load(spec: str):
    """(model, task, the calls that load them) for a zoo name or a checkpoint folder, or a message why not."""
    from mamba_interp import HookedMamba, zoo
    from mamba_interp.tasks import get_task

    if spec == "default" or spec in zoo.names():
        name = zoo.DEFAULT if spec == "default" else spec
        calls = ["from mamba_interp import zoo", f"model = zoo.load({name!r})", f"task = zoo.load_task({name!r})"]
        if spec == "default":
            calls[1:] = ["model = zoo.load(zoo.DEFAULT)", "task = zoo.load_task(zoo.DEFAULT)"]
        return zoo.load(name), zoo.load_task(name), calls
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        return f"{spec!r} is neither a zoo model ({', '.join(zoo.names())}) nor a checkpoint folder with config.json"
    from mamba_interp.pipeline.model_source import task_from_card

    for card_name in ("card.json", "training_log.json"):
        if (folder / card_name).is_file():
            task_name, params = task_from_card(json.loads((folder / card_name).read_text()))
            if task_name:
                break
    else:
        return f"{folder} has no card.json or training_log.json naming its task; use a zoo model or a folder " \
               "written by `mamba-interp train`"
    calls = ["from mamba_interp import HookedMamba", "from mamba_interp.tasks import get_task",
             f"model = HookedMamba.from_pretrained({str(folder)!r})",
             f"task = get_task({task_name!r}, **{params!r})   # from {card_name}"]
    return HookedMamba.from_pretrained(folder).eval(), get_task(task_name, **params), calls


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
    loaded = load(args.model)
    if isinstance(loaded, str):
        print(f"demo: {loaded}", file=sys.stderr)
        return 2
    model, task, calls = loaded
    cfg = model.cfg
    code(*calls, f"batch = task.sample({args.samples}, seed=0, split='test')", "logits = model(batch.tokens)")
    print(f"model: {cfg.arch}, {cfg.n_layer} layers, d_model {cfg.d_model}, d_state {cfg.d_state}, "
          f"{model.n_params():,} parameters")
    batch = task.sample(args.samples, seed=0, split="test")
    with torch.no_grad():
        logits = model(batch.tokens)
    print(f"task {task!r}: accuracy {task.accuracy(logits, batch):.3f} on {len(batch)} fresh sequences "
          f"(chance {task.chance if task.chance is not None else float('nan'):.3f})")
    print("ground truth per sequence:", ", ".join(sorted(batch.metadata)))

    # ---- 2. hooks ------------------------------------------------------------------------------------
    section("2. Hook points: every activation has a name")
    code("list(model.hook_dict)", "model.hook_names('blocks.*.mixer.hook_dt')")
    names = list(model.hook_dict)
    print(f"{len(names)} hook points, in execution order; layer 0's mixer:")
    print("   ", ", ".join(n.split(".")[-1] for n in names if n.startswith("blocks.0.mixer.")))
    print("model.hook_names('blocks.*.mixer.hook_dt') ->", model.hook_names("blocks.*.mixer.hook_dt"))

    # ---- 3. cache ---------------------------------------------------------------------------------------
    section("3. Cache activations: Δ and the SSM state")
    last = cfg.n_layer - 1
    code("logits, cache = model.run_with_cache(batch.tokens, names_filter='blocks.*.mixer.hook_dt')",
         "dts = cache.stack('blocks.*.mixer.hook_dt')    # [n_layer, b, l, e] (Mamba-2: [n_layer, b, l, h])",
         "from mamba_interp.pipeline.activation_stats import collect_activations",
         f"norms = collect_activations(model, batch.tokens, [{last}], ['state_norm'], batch_size=64)")
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, names_filter="blocks.*.mixer.hook_dt")
    dts = cache.stack("blocks.*.mixer.hook_dt")
    for i in range(cfg.n_layer):
        print(f"layer {i}: median Δ {dts[i].median():.4f}, 99th percentile {dts[i].float().quantile(0.99):.4f}")
    # the state norm as step 2 and the report define it: ‖h_t‖ over the state dimension n of each channel
    # (Mamba-2: over p and n of each head), after every token
    from mamba_interp.pipeline.activation_stats import collect_activations

    norms = collect_activations(model, batch.tokens, [last], ["state_norm"], batch_size=64)
    state_norm = norms[("state_norm", last)].mean(dim=(0, 2))  # [l]: mean over sequences and channels (heads)
    unit = "channels" if cfg.arch == "mamba1" else "heads"
    print(f"layer {last} state norm (per {unit[:-1]}, mean over sequences and {unit}): {state_norm[0]:.3f} after "
          f"the first token, {state_norm[-1]:.3f} after the last")

    # ---- 4. patch -------------------------------------------------------------------------------------------
    section("4. Activation patching: where does the answer live?")
    corrupted = task.corrupt(batch, seed=1)
    rows = torch.arange(len(batch))
    right, wrong = batch.metadata["answer"], corrupted.metadata["answer"]
    if right.dim() > 1:  # several answers per example: patch against the first
        right, wrong = right[:, 0], wrong[:, 0]
    pos = batch.metadata["answer_pos"]
    pos = pos[:, 0] if pos.dim() > 1 else pos

    def logit_diff(lg: torch.Tensor) -> float:  # clean answer minus corrupted answer, at the answer position
        at = lg[rows, pos]
        return float((at[rows, right] - at[rows, wrong]).mean())

    sites = {"residual stream": "blocks.{i}.hook_resid_pre", "SSM state": "blocks.{i}.mixer.hook_ssm_state"}
    code("corrupted = task.corrupt(batch, seed=1)",
         "_, clean = model.run_with_cache(batch.tokens, names_filter=['blocks.*.hook_resid_pre', "
         "'blocks.*.mixer.hook_ssm_state'])",
         "def patch(act, hook):            # the clean activation at one position p per sequence",
         "    out = act.clone(); out[rows, p] = clean[hook.name][rows, p]; return out",
         "model.run_with_hooks(corrupted.tokens, fwd_hooks=[(f'blocks.{i}.hook_resid_pre', patch)])",
         "model.run_with_hooks(corrupted.tokens, fwd_hooks=[(f'blocks.{i}.mixer.hook_ssm_state', patch)])",
         "# a changed hook_ssm_state substitutes h_p and the recurrence continues from it")
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(batch.tokens, names_filter=[s.replace("{i}", "*")
                                                                          for s in sites.values()])
        clean_ld, corrupt_ld = logit_diff(logits), logit_diff(model(corrupted.tokens))
    print(f"logit difference (clean answer - corrupted answer): clean {clean_ld:.2f}, corrupted {corrupt_ld:.2f}")
    roles = {}
    for key, value in batch.metadata.items():  # positions named in the ground truth: one per example
        if key.endswith("_pos") and isinstance(value, torch.Tensor) and value.dim() == 1:
            if not any(torch.equal(value, v) for v in roles.values()):
                roles[key] = value
    recovery = {site: torch.zeros(cfg.n_layer, len(roles)) for site in sites}
    for site, template in sites.items():
        for i in range(cfg.n_layer):
            name = template.format(i=i)
            for j, p_role in enumerate(roles.values()):
                def patch(act, hook, p_role=p_role):
                    out = act.clone()
                    out[rows, p_role] = clean_cache[hook.name][rows, p_role]
                    return out

                with torch.no_grad():
                    lg = model.run_with_hooks(corrupted.tokens, fwd_hooks=[(name, patch)])
                recovery[site][i, j] = (logit_diff(lg) - corrupt_ld) / (clean_ld - corrupt_ld + 1e-9)
    header = "".join(f"{k:>14}" for k in roles)
    for site, rec in recovery.items():
        print(f"fraction of the logit difference restored by patching the {site}:\n{'':>9}{header}")
        for i in range(cfg.n_layer):
            print(f"layer {i:>2} " + "".join(f"{float(v):>14.2f}" for v in rec[i]))
    # (the residual stream entering layer 0 at the corrupted position is the changed token itself: trivially 1)
    for site, rec in recovery.items():
        cells = [f"layer {i} at {role} ({float(rec[i, j]):.0%})" for i in range(cfg.n_layer)
                 for j, role in enumerate(roles) if rec[i, j] >= 0.5]
        print(f"-> patching the {site} restores at least half of it at: {', '.join(cells) or 'no single site'}")

    # ---- 5. figure ------------------------------------------------------------------------------------------
    section("5. A figure")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    for ax, (site, rec) in zip(axes, recovery.items()):
        im = ax.imshow(rec.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(roles)), list(roles), rotation=20)
        ax.set_yticks(range(cfg.n_layer), [f"layer {i}" for i in range(cfg.n_layer)])
        ax.set_title(f"patching the {site}: logit difference restored")
    fig.colorbar(im, ax=axes[:2])
    axes[2].plot(state_norm.numpy())
    axes[2].set(title=f"layer {last}: SSM state norm (mean over {unit})", xlabel="position",
                ylabel="‖h_t‖ per " + unit[:-1])
    fig.savefig(out / "demo.png", dpi=100)
    plt.close(fig)
    print(f"saved {out / 'demo.png'}")

    section("Next")
    print("the full pipeline (JSON + PNG per step and report.html): python mamba_mechanistic_analysis.py")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
