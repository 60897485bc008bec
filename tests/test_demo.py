"""demo.py runs end to end on the zoo's default model and on a checkpoint folder, prints the public calls it makes
(and makes them), patches the residual stream and the SSM state, and draws its figure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig, zoo

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("1. Load", "2. Hook points", "3. Cache", "4. Activation patching", "5. A figure")


def _demo_module():
    spec = importlib.util.spec_from_file_location("mamba_interp_demo", ROOT / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(out: str, figure: Path) -> None:
    for heading in SECTIONS:
        assert heading in out
    assert "patching the residual stream" in out and "patching the SSM state" in out
    assert "mixer.hook_ssm_state', patch" in out and "state norm (per channel" in out
    assert figure.stat().st_size > 5_000


def test_demo_on_the_default_zoo_model_calls_what_it_prints(tmp_path, capsys, monkeypatch):
    if zoo.DEFAULT not in zoo.names():
        pytest.skip("the default zoo model is not shipped")
    calls = []
    real_load = zoo.load
    monkeypatch.setattr(zoo, "load", lambda name=zoo.DEFAULT, device=None: calls.append(name) or real_load(name))
    assert _demo_module().main(["--out", str(tmp_path / "demo"), "--samples", "32"]) == 0
    out = capsys.readouterr().out
    assert ">>> model = zoo.load(zoo.DEFAULT)" in out and calls == [zoo.DEFAULT]
    _check(out, tmp_path / "demo" / "demo.png")
    # the induction model stores the value in layer 0's state: patching it there restores the answer
    assert "patching the SSM state restores at least half of it at: layer 0 at value_pos" in out


def test_demo_on_a_folder_prints_the_folder_loader(tmp_path, capsys):
    folder = tmp_path / "model"
    torch.manual_seed(0)
    HookedMamba(MambaConfig(d_model=16, n_layer=2, vocab_size=16, d_state=4)).save_pretrained(folder)
    (folder / "card.json").write_text(json.dumps({"task": "induction", "task_params": {"seq_len": 16}}))
    assert _demo_module().main(["--model", str(folder), "--out", str(tmp_path / "demo"), "--samples", "8"]) == 0
    out = capsys.readouterr().out
    assert f">>> model = HookedMamba.from_pretrained({str(folder)!r})" in out and "zoo.load" not in out
    _check(out, tmp_path / "demo" / "demo.png")
    (folder / "card.json").unlink()
    assert _demo_module().main(["--model", str(folder)]) == 2
    assert "naming its task" in capsys.readouterr().err
