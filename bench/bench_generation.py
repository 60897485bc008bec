"""Benchmark generation through the inference state, and the cost of the in-place check of hooks.

For Mamba-1 and Mamba-2 (random weights; ``--d-model``, ``--layers``, batch ``--batch``, prompt ``--prompt``) it
prints, in CPU-seconds of this process (1 torch thread, median of ``--repeats``):

* ``generate(n)`` per generated token for each n in ``--new`` (constant per token = linear in n), against the
  re-processing loop that runs the whole sequence again for every token (what generation costs without a state;
  its per-token time grows with n);
* the hooked forward with a read-only hook on every non-lazy hook point, and the same hooks with the in-place
  check switched off (``HookPoint`` compares the input's version counter before and after each hook): the
  difference is the check's cost (and the check alone, per hook call). The forward without hooks never reaches
  the check.

Usage: ``python bench/bench_generation.py [--new 16 64 256] [--archs mamba1 mamba2]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import cpu_time  # noqa: E402  (this folder is on sys.path when run as a script)

from mamba_interp import HookedMamba, MambaConfig  # noqa: E402
from mamba_interp.models import hooks as hooks_module  # noqa: E402


def reprocessing_loop(model, ids, n):
    for _ in range(n):
        logits = model(ids)
        ids = torch.cat([ids, logits[:, -1, : model.cfg.vocab_size].argmax(-1, keepdim=True)], dim=1)
    return ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    ap.add_argument("--new", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--loop-max", type=int, default=64, help="run the re-processing loop up to this n")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for arch in args.archs:
        torch.manual_seed(0)
        cfg = MambaConfig(arch=arch, d_model=args.d_model, n_layer=args.layers, vocab_size=512, d_state=16,
                          headdim=32)
        model = HookedMamba(cfg).eval()
        ids = torch.randint(0, 512, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
        print(f"{arch}: d_model {args.d_model}, {args.layers} layers, batch {args.batch}, prompt {args.prompt}")
        with torch.no_grad():
            for n in args.new:
                gen = cpu_time(lambda n=n: model.generate(ids, n), args.repeats)
                line = f"  generate {n:4d} tokens: {gen:7.3f} s = {gen / n * 1e3:6.2f} ms/token"
                if n <= args.loop_max:
                    loop = cpu_time(lambda n=n: reprocessing_loop(model, ids, n), args.repeats)
                    line += (f" | re-processing loop {loop:7.3f} s = {loop / n * 1e3:6.2f} ms/token, "
                             f"ratio {gen / loop:.3f}")
                print(line)
            names = [n for n, hp in model.hook_dict.items() if not hp.lazy]
            hooks = [(names, lambda a, h: None)]
            plain = cpu_time(lambda: model(ids), args.repeats)
            checked = cpu_time(lambda: model.run_with_hooks(ids, fwd_hooks=hooks), args.repeats)
            marker, edited = hooks_module._edit_marker, hooks_module._edited
            hooks_module._edit_marker, hooks_module._edited = (lambda x: 0), (lambda x, b: False)
            try:
                unchecked = cpu_time(lambda: model.run_with_hooks(ids, fwd_hooks=hooks), args.repeats)
            finally:
                hooks_module._edit_marker, hooks_module._edited = marker, edited
        print(f"  forward [b={args.batch}, l={args.prompt}]: no hooks {plain * 1e3:.1f} ms; {len(names)} read-only "
              f"hooks {checked * 1e3:.1f} ms with the in-place check, {unchecked * 1e3:.1f} ms without "
              f"(check: {(checked - unchecked) * 1e3:+.2f} ms, {(checked - unchecked) / unchecked:+.1%})")
    print(f"in-place check alone: {check_cost_per_call() * 1e6:.2f} us per hook call")


def check_cost_per_call(repeats: int = 20000) -> float:
    """CPU-seconds of one in-place check (version counter before and after) on a [4, 64, 128] activation."""
    x = torch.randn(4, 64, 128)
    t0 = time.process_time()
    for _ in range(repeats):
        hooks_module._edited(x, hooks_module._edit_marker(x))
    return (time.process_time() - t0) / repeats


if __name__ == "__main__":
    main()
