"""Benchmark one SAE training step: the fast training loss against its dense reference, at mamba-130m's widths.

``training_loss`` (``mamba_interp.sparse_autoencoder.training``) computes the pre-activations as
x W_enc − b_dec W_enc + b_enc and decodes TopK's k selected rows of W_dec per token; ``dense=True`` is the reference
with every product a dense matmul. For each width (d_model 768 = ``resid_post``, d_inner 1536 = ``x`` and ``y``)
this times loss + backward + Adam step of both on the same batch (the reference with torch's default Adam, the
fast path with the fused Adam ``train_sae`` uses), with AuxK active on a quarter of the latents
(as after the dead window), and prints the ratio and the largest relative gradient difference.
Times are CPU-seconds of this process (``time.process_time``), the median of ``--repeats`` steps.

Usage: ``python bench/bench_sae_training.py [--widths 768 1536] [--expansion 4] [--batch 256] [--k 16]
[--threads 1] [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mamba_interp.sparse_autoencoder import SAEConfig, SparseAutoencoder  # noqa: E402
from mamba_interp.sparse_autoencoder.training import training_loss  # noqa: E402


def step_seconds(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor, dense: bool, repeats: int) -> float:
    # lr 0: the weights (and so the work) stay the same; the reference uses torch's default Adam, the fast path the
    # fused one that train_sae uses
    opt = torch.optim.Adam(sae.parameters(), lr=0.0, fused=not dense)
    times = []
    for _ in range(repeats + 1):
        start = time.process_time()
        loss, _, _ = training_loss(sae, x, 0.0, dead, dense=dense)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.process_time() - start)
    return statistics.median(times[1:])  # the first step allocates Adam's state


def grad_difference(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor) -> float:
    grads = {}
    for dense in (True, False):
        sae.zero_grad(set_to_none=True)
        training_loss(sae, x, 0.0, dead, dense=dense)[0].backward()
        grads[dense] = {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}
    return max(float((grads[False][n] - g).abs().max() / g.abs().max().clamp_min(1e-30))
               for n, g in grads[True].items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[768, 1536])
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# TopK SAE, batch {args.batch}, k {args.k}, expansion {args.expansion}, {args.threads} thread(s); "
          "CPU-seconds per training step (loss, backward, Adam), median")
    print("| d_in | d_sae | dense reference | fast | ratio | max rel. gradient difference |")
    print("|---|---|---|---|---|---|")
    for d in args.widths:
        m = args.expansion * d
        sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=m, architecture="topk", k=args.k, seed=0))
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, d, generator=gen)
        dead = torch.arange(m) % 4 == 0
        ref = step_seconds(sae, x, dead, True, args.repeats)
        fast = step_seconds(sae, x, dead, False, args.repeats)
        print(f"| {d} | {m} | {ref:.3f} s | {fast:.3f} s | {ref / fast:.2f}x | {grad_difference(sae, x, dead):.1e} |")


if __name__ == "__main__":
    main()
