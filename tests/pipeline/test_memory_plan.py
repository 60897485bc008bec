"""The memory plan: sizes match what is collected, --dry-run writes nothing but prints the plan, a run that cannot
fit is refused with one line naming the option, and (slow) the estimates are within 30 % of the measured peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig, cli
from mamba_interp.pipeline.activation_stats import available_hooks, collect_activations
from mamba_interp.pipeline.memory_plan import collection_batch, decide_store, hook_width
from mamba_interp.pipeline.resources import current_rss, peak_rss, reset_peak_rss

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_hook_widths_are_the_collected_widths(arch):
    cfg = MambaConfig(arch=arch, d_model=32, n_layer=1, vocab_size=20, d_state=8, headdim=16, ngroups=2)
    model = HookedMamba(cfg).eval()
    hooks = available_hooks(arch)
    acts = collect_activations(model, torch.randint(0, 20, (2, 5)), [0], hooks, batch_size=2)
    assert {h: hook_width(cfg, h) for h in hooks} == {h: acts[(h, 0)].shape[-1] for h in hooks}


def test_store_choice_and_state_micro_batches():
    assert decide_store("auto", 10 << 20, 8 << 30) == "memory"
    assert decide_store("auto", 3 << 30, 64 << 30) == "disk"  # above the 2 GiB limit
    assert decide_store("auto", 1 << 30, 2 << 30) == "disk"  # above a quarter of the free memory
    assert decide_store("memory", 1 << 40, 1 << 30) == "memory"
    m2 = MambaConfig(arch="mamba2", d_model=768, n_layer=1, d_state=128, headdim=64)
    assert collection_batch(m2, 256, ("x",), 64) == 64
    assert 1 <= collection_batch(m2, 256, ("x", "state_norm"), 64) < 64


def test_peak_rss_counter_resets():
    if not reset_peak_rss():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    before = peak_rss()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB touched
    assert peak_rss() >= current_rss() >= (before or 0) and block.sum() > 0


def test_dry_run_prints_the_plan_and_writes_nothing(lm_model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["run", "--model", str(lm_model_dir), "--steps", "0-3", "--dry-run", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "memory plan:" in text and "dry run: nothing was written" in text
    for name in ("setup", "tasks", "activations", "sae"):
        assert name in text
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_run_needing_more_disk_than_free_is_refused(lm_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MAMBA_INTERP_DISK_FREE_MB", "1000")  # 1 GB free; the activations need ~6 GB
    out = tmp_path / "big"
    code = cli.main(["run", "--model", str(lm_model_dir), "--samples", "4000", "--seq-len", "512", "--layer",
                     "all", "--steps", "0-2", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("mamba-interp: error: the run needs about") and "--samples" in err[0]
    assert not out.exists()


def test_datasets_beyond_the_memory_are_refused_naming_samples(lm_model_dir, tmp_path, capsys):
    # the issue's case: 200000 x 4096 tokens, every layer; step 1's token tensors alone exceed any machine
    out = tmp_path / "huge"
    code = cli.main(["run", "--model", str(lm_model_dir), "--samples", "200000", "--seq-len", "4096", "--layer",
                     "all", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "step 1 (tasks) needs about" in err[0] and "--samples" in err[0]
    assert not out.exists()


def test_a_step_that_cannot_fit_the_memory_is_refused_naming_the_batch_size(lm_model_dir, tmp_path, capsys,
                                                                          monkeypatch):
    # a forward pass of 64 x 4096 tokens needs ~0.9 GB on this model; allow 300 MB more than the process holds
    monkeypatch.setenv("MAMBA_INTERP_AVAILABLE_MB", str((current_rss() or 0) / 2**20 + 300))
    out = tmp_path / "ram"
    code = cli.main(["run", "--model", str(lm_model_dir), "--samples", "64", "--seq-len", "4096", "--batch-size",
                     "64", "--steps", "0-1", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "step 1 (tasks) needs about" in err[0] and "--batch-size" in err[0]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("d_model", [128, 384])
def test_plan_is_within_30_percent_of_the_measured_peaks(tmp_path, d_model):
    """Steps 2 and 3 on two model sizes, each in a fresh process (the runner records each step's peak RSS)."""
    folder = tmp_path / "model"
    torch.manual_seed(0)
    HookedMamba(MambaConfig(arch="mamba1", d_model=d_model, n_layer=2, vocab_size=1000, d_state=16)
                ).save_pretrained(folder)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mamba_interp.cli", "run", "--model", str(folder), "--steps", "0-3", "--samples",
           "48", "--seq-len", "256", "--batch-size", "16", "--no-figures", "-q", "-o", str(out),
           "--option", "sae.epochs=1", "--option", "sae.hooks=resid_post"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    plan = {s["step"]: s["peak_mb"] for s in manifest["memory_plan"]["steps"]}
    measured = {s["step"]: s["peak_rss_mb"] for s in manifest["steps"]}
    for step in (2, 3):
        assert measured[step] is not None
        assert abs(plan[step] - measured[step]) <= 0.3 * measured[step], (step, plan[step], measured[step])
