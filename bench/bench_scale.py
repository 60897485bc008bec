"""The 130M-scale CPU budget: the pipeline on random-init models with mamba-130m's and mamba2-130m's configurations.

For each architecture it saves a random-init transformers model with the checkpoint's configuration (24 layers,
d_model 768; vocabulary 50280 / 50288; Mamba-2: 24 heads of 64, d_state 128, one group), runs
``mamba-interp run --model F --layer 12 --samples 64 --seq-len 256 --steps 0-4 --threads 2`` under
``/usr/bin/time -v`` (one process per architecture, ``nice``), and prints one table: per step the memory plan's estimate of the peak
resident memory and CPU time next to the measured peak RSS (``result.json["peak_rss_mb"]``) and wall time, and
per run the wall and user CPU time and the process's peak RSS (the largest step peak). Wall times on a shared machine
are inflated by the other load; user CPU time is what the run costs whatever the load. GNU time's "maximum resident
set size" is not the process's peak here: the runner resets the kernel's high-water mark at every step
(``/proc/self/clear_refs``), and the rusage figure is that mark at exit, i.e. the last step's peak.

Before and after the runs it prints two fixed workloads' rates (``machine_speed``: matrix multiply, elementwise),
so wall times measured on different machines can be compared.

``--calibrate`` instead measures the peak memory of single no-grad forward passes (with and without a hook on the
SSM state) at a few sizes, the data behind ``memory_plan.FORWARD_PER_TOKEN`` and friends; ``--store-bench``
measures the activation store's write and chunked-read throughput against one in-memory safetensors file;
``--calibrate-graph`` the peak memory of step 3's attribution pass (``memory_plan.GRAPH_PER_E`` and friends).

Usage: ``python bench/bench_scale.py [--archs mamba1 mamba2] [--steps 0-4] [--threads 2] [--batch-size 16]
[--work DIR] [--extra "--option sae.epochs=4"]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "mamba1": dict(vocab_size=50280, hidden_size=768, num_hidden_layers=24, state_size=16, expand=2,
                   conv_kernel=4, time_step_rank=48, tie_word_embeddings=True),
    "mamba2": dict(vocab_size=50288, hidden_size=768, num_hidden_layers=24, state_size=128, num_heads=24,
                   head_dim=64, n_groups=1, expand=2, chunk_size=256, tie_word_embeddings=True),
}


def make_model(arch: str, folder: Path) -> Path:
    """A random-init transformers model with the 130m checkpoint's configuration, saved once into ``folder``."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if arch == "mamba1":
        model = tf.MambaForCausalLM(tf.MambaConfig(**CONFIGS[arch]))
    else:
        model = tf.Mamba2ForCausalLM(tf.Mamba2Config(**CONFIGS[arch]))
    model.save_pretrained(folder)
    return folder


def parse_time_v(text: str) -> dict[str, float]:
    """Wall, user and maximum RSS from GNU time's ``-v`` report."""
    out = {}
    m = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    if m:
        out["wall_s"] = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    for key, pat in (("user_s", r"User time \(seconds\): ([\d.]+)"), ("sys_s", r"System time \(seconds\): ([\d.]+)"),
                     ("max_rss_mb", r"Maximum resident set size \(kbytes\): (\d+)")):
        m = re.search(pat, text)
        if m:
            out[key] = float(m.group(1)) / (1024 if key == "max_rss_mb" else 1)
    return out


def run_pipeline(arch: str, args: argparse.Namespace) -> dict:
    model = make_model(arch, Path(args.work) / f"{arch}-130m-init")
    out = Path(args.work) / f"run-{arch}"
    cmd = ["nice", "-n", str(args.nice), "/usr/bin/time", "-v", sys.executable, "-m", "mamba_interp.cli", "run",
           "--model", str(model), "--layer", str(args.layer), "--samples", str(args.samples), "--seq-len",
           str(args.seq_len), "--steps", args.steps, "--batch-size", str(args.batch_size), "-o", str(out),
           "--threads", str(args.threads), *shlex.split(args.extra)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    load = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    res = {"arch": arch, "command": " ".join(cmd[4:]), "returncode": proc.returncode, "load_before": load,
           "load_after": os.getloadavg()[0], "elapsed": time.time() - t0, **parse_time_v(proc.stderr)}
    if proc.returncode != 0:
        res["stderr"] = proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    plan = {s["step"]: s for s in (manifest.get("memory_plan") or {}).get("steps", [])}
    res["steps"] = []
    for rec in manifest.get("steps", []):
        est = plan.get(rec["step"], {})
        res["steps"].append({"step": rec["step"], "name": rec["name"], "status": rec["status"],
                             "duration_s": rec.get("duration_s"), "cpu_s": rec.get("cpu_s"),
                             "peak_rss_mb": rec.get("peak_rss_mb"),
                             "plan_peak_mb": est.get("peak_mb"), "plan_cpu_s": est.get("cpu_seconds")})
    return res


def print_table(results: list[dict]) -> None:
    print("| model | step | plan peak | measured peak RSS | plan CPU | measured CPU | wall |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for s in r["steps"]:
            print(f"| {r['arch']}-130m config | {s['step']} {s['name']} ({s['status']}) | {s['plan_peak_mb']} MB | "
                  f"{s['peak_rss_mb']} MB | {s['plan_cpu_s']} s | {s['cpu_s']} s | {s['duration_s']} s |")
    print()
    print("| model | wall | user CPU | peak RSS (largest step) | GNU time max RSS (last step) | "
          "load (1-min, before/after) | exit |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        peak = max((s["peak_rss_mb"] or 0 for s in r["steps"]), default=0)
        print(f"| {r['arch']}-130m config | {r.get('wall_s', 0):.0f} s | {r.get('user_s', 0):.0f} s | {peak:.0f} MB | "
              f"{r.get('max_rss_mb', 0):.0f} MB | {r['load_before']:.1f} / {r['load_after']:.1f} | "
              f"{r['returncode']} |")


def machine_speed(threads: int) -> dict[str, float]:
    """Two fixed workloads that tell machines apart, so wall times from different machines can be compared: the
    matrix-multiply rate (2048³ float32 products) and the elementwise rate (exp, multiply, add over 25M floats,
    GB/s of tensors read and written), both on ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    gflops = 10 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
    x = torch.randn(16384, 1536)
    t0 = time.perf_counter()
    for _ in range(10):
        y = torch.exp(x)
        y = x * y + 1
    # exp: read x, write y; x * y: read both, write; + 1: read, write -> 6 tensor-sized transfers per round
    gbs = 10 * 6 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9
    return {"matmul_gflops": round(gflops, 1), "elementwise_gb_s": round(gbs, 2)}


def calibrate() -> None:
    """Peak RSS of one forward pass (and with a hook on the SSM state), per size, in fresh processes."""
    code = r'''
import sys, json, torch
torch.set_num_threads(1)
from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.pipeline.memory_plan import forward_bytes
from mamba_interp.pipeline.resources import peak_rss, reset_peak_rss, current_rss
arch, d, b, l, what = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
cfg = MambaConfig(arch=arch, d_model=d, n_layer=2, vocab_size=1000, d_state=16 if arch == "mamba1" else 128,
                  headdim=64)
m = HookedMamba(cfg).eval()
ids = torch.randint(0, 1000, (b, l))
hooks = [("blocks.1.mixer.hook_ssm_state", lambda t, hook: None)] if what == "state" else []
with torch.no_grad():
    m(ids[:1, :8], stop_at_layer=2)
    reset_peak_rss(); base = current_rss()
    m.run_with_hooks(ids, stop_at_layer=2, fwd_hooks=hooks)
    print(json.dumps({"arch": arch, "d": d, "b": b, "l": l, "what": what, "measured_mb": (peak_rss() - base) / 2**20,
                      "formula_mb": forward_bytes(cfg, b, l, states=what == "state") / 2**20}))
'''
    print("| arch | d_model | b x l | hook on the state | measured MB | formula MB |")
    print("|---|---|---|---|---|---|")
    for arch in ("mamba1", "mamba2"):
        for d, b, l in ((256, 8, 256), (512, 16, 256), (768, 8, 512)):
            for what in ("fwd", "state"):
                out = subprocess.run([sys.executable, "-c", code, arch, str(d), str(b), str(l), what],
                                     env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                                     capture_output=True, text=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {arch} | {d} | {b} x {l} | {what == 'state'} | {r['measured_mb']:.0f} | "
                      f"{r['formula_mb']:.0f} |")


def calibrate_graph() -> None:
    """Peak RSS of step 3's attribution pass (``sae_dashboards.attributions``) on the 130M configurations, by batch,
    blocks after the SAE layer and SAEs, in fresh processes: the data behind ``memory_plan.GRAPH_PER_E`` and friends
    (fit the differences between rows: blocks at fixed batch, batch at fixed blocks, SAEs at fixed both)."""
    code = r'''
import sys, json, torch
torch.set_num_threads(2)
from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.pipeline import memory_plan
from mamba_interp.pipeline.logits import layer_input
from mamba_interp.pipeline.resources import current_rss, peak_rss, reset_peak_rss
from mamba_interp.pipeline.sae_dashboards import attributions
from mamba_interp.pipeline.sae_support import TrainedSAE
from mamba_interp.sparse_autoencoder import SAEConfig, SparseAutoencoder
from mamba_interp.tasks.base import TaskBatch
arch, b, layer, hooks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
kw = dict(d_state=16) if arch == "mamba1" else dict(d_state=128, headdim=64, ngroups=1)
cfg = MambaConfig(arch=arch, d_model=768, n_layer=24, vocab_size=50280, **kw)
torch.manual_seed(0)
model = HookedMamba(cfg).eval()
width = {"resid_post": cfg.d_model, "x": cfg.d_inner, "y": cfg.d_inner}
names = {"resid_post": "hook_resid_post", "x": "mixer.hook_x", "y": "mixer.hook_y"}
trained = {h: TrainedSAE(h, h, layer, SparseAutoencoder(SAEConfig(d_in=width[h], d_sae=4 * width[h],
                                                                  architecture="topk", k=16)), torch.zeros(1))
           for h in hooks}
ids, targets = torch.randint(0, 50280, (b, 256)), torch.randint(0, 50280, (b, 256))
start = layer_input(model, ids, None, layer)
memory_plan.ATTRIBUTION_GRAPH_BYTES = 2**60  # the whole batch in one pass
reset_peak_rss(); base = current_rss()
attributions(model, TaskBatch(tokens=ids, targets=targets), trained, b, 50280, start=start)
latents = [t.sae.cfg.d_sae for t in trained.values()]
print(json.dumps({"measured_mb": (peak_rss() - base) / 2**20, "formula_mb": (memory_plan.attribution_graph_bytes(
    cfg, 24 - layer, 256, b, latents) + memory_plan.ATTRIBUTION_LOGIT_COPIES * memory_plan.ATTRIBUTION_LOGIT_CHUNK * 50280 * 4)
    / 2**20}))
'''
    print("| arch | sequences x 256 | blocks after the SAEs | SAEs | measured MB | formula MB |")
    print("|---|---|---|---|---|---|")
    for arch in ("mamba1", "mamba2"):
        for b, layer, hooks in ((2, 12, "resid_post,x,y"), (4, 12, "resid_post,x,y"), (4, 18, "resid_post,x,y"),
                                (4, 12, "resid_post")):
            out = subprocess.run([sys.executable, "-c", code, arch, str(b), str(layer), hooks],
                                 env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"},
                                 capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {arch} | {b} | {24 - layer} | {hooks} | {r['measured_mb']:.0f} | {r['formula_mb']:.0f} |")


def store_bench(work: Path) -> None:
    """Write and chunked-read throughput of the disk store vs one in-memory safetensors file (256 MB)."""
    import torch
    from safetensors.torch import load_file, save_file

    from mamba_interp.pipeline.activation_store import ActivationWriter

    b, l, k = 64, 256, 4096
    x = torch.randn(b, l, k)
    mb = x.numel() * 4 / 2**20
    folder = work / "store_bench"
    t0 = time.perf_counter()
    w = ActivationWriter(folder, b, l)
    for s in range(0, b, 8):
        w.write(("x", 0), s, x[s:s + 8], (k,))
    store = w.finish(torch.ones(b, l, dtype=torch.bool), (0,), ("x",))
    t_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = sum(float(c.sum()) for c in store.token_source("x", 0))
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_file({"x": x}, str(work / "one.safetensors"))
    t_one_w = time.perf_counter() - t0
    t0 = time.perf_counter()
    total2 = float(load_file(str(work / "one.safetensors"))["x"].sum())
    t_one_r = time.perf_counter() - t0
    print(f"store: write {mb / t_write:.0f} MB/s in batches of 8 sequences, chunked read {mb / t_read:.0f} MB/s; "
          f"one safetensors file: write {mb / t_one_w:.0f} MB/s, read {mb / t_one_r:.0f} MB/s "
          f"({mb:.0f} MB; sums {total:.1f} / {total2:.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["mamba1", "mamba2"], choices=sorted(CONFIGS))
    p.add_argument("--steps", default="0-4")
    p.add_argument("--layer", type=int, default=12)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads of the run (default: 2, the budget's two cores)")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--extra", default="", help="more mamba-interp run options, e.g. \"--option sae.epochs=4\"")
    p.add_argument("--work", default="/tmp/bench_scale")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--calibrate", action="store_true")
    p.add_argument("--calibrate-graph", action="store_true")
    p.add_argument("--store-bench", action="store_true")
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        calibrate()
        return
    if args.calibrate_graph:
        calibrate_graph()
        return
    if args.store_bench:
        store_bench(Path(args.work))
        return
    speed = machine_speed(args.threads)
    results = [run_pipeline(arch, args) for arch in args.archs]
    speed_after = machine_speed(args.threads)
    print_table(results)
    print(f"\nmachine speed on {args.threads} threads, before / after the runs: matmul "
          f"{speed['matmul_gflops']} / {speed_after['matmul_gflops']} GFLOP/s, elementwise "
          f"{speed['elementwise_gb_s']} / {speed_after['elementwise_gb_s']} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine_speed": [speed, speed_after], "runs": results}, indent=1))


if __name__ == "__main__":
    main()
