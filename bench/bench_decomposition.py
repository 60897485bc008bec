"""Parameter decomposition on the toy models, ours side by side with the reference implementations.

    python bench/bench_decomposition.py                                  # our SPD and APD on TMS 5-2
    python bench/bench_decomposition.py --ref-python PY --ref-spd DIR --ref-apd DIR   # + the references
    python bench/bench_decomposition.py --methods apd --seeds 0,1,2,3,4 --ref-python PY --ref-apd DIR  # per seed
    python bench/bench_decomposition.py --toy tms-id                     # TMS 5-2 + identity (SPD)
    python bench/bench_decomposition.py --toy resid-mlp --steps 3000 --batch-size 2048   # residual MLP (SPD)

The references run in their own interpreter (``--ref-python``, an environment where their code imports; they are
never part of this project): ``--ref-spd`` is a checkout of goodfire-ai/spd at branch ``spd-paper`` (the SPD
paper's code), ``--ref-apd`` one of ApolloResearch/apd (the APD paper's code; its package is also named ``spd``).
Both are run on the same shipped TMS 5-2 target with the same settings as ours, through their own training loops
(``spd.run_spd.optimize``); their learned components, one-hot importances and held-out importances come back as
tensors, and every figure is computed by our ``metrics`` for both, plus the reference analyser's ML2R (cosine
argmax) for comparison. CPU time is per process (one torch thread each); on a shared machine wall time is not.

Outputs one table per toy (and ``--out FILE``: the JSON of all figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mamba_interp.parameter_decomposition.metrics import (  # noqa: E402
    alive,
    ci_l0,
    dense_ci_error,
    feature_match,
    identity_ci_error,
    n_large,
)
from mamba_interp.parameter_decomposition.toy_models import (  # noqa: E402
    decompose_resid_mlp,
    decompose_tms,
    tms_5_2,
    tms_target,
    train_resid_mlp,
)

N_EVAL = 100_000
EVAL_SEED = 12345

# ---- the reference drivers (run by --ref-python with PYTHONPATH=<checkout>) --------------------------------------
REF_SPD = r"""
import json, sys, time, io, contextlib, re
from pathlib import Path
import torch
torch.set_num_threads(1)
from spd.configs import Config
from spd.experiments.tms.models import TMSModel, TMSModelConfig
from spd.data_utils import DatasetGeneratedDataLoader, SparseFeatureDataset
from spd.run_spd import optimize
from spd.utils import set_seed
from spd.models.component_model import ComponentModel
from spd.models.component_utils import calc_causal_importances

a = json.loads(sys.argv[1]); out = Path(a["out"])
set_seed(a["seed"])
tm = TMSModel(TMSModelConfig(n_features=5, n_hidden=2, n_hidden_layers=0, tied_weights=True,
                             init_bias_to_zero=False, device="cpu"))
with torch.no_grad():
    tm.linear1.weight.copy_(torch.tensor(a["W"])); tm.linear2.bias.copy_(torch.tensor(a["b"]))
tm.tie_weights_(); tm.eval()
cfg = Config(wandb_project=None, seed=a["seed"], C=a["C"], n_mask_samples=1, n_ci_mlp_neurons=16,
             target_module_patterns=["linear1", "linear2"], faithfulness_coeff=1.0, stochastic_recon_coeff=1.0,
             stochastic_recon_layerwise_coeff=1.0, importance_minimality_coeff=a["imp"], pnorm=1.0,
             output_loss_type="mse", lr=a["lr"], steps=a["steps"], batch_size=a["batch_size"], lr_schedule="cosine",
             lr_warmup_pct=0.0, n_eval_steps=1, image_freq=None, print_freq=max(1, a["steps"] // 10), save_freq=None,
             pretrained_model_class="spd.experiments.tms.models.TMSModel",
             task_config={"task_name": "tms", "feature_probability": 0.05,
                          "data_generation_type": "at_least_zero_active"})
ds = SparseFeatureDataset(n_features=5, feature_probability=0.05, device="cpu",
                          data_generation_type="at_least_zero_active", value_range=(0.0, 1.0))
loader = DatasetGeneratedDataLoader(ds, batch_size=cfg.batch_size, shuffle=False)
log = io.StringIO()
t0 = time.process_time()
with contextlib.redirect_stdout(log), contextlib.redirect_stderr(io.StringIO()):
    optimize(target_model=tm, config=cfg, device="cpu", train_loader=loader, eval_loader=loader, n_eval_steps=1,
             out_dir=out, tied_weights=[("linear1", "linear2")])
cpu = time.process_time() - t0
cm = ComponentModel(base_model=tm, target_module_patterns=["linear1", "linear2"], C=a["C"], n_ci_mlp_neurons=16,
                    pretrained_model_output_attr=None)
cm.load_state_dict(torch.load(out / f"model_{a['steps']}.pth", map_location="cpu"))
comps = {k.removeprefix("components.").replace("-", "."): v for k, v in cm.components.items()}
gates = {k.removeprefix("gates.").replace("-", "."): v for k, v in cm.gates.items()}
def ci(x):
    _, acts = cm.forward_with_pre_forward_cache_hooks(x, module_names=list(comps))
    return calc_causal_importances(acts, {n: c.A for n, c in comps.items()}, gates)[0]
x = torch.load(a["heldout"])
with torch.no_grad():
    ci_hot = ci(0.75 * torch.eye(5)); ci_x = ci(x); y = tm(x)
    masked = cm.forward_with_components(x, components=comps, masks=ci_x)
    full = cm.forward_with_components(x, components=comps, masks=None)
last = {}
for line in log.getvalue().splitlines():
    m = re.match(r"^([a-z_/]+): ([-0-9.e]+)$", line.strip())
    if m: last[m.group(1)] = float(m.group(2))
res = {"cpu_s": cpu, "losses": last,
       "U": {n: c.B.detach().tolist() for n, c in comps.items()},      # B [C, d_out] = our U
       "V": {n: c.A.detach().T.tolist() for n, c in comps.items()},    # A [d_in, C] = our V^T
       "ci_one_hot": {n: v.tolist() for n, v in ci_hot.items()},
       "recon_mse_importance_masked": float(((masked - y) ** 2).mean()),
       "recon_mse_unmasked": float(((full - y) ** 2).mean())}
torch.save({n: v for n, v in ci_x.items()}, out / "ci_heldout.pt")
(out / "result.json").write_text(json.dumps(res))
"""

REF_APD = r"""
import json, sys, time, io, contextlib, re
from pathlib import Path
import torch
torch.set_num_threads(1)
from spd.experiments.tms.models import TMSModel, TMSModelConfig, TMSSPDModel, TMSSPDModelConfig
from spd.run_spd import Config, optimize
from spd.utils import (DatasetGeneratedDataLoader, SparseFeatureDataset, calc_grad_attributions, calc_topk_mask,
                       collect_nested_module_attrs, set_seed)

a = json.loads(sys.argv[1]); out = Path(a["out"])
set_seed(a["seed"])
tm = TMSModel(TMSModelConfig(n_instances=1, n_features=5, n_hidden=2, n_hidden_layers=0, device="cpu"))
with torch.no_grad():
    tm.linear1.weight.copy_(torch.tensor(a["W"]).T[None]); tm.b_final.copy_(torch.tensor(a["b"])[None])
tm.eval()
cfg = Config(wandb_project=None, seed=a["seed"], topk=a["topk"], batch_topk=True, C=5, m=a["m"],
             param_match_coeff=1.0, topk_recon_coeff=1.0, attribution_type="gradient", schatten_pnorm=1.0,
             schatten_coeff=a["schatten"], batch_size=a["batch_size"], steps=a["steps"],
             print_freq=max(1, a["steps"] // 10), image_freq=None, save_freq=None, lr=a["lr"],
             lr_schedule="constant", lr_warmup_pct=0.05,
             task_config={"task_name": "tms", "bias_val": 0.0, "train_bias": False, "feature_probability": 0.05,
                          "data_generation_type": "at_least_zero_active", "pretrained_model_path": "unused.pth"})
model = TMSSPDModel(TMSSPDModelConfig(n_instances=1, n_features=5, n_hidden=2, n_hidden_layers=0, C=5, m=a["m"],
                                      bias_val=0.0, device="cpu"))
model.b_final.data[:] = tm.b_final.data.clone(); model.b_final.requires_grad = False
ds = SparseFeatureDataset(n_instances=1, n_features=5, feature_probability=0.05, device="cpu",
                          data_generation_type="at_least_zero_active", value_range=(0.0, 1.0))
loader = DatasetGeneratedDataLoader(ds, batch_size=cfg.batch_size)
log = io.StringIO()
t0 = time.process_time()
with contextlib.redirect_stdout(log), contextlib.redirect_stderr(io.StringIO()):
    optimize(model=model, config=cfg, device="cpu", dataloader=loader, target_model=tm,
             param_names=["linear1", "linear2"], out_dir=None)
cpu = time.process_time() - t0
def attributions(x):
    x = x[:, None, :]
    out, cache = tm.run_with_cache(x, names_filter=lambda k: k.endswith((".hook_pre", ".hook_post")))
    cw = collect_nested_module_attrs(model, attr_name="component_weights", include_attr_name=False)
    return calc_grad_attributions(target_out=out, component_weights=cw,
        pre_weight_acts={k: v for k, v in cache.items() if k.endswith("hook_pre")},
        post_weight_acts={k: v for k, v in cache.items() if k.endswith("hook_post")}, C=5)[:, 0], out[:, 0]
x = torch.load(a["heldout"])
hot, _ = attributions(0.75 * torch.eye(5))
att, y = attributions(x)
with torch.no_grad():
    mask = calc_topk_mask(att[:, None], a["topk"], batch_topk=True)
    masked = model(x[:, None], topk_mask=mask)[:, 0]
    full = model(x[:, None])[:, 0]
cw = model.linear1.component_weights.detach()[0]  # [C, d_in, d_out]
last = {}
for line in log.getvalue().splitlines():
    m = re.match(r"^([A-Za-z_ /]+): ([-0-9.e]+)$", line.strip())
    if m: last[m.group(1).strip()] = float(m.group(2))
res = {"cpu_s": cpu, "losses": last, "P_linear1": cw.transpose(1, 2).tolist(),   # our [C, o, i]
       "importance_one_hot": (hot / hot.amax(-1, keepdim=True).clamp_min(1e-30)).tolist(),
       "recon_mse_importance_masked": float(((masked - y) ** 2).mean()),
       "recon_mse_unmasked": float(((full - y) ** 2).mean())}
torch.save(att / att.amax(-1, keepdim=True).clamp_min(1e-30), out / "ci_heldout.pt")
(out / "result.json").write_text(json.dumps(res))
"""


def heldout(n: int = N_EVAL) -> torch.Tensor:
    target = tms_target(*tms_5_2())
    return target.sample(n, torch.Generator().manual_seed(EVAL_SEED))


class Reference:
    """A reference run in its own process, started at once (it runs while ours do) and collected with
    :meth:`result`."""

    def __init__(self, code: str, python: str, checkout: str, args: dict) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="ref_")
        self.out = Path(self.tmp.name)
        torch.save(heldout(), self.out / "heldout.pt")
        env = {**os.environ, "PYTHONPATH": checkout, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
        payload = json.dumps({**args, "out": str(self.out), "heldout": str(self.out / "heldout.pt")})
        self.proc = subprocess.Popen([python, "-c", code, payload], env=env, cwd=checkout, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def result(self) -> dict:
        _, err = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"reference run failed:\n{err[-3000:]}")
        res = json.loads((self.out / "result.json").read_text())
        res["ci_heldout"] = torch.load(self.out / "ci_heldout.pt")
        self.tmp.cleanup()
        return res


def figures_from(P1: torch.Tensor, norms: dict[str, torch.Tensor], one_hot: dict[str, torch.Tensor],
                 ci_x: dict[str, torch.Tensor], W: torch.Tensor, extra: dict) -> dict:
    fm = feature_match(P1, W)
    out = {"mmcs": fm.mmcs, "ml2r": fm.ml2r, "ml2r_cosine_argmax": fm.ml2r_cosine_argmax}
    for name in one_hot:
        out[name] = {"n_large": n_large(norms[name]), "identity_ci_error": identity_ci_error(one_hot[name]),
                     "alive_0.1": int(alive(ci_x[name], 0.1).sum()), "alive_0.5": int(alive(ci_x[name], 0.5).sum()),
                     "ci_l0_0.1": ci_l0(ci_x[name], 0.1)}
    out.update(extra)
    return out


def ours_tms(method: str, args) -> dict:
    W, b = tms_5_2()
    kw = {"steps": args.steps, "batch_size": args.batch_size, "progress": False}
    if method == "apd":
        kw = {"steps": args.apd_steps, "batch_size": args.apd_batch_size, "rank": 3, "progress": False}
    start = time.process_time()
    dec = decompose_tms(W, b, method, seed=args.seed, **kw)
    cpu = time.process_time() - start
    m = dec.metrics(n_eval=N_EVAL, seed=EVAL_SEED)
    x = heldout()
    with torch.no_grad():
        ci_x = dec.importances(x)
    from mamba_interp.parameter_decomposition.metrics import one_hot_importances

    norms = {n: dec.model.norms(n) for n in dec.target.modules}
    last = dec.history[-1]
    return figures_from(dec.component_matrices("linear1"), norms, one_hot_importances(dec), ci_x, W,
                        {"cpu_s": cpu, "final_losses": last,
                         "recon_mse_importance_masked": m["recon_mse_importance_masked"],
                         "recon_mse_unmasked": m["recon_mse_unmasked"]})


def start_reference_spd(args) -> Reference:
    W, b = tms_5_2()
    return Reference(REF_SPD, args.ref_python, args.ref_spd,
                     {"W": W.tolist(), "b": b.tolist(), "seed": args.seed, "C": 20, "imp": 3e-3, "lr": 1e-3,
                      "steps": args.steps, "batch_size": args.batch_size})


def reference_spd(ref: Reference) -> dict:
    W, _ = tms_5_2()
    res = ref.result()
    U = {n: torch.tensor(u) for n, u in res["U"].items()}
    V = {n: torch.tensor(v) for n, v in res["V"].items()}
    P1 = torch.einsum("co,ci->coi", U["linear1"], V["linear1"])
    norms = {n: U[n].norm(dim=1) * V[n].norm(dim=1) for n in U}
    hot = {n: torch.tensor(v) for n, v in res["ci_one_hot"].items()}
    return figures_from(P1, norms, hot, res["ci_heldout"], W,
                        {"cpu_s": res["cpu_s"], "final_losses": res["losses"],
                         "recon_mse_importance_masked": res["recon_mse_importance_masked"],
                         "recon_mse_unmasked": res["recon_mse_unmasked"]})


def start_reference_apd(args) -> Reference:
    W, b = tms_5_2()
    return Reference(REF_APD, args.ref_python, args.ref_apd,
                     {"W": W.tolist(), "b": b.tolist(), "seed": args.seed, "topk": 0.211, "m": 3, "schatten": 0.7,
                      "lr": 0.03, "steps": args.apd_steps, "batch_size": args.apd_batch_size})


def reference_apd(ref: Reference) -> dict:
    W, _ = tms_5_2()
    res = ref.result()
    P1 = torch.tensor(res["P_linear1"])
    norms = {"linear1": P1.flatten(1).norm(dim=1)}
    hot = {"linear1": torch.tensor(res["importance_one_hot"])}
    return figures_from(P1, norms, hot, {"linear1": res["ci_heldout"]}, W,
                        {"cpu_s": res["cpu_s"], "final_losses": res["losses"],
                         "recon_mse_importance_masked": res["recon_mse_importance_masked"],
                         "recon_mse_unmasked": res["recon_mse_unmasked"]})


ROWS = [("CPU seconds", lambda r: f"{r['cpu_s']:.0f}"), ("MMCS", lambda r: f"{r['mmcs']:.5f}"),
        ("ML2R (norm-aware)", lambda r: f"{r['ml2r']:.4f}"),
        ("ML2R (reference analyser: cosine argmax)", lambda r: f"{r['ml2r_cosine_argmax']:.4f}")]
for _name in ("linear1", "linear2"):
    for _key, _label in (("n_large", "subcomponents with norm > 0.3 max"), ("identity_ci_error", "identity-CI error"),
                         ("alive_0.1", "alive (importance > 0.1, 100k held-out)"), ("alive_0.5", "alive (> 0.5)"),
                         ("ci_l0_0.1", "CI-L0 (> 0.1) per sample")):
        ROWS.append((f"{_name}: {_label}", lambda r, n=_name, k=_key: str(r[n][k]) if n in r else "-"))


def final_loss(r: dict, *keys: str) -> str:
    """The last logged value of a training loss, under our name or the reference's."""
    for k in keys:
        if k in r["final_losses"]:
            return f"{r['final_losses'][k]:.2e}"
    return "-"


ROWS += [("final L_stochastic-recon (SPD) / top-k recon (APD)",
          lambda r: final_loss(r, "stochastic_recon", "loss/stochastic_recon", "minimality", "topk_recon_loss")),
         ("final L_layerwise (SPD)", lambda r: final_loss(r, "layerwise_recon", "loss/stochastic_recon_layerwise")),
         ("final L_importance-minimality (SPD) / Schatten (APD)",
          lambda r: final_loss(r, "importance_minimality", "loss/importance_minimality", "simplicity",
                               "schatten_loss")),
         ("final L_faithfulness", lambda r: final_loss(r, "faithfulness", "loss/faithfulness", "param_match_loss")),
         ("importance-masked recon MSE", lambda r: f"{r['recon_mse_importance_masked']:.2e}"),
         ("unmasked recon MSE", lambda r: f"{r['recon_mse_unmasked']:.2e}")]


def table(results: dict[str, dict]) -> str:
    names = list(results)
    width = max(len(r[0]) for r in ROWS) + 2
    lines = ["".ljust(width) + "".join(n.rjust(16) for n in names)]
    for label, fn in ROWS:
        vals = []
        for n in names:
            try:
                vals.append(fn(results[n]))
            except (KeyError, TypeError):
                vals.append("-")
        lines.append(label.ljust(width) + "".join(v.rjust(16) for v in vals))
    return "\n".join(lines)


def tms_results(args) -> dict[str, dict]:
    """Every chosen method on TMS 5-2 at ``args.seed``: ours in this process, the references alongside."""
    results: dict[str, dict] = {}
    methods = args.methods.split(",")
    ref_spd = start_reference_spd(args) if args.ref_python and args.ref_spd else None
    ref_apd = start_reference_apd(args) if args.ref_python and args.ref_apd else None
    if "spd" in methods:
        results["SPD (ours)"] = ours_tms("spd", args)
    if ref_spd is not None:
        results["SPD (spd-paper)"] = reference_spd(ref_spd)
    if "apd" in methods:
        results["APD (ours)"] = ours_tms("apd", args)
    if ref_apd is not None:
        results["APD (apd)"] = reference_apd(ref_apd)
    return results


def seed_table(per_seed: dict[int, dict[str, dict]]) -> str:
    """MMCS / norm-aware ML2R of every column per seed, and how many seeds reach MMCS >= 0.99."""
    names = list(next(iter(per_seed.values())))
    lines = ["| seed | " + " | ".join(f"{n} MMCS / ML2R" for n in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    for seed, res in per_seed.items():
        lines.append(f"| {seed} | " + " | ".join(f"{res[n]['mmcs']:.4f} / {res[n]['ml2r']:.3f}" for n in names)
                     + " |")
    counts = [sum(res[n]["mmcs"] >= 0.99 for res in per_seed.values()) for n in names]
    lines.append("| MMCS >= 0.99 | " + " | ".join(f"{c} of {len(per_seed)} seeds" for c in counts) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", choices=("tms", "tms-id", "resid-mlp"), default="tms")
    ap.add_argument("--steps", type=int, default=10_000, help="SPD steps (the paper: 40k; 8-10k suffice on TMS)")
    ap.add_argument("--batch-size", type=int, default=1024, help="SPD batch (the paper: 4096)")
    ap.add_argument("--apd-steps", type=int, default=20_000, help="APD steps (the paper: 20k)")
    ap.add_argument("--apd-batch-size", type=int, default=2048, help="APD batch (the paper: 2048)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", help="TMS only: comma-separated seeds, one run of every method per seed and a "
                                    "per-seed summary (APD's outcome depends on the seed)")
    ap.add_argument("--methods", default="spd,apd", help="which of ours to run on TMS: spd, apd or both")
    ap.add_argument("--ref-python", help="interpreter of an environment where the reference code imports")
    ap.add_argument("--ref-spd", help="checkout of goodfire-ai/spd at branch spd-paper")
    ap.add_argument("--ref-apd", help="checkout of ApolloResearch/apd")
    ap.add_argument("--out", help="write every figure as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {args.toy}, seed {args.seed}; load average {os.getloadavg()[0]:.1f} (CPU seconds are per process)")
    results: dict[str, dict] = {}
    if args.toy == "tms" and args.seeds:
        per_seed = {}
        for seed in (int(x) for x in args.seeds.split(",")):
            per_seed[seed] = tms_results(argparse.Namespace(**{**vars(args), "seed": seed}))
            print(f"## seed {seed}")
            print(table(per_seed[seed]))
        print(seed_table(per_seed))
        results = {str(k): v for k, v in per_seed.items()}
    elif args.toy == "tms":
        results = tms_results(args)
        print(f"TMS 5-2 (shipped pentagon), SPD {args.steps} x {args.batch_size}, APD {args.apd_steps} x "
              f"{args.apd_batch_size}; figures by mamba_interp.parameter_decomposition.metrics for every column")
        print(table(results))
    elif args.toy == "tms-id":
        start = time.process_time()
        dec = decompose_tms(*tms_5_2(), "spd", seed=args.seed, identity=True, steps=args.steps,
                            batch_size=args.batch_size, progress=False)
        results["SPD TMS+ID (ours)"] = {"cpu_s": time.process_time() - start, **dec.metrics(n_eval=N_EVAL)}
        print(json.dumps(results, indent=1, default=str))
    else:
        start = time.process_time()
        model = train_resid_mlp(seed=args.seed)
        dec = decompose_resid_mlp(model, "spd", seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                                  progress=False)
        results["SPD ResidMLP1 (ours)"] = {"cpu_s": time.process_time() - start, **dec.metrics(n_eval=20_000)}
        print(json.dumps(results, indent=1, default=str))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
