"""The CLI: bad input (exit 2, one line, no traceback, nothing that looks like a result), the end-to-end run on the
default zoo model, resume after a killed process, subcommands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig, cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "mamba_mechanistic_analysis.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_model")
    torch.manual_seed(0)
    HookedMamba(MambaConfig(d_model=32, n_layer=2, vocab_size=16, d_state=8)).save_pretrained(folder)
    (folder / "card.json").write_text(json.dumps({"task": "induction", "task_params": {"seq_len": 16}}))
    return folder


def _no_result_written(out: Path) -> bool:
    return not out.exists() or not any(out.rglob("result.json")) and not (out / "manifest.json").exists()


def _bad_cases(model_dir: Path, tmp: Path) -> list[tuple[str, list[str], str, Path]]:
    out = tmp / "out"
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("samples: [1,\n")
    bad_value = tmp / "bad_value.yaml"
    bad_value.write_text("samples: 0\n")
    unknown_key = tmp / "unknown.yaml"
    unknown_key.write_text("modle: x\n")
    a_file = tmp / "a_file.txt"
    a_file.write_text("keep me")
    m = ["--model", str(model_dir)]
    return [
        ("unknown model", ["--model", "no-such-model", "-o", str(out)], "unknown model 'no-such-model'", out),
        ("model path is a file", ["--model", str(a_file), "-o", str(out)], "is a file", out),
        ("layer out of range", [*m, "--layer", "5", "-o", str(out)], "layer 5 is out of range", out),
        ("layer malformed", [*m, "--layer", "one", "-o", str(out)], "layer 'one' is not understood", out),
        ("malformed steps", [*m, "--steps", "0-x", "-o", str(out)], "steps='0-x' is malformed", out),
        ("reversed steps", [*m, "--steps", "2-0", "-o", str(out)], "step range '2-0' is empty", out),
        ("unimplemented step", [*m, "--steps", "0,99", "-o", str(out)], "step 99 is not implemented", out),
        ("zero samples", [*m, "--samples", "0", "-o", str(out)], "samples=0 must be >= 1", out),
        ("negative samples", [*m, "--samples", "-3", "-o", str(out)], "samples=-3 must be >= 1", out),
        ("non-integer samples", [*m, "--samples", "ten", "-o", str(out)], "invalid int value: 'ten'", out),
        ("missing config", [*m, "--config", str(tmp / "nope.yaml"), "-o", str(out)], "does not exist", out),
        ("config is a folder", [*m, "--config", str(tmp), "-o", str(out)], "is not a file", out),
        ("invalid YAML", [*m, "--config", str(bad_yaml), "-o", str(out)], "is not valid YAML", out),
        ("invalid config value", [*m, "--config", str(bad_value), "-o", str(out)], "samples=0", out),
        ("unknown config key", [*m, "--config", str(unknown_key), "-o", str(out)], "unknown config key 'modle'", out),
        ("output is a file", [*m, "-o", str(a_file)], "is a file; pass a folder path", a_file),
        ("output under a file", [*m, "-o", str(a_file / "sub")], "lies under the file", a_file / "sub"),
        ("output not writable", [*m, "-o", "/proc/mamba-interp-test/out"], "not writable",
         Path("/proc/mamba-interp-test/out")),
        ("unknown hook", [*m, "--hooks", "x,nope", "-o", str(out)], "hook 'nope' is unknown", out),
        ("bad option", [*m, "--option", "sae", "-o", str(out)], "--option 'sae' is malformed", out),
        ("option for an unknown step", [*m, "--option", "nostep.k=1", "-o", str(out)], "unknown step 'nostep'", out),
        ("unknown option of a step that does not run", [*m, "--steps", "0-2", "--option", "sae.no_such_key=3", "-o",
                                                        str(out)], "unknown option 'no_such_key' for step 3 (sae)", out),
        ("invalid option of a step that does not run", [*m, "--steps", "0", "--option", "sae.expansion=0", "-o",
                                                        str(out)], "invalid option for step 3 (sae)", out),
        ("text task without a tokenizer", [*m, "--task", "ioi", "-o", str(out)], "needs the model's tokenizer", out),
        ("unknown device", [*m, "--device", "tpu", "-o", str(out)], "device='tpu' is unknown", out),
        ("unknown flag", [*m, "--frobnicate", "-o", str(out)], "unrecognized arguments: --frobnicate", out),
        ("resume without output", [*m, "--resume"], "--resume needs --output", tmp / "results"),
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default output folder would appear here as results/
    for label, argv, needle, out in _bad_cases(model_dir, tmp_path):
        code = cli.run_main(argv)
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert code == 2, label
        assert len(lines) == 1 and lines[0].startswith("mamba-interp: error: "), (label, captured.err)
        assert needle in lines[0], (label, lines[0])
        assert "Traceback" not in captured.err + captured.out, label
        assert captured.out == "", label
        if out.name != "a_file.txt":
            assert _no_result_written(out), label
    assert (tmp_path / "a_file.txt").read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(model_dir, tmp_path, capsys):
    assert cli.run_main(["--model", str(model_dir), "--device", "cuda", "-o", str(tmp_path / "o")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    for cmd in ([sys.executable, str(SCRIPT), "--model", "no-such-model"],
                [sys.executable, "-m", "mamba_interp.cli", "run", "--steps", "1-", "-o", str(tmp_path / "x")]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "x").exists()


def test_no_arguments_runs_every_step_of_the_default_model_into_results(tmp_path, monkeypatch, capsys):
    """What ``python mamba_mechanistic_analysis.py`` does, with the run itself stubbed (the real run is below)."""
    from mamba_interp.pipeline import RunConfig, Runner
    from mamba_interp.pipeline.model_source import default_model_name, import_zoo
    from mamba_interp.pipeline.registry import all_steps, default_steps
    from mamba_interp.pipeline.runner import RunSummary

    zoo = import_zoo()
    if zoo is None or default_model_name() not in zoo.names():
        pytest.skip("the zoo's default model is not shipped yet")
    seen = {}

    def fake_run(self, steps=None):
        seen.update(config=self.config, planned=self.planned, out=self.out_dir, model=self.source.name)
        return RunSummary(self.out_dir, self.out_dir / "report.html", {})

    monkeypatch.setattr(Runner, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert cli.run_main([]) == 0
    assert seen["config"] == RunConfig() and sorted(seen["planned"]) == default_steps()   # planned: dependency order
    assert set(all_steps()) - set(default_steps()) == {17, 18, 19}   # the decomposition steps: named only
    assert seen["model"] == zoo.DEFAULT
    assert seen["out"].parent == Path("results") and seen["out"].name.startswith(zoo.DEFAULT)
    assert f"Report: {seen['out'] / 'report.html'}" in capsys.readouterr().out


def test_default_model_steps_0_to_2_end_to_end(tmp_path):
    """The embedded default zoo model, steps 0–2, through the real script (default sample count)."""
    from mamba_interp.pipeline.model_source import default_model_name, import_zoo

    zoo = import_zoo()
    if zoo is None or default_model_name() not in zoo.names():
        pytest.skip("the zoo's default model is not shipped yet")
    out = tmp_path / "run"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "0-2", "--output", str(out)],
                          capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"Report: {out / 'report.html'}" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["name"] == zoo.DEFAULT and manifest["status"] == "completed"
    tasks = json.loads((out / "step_01_tasks" / "result.json").read_text())["metrics"]
    assert tasks["kind"] == "task" and tasks["datasets"][tasks["primary"]]["accuracy"] >= 0.9
    acts = json.loads((out / "step_02_activations" / "result.json").read_text())
    assert acts["status"] == "completed" and len(acts["metrics"]["stats"]) == manifest["model"]["n_layer"]
    assert (out / "report.html").stat().st_size > 10_000
    print(f"steps 0-2 on the default model: {elapsed:.1f} s wall (incl. interpreter start)")
    assert elapsed < 120  # the budget is 60 s on 2 idle cores; leave room for a loaded test machine


SLEEPY = """
import os, sys, time
from mamba_interp.pipeline import StepResult, register_step

@register_step(99, "sleepy", requires=(0,))
def sleepy(ctx):
    (ctx.out_dir / "started").write_text("1")
    if os.environ.get("SLEEPY") == "1":
        time.sleep(120)
    return StepResult(metrics={"ok": 1}, reading="woke up")

from mamba_interp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_the_process_is_killed_mid_step(model_dir, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-c", SLEEPY, "run", "--model", str(model_dir), "--steps", "0,99", "-o", str(out),
            "--samples", "4"]
    proc = subprocess.Popen(argv, env={**ENV, "SLEEPY": "1"}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    marker = out / "step_99_sleepy" / "started"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "step 99 never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "step_99_sleepy" / "result.json").exists()
    assert json.loads((out / "step_00_setup" / "result.json").read_text())["status"] == "completed"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["name"]: s["status"] for s in manifest["steps"]} == {"setup": "completed", "sleepy": "running"}
    done = subprocess.run([*argv, "--resume"], env={**ENV, "SLEEPY": "0"}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "setup          resumed" in done.stdout and "sleepy         completed" in done.stdout
    res = json.loads((out / "step_99_sleepy" / "result.json").read_text())
    assert res["status"] == "completed" and res["metrics"] == {"ok": 1}
    assert json.loads((out / "manifest.json").read_text())["status"] == "completed"


def test_documented_option_examples_exist():
    """The README's and the CLI's own examples of step options name real options with valid values, read as the
    CLI reads them (so ``1e-2`` must arrive as a number, not as text)."""
    import re

    from mamba_interp.cli import _step_options
    from mamba_interp.pipeline.registry import all_steps, get_step

    texts = (ROOT / "README.md").read_text() + (ROOT / "mamba_interp" / "cli.py").read_text()
    examples = re.findall(r"--option[ =]`?(\w+\.\w+=[^\s`'\",)]+)", texts)
    examples += [f"{step}.{key}={value}" for step, key, value in re.findall(r"^\s+(\w+): \{(\w+): (\w+)\}", texts,
                                                                             re.M)]
    names = {s.name for s in all_steps().values()}
    examples += [e for e in re.findall(r"`(\w+\.\w+=[^\s`]+)`", texts) if e.split(".")[0] in names]
    examples = [e for e in examples if "STEP" not in e and ".KEY=" not in e]  # the syntax's placeholders
    assert len(examples) >= 10
    for item in examples:
        ((step, opts),) = _step_options([item], {}).items()
        get_step(step).make_options(opts)


def test_option_values_read_yaml_1_2_numbers():
    from mamba_interp.cli import _step_options

    got = _step_options(["spd.importance_minimality_coeff=1e-2", "spd.lr=3E-4", "spd.steps=800",
                         "sae.hooks=[resid_post, x]", "spd.routing=subset"], {})
    assert got == {"spd": {"importance_minimality_coeff": 0.01, "lr": 3e-4, "steps": 800, "routing": "subset"},
                   "sae": {"hooks": ["resid_post", "x"]}}
    assert isinstance(got["spd"]["steps"], int)


def _wait_for_torch(proc: subprocess.Popen, timeout: float = 60) -> bool:
    """True once the process has loaded torch's library (it is then importing torch, or just past it)."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                return True
        except OSError:
            return False
        time.sleep(0.02)
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when torch is being imported")
def test_an_interruption_while_torch_is_imported_prints_one_line(model_dir, tmp_path):
    entries = {"script": [sys.executable, str(SCRIPT)], "module": [sys.executable, "-m", "mamba_interp.cli", "run"]}
    for (name, cmd), (sig, code, word) in zip(
            entries.items(), ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated"))):
        out = tmp_path / name
        proc = subprocess.Popen([*cmd, "--model", str(model_dir), "--steps", "0-2", "-o", str(out)], env=ENV,
                                cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert _wait_for_torch(proc), proc.communicate()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        lines = stderr.strip().splitlines()
        assert proc.returncode == code, (name, proc.returncode, stderr)
        assert len(lines) == 1 and lines[0].startswith(f"mamba-interp: {word}"), (name, stderr)
        assert "Traceback" not in stderr + stdout, name


def test_sigterm_mid_step_records_interrupted_and_resume_finishes(model_dir, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-c", SLEEPY, "run", "--model", str(model_dir), "--steps", "0,99", "-o", str(out),
            "--samples", "4"]
    proc = subprocess.Popen(argv, env={**ENV, "SLEEPY": "1"}, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    marker = out / "step_99_sleepy" / "started"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mamba-interp: terminated (SIGTERM); partial results are in")
    assert "--resume" in lines[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    sleepy = {s["name"]: s for s in manifest["steps"]}["sleepy"]
    assert sleepy["status"] == "interrupted" and sleepy["reason"] == "terminated (SIGTERM)"
    assert not (out / "step_99_sleepy" / "result.json").exists() and not (out / "run.lock").exists()
    assert (out / "report.html").is_file()
    done = subprocess.run([*argv, "--resume"], env={**ENV, "SLEEPY": "0"}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "setup          resumed" in done.stdout and "sleepy         completed" in done.stdout


def test_report_of_a_folder_with_a_broken_result_is_written(model_dir, tmp_path, capsys, monkeypatch):
    import mamba_interp.pipeline.report as report

    out = tmp_path / "quick"
    with monkeypatch.context() as m:  # a report that cannot be written is said so, not "Report: OUT"
        m.setattr(report, "write_report", lambda folder: 1 / 0)
        assert cli.main(["run", "--model", str(model_dir), "--steps", "0", "-o", str(out), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "Report:" not in captured.out and "report.html could not be written" in captured.err
    assert cli.main(["run", "--model", str(model_dir), "--steps", "0", "-o", str(out), "--quiet"]) == 0
    (out / "step_00_setup" / "result.json").write_text("{broken")
    (out / "step_05_other").mkdir()
    (out / "step_05_other" / "result.json").write_text("[]")
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Report: ") and "Traceback" not in captured.err
    assert 'class="status unreadable"' in (out / "report.html").read_text()


def test_subcommands(model_dir, tmp_path, capsys, monkeypatch):
    assert cli.main(["list-steps"]) == 0
    listing = capsys.readouterr().out
    assert "activations" in listing and "setup" in listing
    assert cli.main(["run", "--list-steps"]) == 0 and "tasks" in capsys.readouterr().out
    assert cli.main(["list-models"]) == 0
    capsys.readouterr()
    calls = []
    import mamba_interp.tasks.training as training

    monkeypatch.setattr(training, "main", lambda argv: calls.append(argv) or 0)
    assert cli.main(["train", "--task", "induction", "--steps", "3"]) == 0
    assert calls == [["--task", "induction", "--steps", "3"]]
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    # a real (quick) run via `run`, then `report` rebuilds its page
    out = tmp_path / "quick"
    code = cli.main(["run", "--model", str(model_dir), "--steps", "0", "-o", str(out), "--quiet"])
    assert code == 0 and (out / "report.html").is_file()
    (out / "report.html").unlink()
    assert cli.main(["report", str(out)]) == 0 and (out / "report.html").is_file()
