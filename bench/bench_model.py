"""Benchmark HookedMamba against transformers and against our reference scan loop, in one run.

For Mamba-1 and Mamba-2 (4 layers, d_model 256, d_state 16, batch 4, vocabulary 1024; random weights) and each
length L it prints:

* forward: ours vs transformers' ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` (ratio < 1 means we are faster);
* forward + backward: ours vs the same model with ``scan_impl="reference"`` (the unbind step loop);
* full-cache memory: bytes held by ``run_with_cache()`` with every hook (incl. per-token states), and with
  the default-free filter ``blocks.*.hook_resid_post``;
* transformers' own forward + backward at short L (``--hf-backward-max-len``), for scale;
* the growth of our forward + backward time from the shortest to each longer L (linear would be L/L0).

Times are CPU-seconds of this process (``time.process_time``, 1 torch thread), the median of ``--repeats``
runs; CPU time is what the issue's targets are stated in and is robust to other load on the machine.
Usage: ``python bench/bench_model.py [--lengths 256 1024 4096] [--archs mamba1 mamba2] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mamba_interp import HookedMamba  # noqa: E402


def cpu_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def build(arch: str):
    import transformers as tf

    common = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, state_size=16)
    torch.manual_seed(0)
    if arch == "mamba1":
        hf = tf.MambaForCausalLM(tf.MambaConfig(**common))
    else:  # chunk 64: transformers' fastest CPU setting (docs/performance.md)
        hf = tf.Mamba2ForCausalLM(tf.Mamba2Config(num_heads=8, head_dim=64, n_groups=1, chunk_size=64,
                                                  tie_word_embeddings=True, **common))
    hf.eval()
    return hf, HookedMamba.from_transformers(hf)


def fwd_bwd(model, x):
    def run():
        model.zero_grad(set_to_none=True)
        model(x).float().logsumexp(-1).mean().backward()
    return run


def fwd_bwd_hf(model, x):
    def run():
        model.zero_grad(set_to_none=True)
        model(x).logits.float().logsumexp(-1).mean().backward()
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--archs", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--skip-reference-above", type=int, default=4096,
                    help="skip the reference-loop backward for longer L (it materialises [b, l, e, n] grads)")
    ap.add_argument("--hf-backward-max-len", type=int, default=256,
                    help="also time transformers' forward + backward up to this L (its Mamba-1 loop is O(L^2))")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    rows = []
    header = (f"{'arch':7} {'L':>5} {'hf fwd':>8} {'our fwd':>8} {'ratio':>6} {'ref f+b':>8} {'our f+b':>8} "
              f"{'ratio':>6} {'f+b/L0':>7} {'cache all':>10} {'cache resid':>11} {'hf f+b':>8}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, 1 thread, batch {args.batch}, "
          "CPU-seconds (median)")
    print(header)
    for arch in args.archs:
        hf, ours = build(arch)
        reference = HookedMamba.from_transformers(hf, scan_impl="reference")
        base = None
        for L in args.lengths:
            x = torch.randint(0, 1024, (args.batch, L), generator=torch.Generator().manual_seed(L))
            with torch.no_grad():
                t_hf = cpu_time(lambda: hf(x).logits, args.repeats)
                t_ours = cpu_time(lambda: ours(x), args.repeats)
                _, cache = ours.run_with_cache(x)
                mem_all = cache.nbytes()
                del cache
                _, cache = ours.run_with_cache(x, names_filter="blocks.*.hook_resid_post")
                mem_resid = cache.nbytes()
                del cache
            t_fb = cpu_time(fwd_bwd(ours, x), args.repeats)
            t_ref = cpu_time(fwd_bwd(reference, x), 1) if L <= args.skip_reference_above else float("nan")
            t_hf_fb = cpu_time(fwd_bwd_hf(hf, x), 1) if L <= args.hf_backward_max_len else float("nan")
            base = base or (L, t_fb)
            row = dict(arch=arch, L=L, hf_forward_s=t_hf, forward_s=t_ours, forward_ratio=t_ours / t_hf,
                       reference_fwd_bwd_s=t_ref, hf_fwd_bwd_s=t_hf_fb, fwd_bwd_s=t_fb, fwd_bwd_ratio=t_fb / t_ref,
                       fwd_bwd_growth=t_fb / base[1], length_growth=L / base[0],
                       cache_all_mib=mem_all / 2**20, cache_resid_mib=mem_resid / 2**20)
            rows.append(row)
            print(f"{arch:7} {L:5d} {t_hf:8.3f} {t_ours:8.3f} {row['forward_ratio']:6.2f} {t_ref:8.3f} {t_fb:8.3f} "
                  f"{row['fwd_bwd_ratio']:6.2f} {row['fwd_bwd_growth']:7.2f} {row['cache_all_mib']:8.1f}Mi "
                  f"{row['cache_resid_mib']:9.1f}Mi {t_hf_fb:8.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
