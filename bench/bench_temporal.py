"""Benchmark the temporal-influence methods against the model's own forward + backward, in one run.

1. ``temporal_jacobian`` for one target row (the last position) at L (default 4096), against one forward +
   backward of the same model at that length (loss = the last position's log-prob, backward into every
   parameter). Two variants: the gradient of a score (one backward) and the Jacobian norm over all v logits
   (the batch replicated v times).
2. ``hidden_attention(reduce="mean_abs")`` at L (default 2048) in a fresh subprocess: its peak resident memory
   against the size a [b, e, l, l] tensor would need (and the time).

Models: the zoo's default (Mamba-1, d_model 64, 2 layers) and induction-mamba2 (32 heads), batch 1, random tokens
of their vocabulary. Times are CPU-seconds of this process (``time.process_time``, 1 torch thread), the median of
``--repeats`` runs. Usage: ``python bench/bench_temporal.py [--jacobian-len 4096] [--attention-len 2048]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_model import cpu_time  # noqa: E402  (same CPU-time median as the model bench)

from mamba_interp import zoo  # noqa: E402
from mamba_interp.temporal_causality import answer_logprob, hidden_attention, temporal_jacobian  # noqa: E402

MODELS = ("induction-mamba1", "induction-mamba2")


def bench_jacobian(name: str, length: int, repeats: int) -> dict:
    model = zoo.load(name)
    ids = torch.randint(0, model.cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    answer = ids[:, -1]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        torch.log_softmax(logits[:, -1], -1).gather(-1, answer[:, None]).sum().backward()

    base = cpu_time(fwd_bwd, repeats)
    score = cpu_time(lambda: temporal_jacobian(model, ids, [length - 1], score=answer_logprob(answer)), repeats)
    norm = cpu_time(lambda: temporal_jacobian(model, ids, [length - 1]), repeats)
    return {"model": name, "L": length, "fwd_bwd_s": base, "score_row_s": score, "score_ratio": score / base,
            "jacobian_row_s": norm, "jacobian_ratio": norm / base, "features": model.cfg.padded_vocab_size}


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux VmHWM, which ``reset_peak`` clears; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start the peak-memory count afresh (a forked child inherits its parent's ru_maxrss)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def attention_child(name: str, length: int) -> None:
    """Run in a fresh process: peak RSS of hidden_attention(reduce="mean_abs") on one sequence."""
    model = zoo.load(name)
    ids = torch.randint(0, model.cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    reset_peak()
    before = peak_rss_mib()
    t0 = time.process_time()
    out = hidden_attention(model, ids, model.cfg.n_layer - 1, reduce="mean_abs")
    seconds = time.process_time() - t0
    units = model.cfg.d_inner if model.cfg.arch == "mamba1" else model.cfg.nheads
    print(json.dumps({"model": name, "L": length, "cpu_s": seconds, "rss_before_mib": before,
                      "peak_rss_mib": peak_rss_mib(),
                      "full_tensor_mib": units * length * length * 4 / 2**20, "output": list(out.shape)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jacobian-len", type=int, default=4096)
    p.add_argument("--attention-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--only", choices=("jacobian", "attention"), help="run one of the two parts")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "L"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    sys.stdout.reconfigure(line_buffering=True)
    if args.child:
        attention_child(args.child[0], int(args.child[1]))
        return
    if args.only != "attention":
        jacobian_part(args)
    if args.only != "jacobian":
        attention_part(args)


def jacobian_part(args: argparse.Namespace) -> None:
    print(f"1. temporal_jacobian, one target row, L = {args.jacobian_len}, batch 1 (CPU s, median of {args.repeats})")
    print(f"{'model':<18}{'fwd+bwd':>9}{'score row':>11}{'ratio':>7}{'Jacobian row':>14}{'ratio':>7}  (v)")
    for name in args.models:
        r = bench_jacobian(name, args.jacobian_len, args.repeats)
        print(f"{name:<18}{r['fwd_bwd_s']:>9.2f}{r['score_row_s']:>11.2f}{r['score_ratio']:>7.2f}"
              f"{r['jacobian_row_s']:>14.2f}{r['jacobian_ratio']:>7.2f}  ({r['features']})")


def attention_part(args: argparse.Namespace) -> None:
    print(f"\n2. hidden_attention(reduce='mean_abs'), last layer, L = {args.attention_len}, batch 1, fresh process")
    print(f"{'model':<18}{'CPU s':>7}{'RSS before':>11}{'peak RSS MiB':>14}{'[b,e|h,l,l] MiB':>17}{'added/full':>11}")
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--child", name, str(args.attention_len)], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        added = r["peak_rss_mib"] - r["rss_before_mib"]
        print(f"{name:<18}{r['cpu_s']:>7.1f}{r['rss_before_mib']:>11.0f}{r['peak_rss_mib']:>14.0f}"
              f"{r['full_tensor_mib']:>17.0f}{added / r['full_tensor_mib']:>11.2f}")


if __name__ == "__main__":
    main()
