"""Benchmark activation patching on the default zoo model: our sweep against the naive approach, and AtP against it.

For one position class at a time (induction: ``final`` = the second trigger, ``answer`` = the token after the
first trigger, where the corruption sits) and every position-indexed hook of every layer, it times:

* ``naive``: TransformerLens' ``generic_activation_patch`` approach — one clean cache, then for every site one
  full forward from the embedding over the whole sequence with a hook writing the clean values;
* ``ours``: ``activation_patching.patch_sweep`` (one clean and one corrupted cache; every site starts at its layer,
  runs only the examples whose patched values differ, and only the suffix of the sequence from the first patched
  position, grouped by that position);
* ``atp``: ``attribution_patch`` for the same sites (one forward and one backward on the corrupted run, plus the
  clean run's forward),

and checks that ours equals naive (max |Δ effect|). Times are CPU-seconds of this process
(``time.process_time``, 1 torch thread), the median of ``--repeats`` runs (robust to other load on the machine).
Usage: ``python bench/bench_patching.py [--examples 256] [--classes final answer] [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mamba_interp import zoo  # noqa: E402
from mamba_interp.activation_patching import attribution_patch, patch_sweep, position_classes, task_metric  # noqa: E402


def cpu_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), out


@torch.no_grad()
def naive_sweep(model, clean, corrupt, metric, names, mask):
    """One full forward per site from the embedding (the reference the issue compares against)."""
    lc, cache = model.run_with_cache(clean, names_filter=names)
    lk = model(corrupt)
    mc, mk = metric(lc).double().mean(), metric(lk).double().mean()
    out = {}
    for name in names:
        src = cache[name]
        m = mask.view(*mask.shape, *([1] * (src.dim() - 2)))
        lp = model.run_with_hooks(corrupt, fwd_hooks=[(name, lambda x, hook, src=src, m=m: torch.where(m, src, x))])
        out[name] = float((metric(lp).double().mean() - mk) / (mc - mk))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--classes", nargs="+", default=["final", "answer"])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, task = zoo.load(), zoo.load_task()
    batch = task.sample(args.examples, seed=0, split="test")
    corrupt = task.corrupt(batch, seed=1)
    metric = task_metric(batch, corrupt)
    classes = position_classes(batch)
    names = [n for n in model.hook_dict if n.startswith("blocks.") and not n.endswith("hook_h0")]
    print(f"default model {zoo.DEFAULT}: {args.examples} sequences of {batch.seq_len} tokens, {len(names)} hooks "
          f"({model.cfg.n_layer} layers), CPU-seconds, 1 thread")
    print(f"{'class':>8} {'sites':>5} {'naive':>8} {'ours':>8} {'ratio':>6} {'atp':>7} {'atp/ours':>8} "
          f"{'max|Δ| vs naive':>15} {'forwards':>8}")
    for label in args.classes:
        mask = classes[label]
        positions = {label: mask}
        t_naive, ref = cpu_time(lambda: naive_sweep(model, batch.tokens, corrupt.tokens, metric, names, mask),
                                args.repeats)
        t_ours, res = cpu_time(lambda: patch_sweep(model, batch.tokens, corrupt.tokens, metric, hooks=names,
                                                   positions=positions), args.repeats)
        t_atp, _ = cpu_time(lambda: attribution_patch(model, batch.tokens, corrupt.tokens, metric, hooks=names,
                                                      positions=positions), args.repeats)
        err = max(abs(float(res.effect[n][0]) - ref[n]) for n in names)
        print(f"{label:>8} {len(names):>5} {t_naive:>7.2f}s {t_ours:>7.2f}s {t_ours / t_naive:>6.3f} {t_atp:>6.2f}s "
              f"{t_atp / t_ours:>8.3f} {err:>15.2e} {res.meta['forwards']:>8}")


if __name__ == "__main__":
    main()
