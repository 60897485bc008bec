"""The output folder: one run at a time (a lock with the pid; a dead run's lock is taken over), leftovers of another
configuration moved to stale/, and filesystem faults in the way of a step recorded as that step's failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import read_result, run_pipeline, small_config

from mamba_interp.pipeline import Runner, StepResult, UsageError, register_step

LOCK_FILE = "run.lock"
ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from pathlib import Path
from mamba_interp.pipeline.output_folder import RunLock
RunLock(Path(sys.argv[1])).acquire("holder for the test")
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_runner_into_the_same_folder_is_refused_until_the_first_closes(task_model_dir, tmp_path):
    out = tmp_path / "run"
    first = Runner(small_config(task_model_dir, out, steps="0"))
    first.prepare()
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["command"]
    second = Runner(small_config(task_model_dir, out, steps="0"))
    with pytest.raises(UsageError, match="in use by another Runner of this process"):
        second.prepare()
    first.close()
    assert not (out / LOCK_FILE).exists()
    with second:
        assert second.run().exit_code == 0


def test_a_run_into_a_folder_held_by_another_process_exits_2_then_takes_over_its_dead_lock(
        task_model_dir, tmp_path, capsys):
    from mamba_interp import cli

    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        argv = ["--model", str(task_model_dir), "--steps", "0", "-o", str(out), "--samples", "4", "--quiet"]
        assert cli.run_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another run (pid {proc.pid}" in err[0], err
        assert "holder for the test" in err[0] and not (out / "manifest.json").exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # killed: its lock file stays behind
    assert cli.run_main(argv) == 0
    assert f"took over the lock of an earlier run that is no longer running: {{'pid': {proc.pid}" in (
        out / "run.log").read_text()
    assert not (out / LOCK_FILE).exists()


def test_without_flock_the_pid_in_the_lock_file_decides(tmp_path, monkeypatch):
    from mamba_interp.pipeline import output_folder as of
    from mamba_interp.pipeline.output_folder import RunLock

    monkeypatch.setattr(of, "fcntl", None)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "command": "the parent"}))
    with pytest.raises(UsageError, match=f"pid {os.getppid()}.*the parent"):
        RunLock(tmp_path).acquire("me")
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": dead.pid}))
    lock = RunLock(tmp_path)
    lock.acquire("me")
    assert lock.took_over == {"pid": dead.pid} and json.loads((tmp_path / LOCK_FILE).read_text())["command"] == "me"
    lock.release()


def _results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("step_*/result.json")}


def test_leftovers_of_another_configuration_are_moved_to_stale(task_model_dir, tmp_path):
    out = tmp_path / "run"
    run_pipeline(task_model_dir, out, steps="0-1")
    # the same configuration: step 1's result is this configuration's, it stays
    run_pipeline(task_model_dir, out, steps="0")
    assert set(_results(out)) == {"step_00_setup", "step_01_tasks"} and not (out / "stale").exists()
    old_manifest = (out / "manifest.json").read_text()
    # another seed: the old results would mix two runs; they go to stale/ with the manifest that described them
    (out / "step_07_gone").mkdir()
    (out / "step_07_gone" / "result.json").write_text("{not json")
    run_pipeline(task_model_dir, out, steps="0", seed=1)
    assert set(_results(out)) == {"step_00_setup"} and read_result(out, "step_00_setup")["config"]["seed"] == 1
    (stale,) = (out / "stale").iterdir()
    assert {p.name for p in stale.iterdir()} == {"step_00_setup", "step_01_tasks", "step_07_gone", "manifest.json",
                                                 "report.html"}
    assert read_result(stale, "step_01_tasks")["config"]["seed"] == 0
    assert (stale / "manifest.json").read_text() == old_manifest


def test_filesystem_faults_in_the_way_of_a_step_fail_only_that_step(task_model_dir, tmp_path, temp_steps):
    @register_step(84, "independent", requires=(0,))
    def independent(ctx):
        return StepResult(metrics={"ran": True})

    temp_steps.append(84)
    out = tmp_path / "run"
    out.mkdir()
    (out / "step_01_tasks").write_text("a file where the step folder belongs")
    _, summary = run_pipeline(task_model_dir, out, steps="0-2,84")
    assert summary.exit_code == 0  # set aside: the file is kept under stale/
    (stale,) = (out / "stale").iterdir()
    assert (stale / "step_01_tasks").read_text().startswith("a file")
    # now nothing can be set aside (stale is a file): the step that needs the place fails, alone
    other = tmp_path / "blocked"
    other.mkdir()
    (other / "stale").write_text("in the way")
    (other / "step_01_tasks").write_text("a file where the step folder belongs")
    _, summary = run_pipeline(task_model_dir, other, steps="0-2,84")
    status = {n: r.status for n, r in summary.records.items()}
    assert status == {0: "completed", 1: "failed", 2: "skipped", 84: "completed"}
    assert "NotADirectoryError" in summary.records[1].reason and "could not be written" in summary.records[1].reason
    manifest = json.loads((other / "manifest.json").read_text())
    assert manifest["status"] == "completed_with_failures" and (other / "report.html").is_file()
    assert (other / "step_01_tasks").read_text().startswith("a file")  # nothing deleted


def test_the_lock_is_released_when_preparation_fails_after_taking_it(task_model_dir, tmp_path, monkeypatch):
    from mamba_interp.pipeline.output_folder import RunLock

    out = tmp_path / "run"
    runner = Runner(small_config(task_model_dir, out, steps="0"))

    def boom(self):
        raise OSError("disk on fire")

    monkeypatch.setattr(Runner, "_set_aside_stale", boom)
    with pytest.raises(OSError, match="disk on fire"):
        runner.prepare()
    assert not (out / LOCK_FILE).exists()
    lock = RunLock(out)  # its descriptor is closed too: the lock is free at once
    lock.acquire("after")
    lock.release()
