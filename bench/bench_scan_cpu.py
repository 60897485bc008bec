"""The Mamba-1 CPU scans side by side: the compiled C kernel vs the torch loop vs the reference, in one run.

For each shape it prints the forward (no grad) and forward + backward wall time of one scan, the median of
``--repeats`` interleaved runs, and the ratios loop / compiled and reference / compiled (> 1: the kernel is
faster), plus the largest relative difference of y and of every gradient from the reference (float32 both).
Shapes: mamba-130m's layer at the pipeline's batch (16 × 256 tokens, e 1536, n 16) and ``bench_model.py``'s
layer (4 × 1024, e 512, n 16). Wall time, at ``--threads`` torch threads (the kernel uses as many pthreads).

Usage: ``PYTHONPATH=$PWD python bench/bench_scan_cpu.py [--threads 2] [--repeats 5] [--json F]``.
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

from mamba_interp.models.ops import cpu_kernel
from mamba_interp.models.ops.selective_scan import selective_scan_loop, selective_scan_ref

SHAPES = {"mamba-130m layer, 16 x 256": (16, 256, 1536, 16), "bench_model layer, 4 x 1024": (4, 1024, 512, 16)}
SCANS = {"compiled": cpu_kernel.selective_scan_compiled, "loop": selective_scan_loop, "reference": selective_scan_ref}


def inputs(b: int, l: int, e: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, l, e, generator=g), torch.rand(b, l, e, generator=g) * 0.1,  # u, Δ at init scale
            -torch.arange(1, n + 1.0).repeat(e, 1) * torch.exp(torch.randn(e, 1, generator=g) * 0.3),  # A
            torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g), torch.randn(e, generator=g)]


def forward(fn, args):
    with torch.no_grad():
        fn(*args)


def forward_backward(fn, args):
    xs = [a.clone().requires_grad_(True) for a in args]
    y, h = fn(*xs)
    (y.square().mean() + h.sum()).backward()
    return [y.detach(), *[x.grad for x in xs]]


def medians(args, repeats: int) -> dict[str, tuple[float, float]]:
    """Interleaved, so drift in the machine's load falls on every scan alike."""
    times = {k: ([], []) for k in SCANS}
    for fn in SCANS.values():  # warm-up (and the kernel's build)
        forward(fn, args)
    for _ in range(repeats):
        for name, fn in SCANS.items():
            t0 = time.perf_counter()
            forward(fn, args)
            t1 = time.perf_counter()
            forward_backward(fn, args)
            times[name][0].append(t1 - t0)
            times[name][1].append(time.perf_counter() - t1)
    return {k: (statistics.median(f), statistics.median(fb)) for k, (f, fb) in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_kernel.available():
        print("the compiled kernel did not build here (no C compiler?); nothing to compare", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {args.threads} threads, wall seconds (median of {args.repeats})")
    print("| shape | pass | compiled | loop | reference | loop / compiled | reference / compiled |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for label, shape in SHAPES.items():
        x = inputs(*shape)
        t = medians(x, args.repeats)
        for i, what in enumerate(("forward", "forward + backward")):
            c, lo, r = t["compiled"][i], t["loop"][i], t["reference"][i]
            rows.append({"shape": label, "dims": shape, "what": what, "compiled_s": c, "loop_s": lo, "reference_s": r})
            print(f"| {label} | {what} | {c * 1e3:.1f} ms | {lo * 1e3:.1f} ms | {r * 1e3:.1f} ms | "
                  f"{lo / c:.2f} | {r / c:.2f} |", flush=True)
        got, ref = forward_backward(SCANS["compiled"], x), forward_backward(selective_scan_ref, x)
        errs = {name: float((a - b).abs().max() / b.abs().max()) for name, a, b in
                zip(("y", "u", "delta", "A", "B", "C", "D"), got, ref)}
        rows[-1]["relative_error_vs_reference"] = errs
        print(f"  {label}: max relative difference from the reference: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
