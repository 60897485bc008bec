"""GPU check: one script, one table, about 5 minutes on one GPU (``python bench/gpu_check.py``).

For Mamba-1 and Mamba-2 it checks, on the chosen device:

1. parity: every scan implementation the architecture has (``reference``, ``loop``, ``parallel`` / ``chunked``,
   ``compiled`` on the CPU, and ``kernel`` when mamba_ssm is installed) against the reference scan on the same
   weights: max |Δ| of the logits and of every parameter gradient, relative to the reference's largest value, in
   float32 and bfloat16 (tolerances 1e-4 and 5e-2);
2. the fused kernels (mamba_ssm's ``selective_scan_fn`` / ``mamba_chunk_scan_combined`` and causal_conv1d) against
   our scans, when installed (the ``kernel`` rows of 1.);
3. speed: forward and forward + backward time of ``HookedMamba`` (``scan_impl="auto"``) and of transformers'
   model on the same weights at L = 1024 and 8192 (its CUDA path uses the same kernels when installed);
4. the pipeline: steps 0–3 of ``mamba-interp run`` on the default zoo model on this device.

``--device cpu`` runs the same checks at small sizes (L = 128 and 256, a smaller model) to show the script works
where no GPU is available. Exit code 1 when a parity check or a pipeline step fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mamba_interp import HookedMamba  # noqa: E402
from mamba_interp.models.ops import kernels  # noqa: E402
from mamba_interp.models.ops.dispatch import _VALID  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def build(arch: str, d_model: int, n_layer: int, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layer, state_size=16)
    torch.manual_seed(0)
    if arch == "mamba1":
        hf = tf.MambaForCausalLM(tf.MambaConfig(**common))
    else:
        hf = tf.Mamba2ForCausalLM(tf.Mamba2Config(num_heads=d_model * 2 // 64, head_dim=64, n_groups=1,
                                                  tie_word_embeddings=True, **common))
    return hf.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def grads(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()
                                     if p.grad is not None}


def parity(hf, arch: str, device: torch.device, dtype: torch.dtype, length: int) -> list[dict]:
    ids = torch.randint(0, hf.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(1)).to(device)
    ref = HookedMamba.from_transformers(hf, scan_impl="reference").to(device=device, dtype=dtype)
    ref_logits, ref_grads = grads(ref, ids)
    rows = []
    for impl in _VALID[arch]:
        if impl == "reference":
            continue
        if impl == "kernel" and not (device.type == "cuda" and kernels.available(arch)):
            rows.append({"check": f"{arch} scan {impl} {str(dtype)[6:]}", "result": "skipped (mamba_ssm not "
                         "installed or no CUDA)", "ok": True})
            continue
        if impl == "compiled" and device.type != "cpu":
            rows.append({"check": f"{arch} scan {impl} {str(dtype)[6:]}", "result": "skipped (the compiled scan "
                         "is the CPU kernel)", "ok": True})
            continue
        model = HookedMamba.from_transformers(hf, scan_impl=impl).to(device=device, dtype=dtype)
        logits, g = grads(model, ids)
        scale = float(ref_logits.abs().max())
        d_logit = float((logits - ref_logits).abs().max()) / scale
        d_grad = max(float((g[n] - ref_grads[n]).abs().max()) / max(float(ref_grads[n].abs().max()), 1e-12)
                     for n in ref_grads)
        tol = TOLERANCE[dtype]
        ok = d_logit <= tol and d_grad <= 10 * tol
        rows.append({"check": f"{arch} scan {impl} {str(dtype)[6:]} L={length}",
                     "result": f"logits {d_logit:.1e}, grads {d_grad:.1e} (rel.; tol {tol:g} / {10 * tol:g})",
                     "ok": ok})
    return rows


def speed(hf, arch: str, device: torch.device, lengths: list[int], batch: int) -> list[dict]:
    ours = HookedMamba.from_transformers(hf).to(device)
    theirs = hf.to(device)
    rows = []
    for length in lengths:
        ids = torch.randint(0, hf.config.vocab_size, (batch, length)).to(device)
        with torch.no_grad():
            f_ours = timed(lambda: ours(ids), device)
            f_hf = timed(lambda: theirs(ids).logits, device)

        def fb(model, get):
            def run():
                model.zero_grad(set_to_none=True)
                get(model(ids)).float().logsumexp(-1).mean().backward()
            return run

        b_ours = timed(fb(ours, lambda o: o), device, repeats=2)
        b_hf = timed(fb(theirs, lambda o: o.logits), device, repeats=2) if device.type == "cuda" or length <= 256 \
            else float("nan")
        rows.append({"check": f"{arch} speed L={length} b={batch}",
                     "result": f"forward {f_ours * 1e3:.1f} ms vs transformers {f_hf * 1e3:.1f} ms "
                               f"({f_ours / f_hf:.2f}x); fwd+bwd {b_ours * 1e3:.1f} ms vs {b_hf * 1e3:.1f} ms "
                               f"({b_ours / b_hf:.2f}x)", "ok": True})
    return rows


def pipeline(device: torch.device) -> list[dict]:
    from mamba_interp.pipeline import RunConfig, Runner

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        runner = Runner(RunConfig(steps="0-3", device=str(device), output=str(Path(tmp) / "run"), quiet=True,
                                  figures=False))
        try:
            summary = runner.run()
        finally:
            runner.close()
        rows = []
        for n, rec in summary.records.items():
            rows.append({"check": f"pipeline step {n} {rec.step.name} on {device}",
                         "result": f"{rec.status} in {rec.duration_s} s, peak RSS {rec.peak_rss_mb} MB",
                         "ok": rec.status == "completed"})
        rows.append({"check": "pipeline steps 0-3 total", "result": f"{time.perf_counter() - t0:.1f} s",
                     "ok": not summary.failed})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--archs", nargs="+", default=["mamba1", "mamba2"], choices=["mamba1", "mamba2"])
    ap.add_argument("--skip-pipeline", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    import transformers

    transformers.logging.set_verbosity_error()
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(1)
    d_model, n_layer, vocab = (768, 4, 8192) if gpu else (64, 2, 256)
    parity_len, lengths, batch = (512, [1024, 8192], 4) if gpu else (64, [128, 256], 2)
    name = torch.cuda.get_device_name(device) if gpu else "CPU (small sizes)"
    print(f"gpu_check on {device} ({name}); torch {torch.__version__}, transformers {transformers.__version__}, "
          f"mamba_ssm kernels: mamba1 {kernels.available('mamba1')}, mamba2 {kernels.available('mamba2')}")
    rows: list[dict] = []
    for arch in args.archs:
        hf = build(arch, d_model, n_layer, vocab)
        for dtype in (torch.float32, torch.bfloat16):
            rows += parity(hf, arch, device, dtype, parity_len)
        rows += speed(hf, arch, device, lengths, batch)
    if not args.skip_pipeline:
        rows += pipeline(device)
    width = max(len(r["check"]) for r in rows)
    print(f"| {'check':<{width}} | ok | result |")
    print(f"|{'-' * (width + 2)}|----|--------|")
    for r in rows:
        print(f"| {r['check']:<{width}} | {'yes' if r['ok'] else 'NO'} | {r['result']} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
