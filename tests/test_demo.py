"""demo.py runs end to end (on the zoo's default model when shipped, else on a tiny task model) and draws its figure."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.pipeline.model_source import default_model_name, import_zoo

ROOT = Path(__file__).resolve().parents[1]


def _demo_module():
    spec = importlib.util.spec_from_file_location("mamba_interp_demo", ROOT / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_runs_quickly(tmp_path, capsys):
    zoo = import_zoo()
    if zoo is not None and default_model_name() in zoo.names():
        argv = []
    else:  # the zoo is not shipped yet: a random-init model with an induction card exercises the same code
        folder = tmp_path / "model"
        torch.manual_seed(0)
        HookedMamba(MambaConfig(d_model=32, n_layer=2, vocab_size=16, d_state=8)).save_pretrained(folder)
        (folder / "card.json").write_text(json.dumps({"task": "induction", "task_params": {"seq_len": 32}}))
        argv = ["--model", str(folder)]
    t0 = time.perf_counter()
    assert _demo_module().main([*argv, "--out", str(tmp_path / "demo")]) == 0
    assert time.perf_counter() - t0 < 120
    out = capsys.readouterr().out
    for heading in ("1. Load", "2. Hook points", "3. Cache", "4. Activation patching", "5. A figure"):
        assert heading in out
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 5_000
