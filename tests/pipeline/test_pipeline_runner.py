"""The runner: outputs of steps 0–2, resume, failures, interruption, OOM fallback, determinism."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pipeline_helpers import read_result, run_pipeline, small_config

from mamba_interp.pipeline import Runner, StepResult, StepSkipped, register_step
from mamba_interp.pipeline.activation_stats import ActivationSet

RESULT_KEYS = {"step", "name", "status", "duration_s", "config", "metrics", "artifacts", "reading", "error",
               "fallbacks", "result_key", "model_fingerprint"}


@pytest.fixture(scope="module")
def base_run(task_model_dir, tmp_path_factory):
    """Steps 0–2 on the tiny task model, figures included, run once for the module (copy before changing)."""
    out = tmp_path_factory.mktemp("base") / "run"
    runner, summary = run_pipeline(task_model_dir, out, figures=True)
    return out, runner, summary


def copy_run(base_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(base_run[0], target)
    return target



def test_steps_0_to_2_write_every_output(base_run):
    out, runner, summary = base_run
    assert summary.exit_code == 0 and [r.status for r in summary.records.values()] == ["completed"] * 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["seed"] == 0
    assert manifest["model"]["fingerprint"] == runner.source.model.fingerprint()
    assert {"torch", "numpy", "python"} <= set(manifest["versions"]) and "git" in manifest
    assert [s["status"] for s in manifest["steps"]] == ["completed"] * 3
    assert all(s["duration_s"] is not None for s in manifest["steps"])
    for folder in ("step_00_setup", "step_01_tasks", "step_02_activations"):
        res = read_result(out, folder)
        assert RESULT_KEYS <= set(res) and res["status"] == "completed" and res["reading"]
        for art in res["artifacts"]:
            assert (out / folder / art).is_file(), art
    s0 = read_result(out, "step_00_setup")["metrics"]
    assert s0["instrumentation_ok"] and not s0["hooks_missing"] and not s0["hooks_unexpected"]
    assert s0["cache_logit_rel_diff"] < 1e-4
    s1 = read_result(out, "step_01_tasks")["metrics"]
    assert s1["kind"] == "task" and s1["datasets"]["induction"]["sequences"] == 12
    s2 = read_result(out, "step_02_activations")
    assert {"stats_heatmap.png", "channel_rms.png", "distributions.png", "delta.png", "state_norm.png",
            "activations.safetensors", "stats.safetensors"} <= set(s2["artifacts"])
    stats = s2["metrics"]["stats"]
    assert set(stats) == {"0", "1"}
    assert {"x", "dt", "B", "C", "y", "gate", "state_norm", "resid_post"} <= set(stats["0"])
    assert stats["1"]["x"]["tokens"] == 12 * 24
    assert set(s2["metrics"]["delta"]) == {"0", "1"}
    # the saved activations are the ones held in memory
    saved = ActivationSet.load(out / "step_02_activations" / "activations.safetensors")
    assert torch.equal(saved[("x", 1)], runner.data[2]["activations"][("x", 1)])
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 6 and "Step 2" in report
    assert (out / "run.log").read_text().count("completed in") == 3


def test_mamba2_per_head_statistics(m2_model_dir, tmp_path):
    _, summary = run_pipeline(m2_model_dir, tmp_path / "m2", layers="1", hooks="x,dt,y,state_norm")
    assert summary.exit_code == 0
    m = read_result(tmp_path / "m2", "step_02_activations")["metrics"]
    heads = m["per_head"]["1"]
    assert set(heads) == {"x_rms", "dt_median", "y_rms", "state_norm_mean", "timescale"}
    assert all(len(v) == 4 for v in heads.values())  # d_inner 64 / headdim 16
    assert m["dims"] == {"x": 64, "dt": 4, "y": 64, "state_norm": 4} and list(m["stats"]) == ["1"]


def test_language_model_without_tokenizer_uses_repeated_tokens(lm_model_dir, tmp_path):
    _, summary = run_pipeline(lm_model_dir, tmp_path / "lm", layers="0,2", seq_len=16)
    assert summary.exit_code == 0
    m1 = read_result(tmp_path / "lm", "step_01_tasks")["metrics"]
    assert m1["kind"] == "lm" and m1["primary"] == "repeated_tokens" and m1["notes"]
    assert m1["datasets"]["repeated_tokens"]["scored_positions"] == 12 * 7
    m2 = read_result(tmp_path / "lm", "step_02_activations")["metrics"]
    assert list(m2["stats"]) == ["0", "2"]


def test_same_seed_gives_identical_metrics_and_other_seed_differs(base_run, task_model_dir, tmp_path):
    folders = ("step_00_setup", "step_01_tasks", "step_02_activations")
    run_pipeline(task_model_dir, tmp_path / "again")  # seed 0 like the base run (which drew figures; no matter)
    for f in folders:
        assert read_result(tmp_path / "again", f)["metrics"] == read_result(base_run[0], f)["metrics"], f
    run_pipeline(task_model_dir, tmp_path / "other", seed=4, steps="1")
    assert (read_result(tmp_path / "other", "step_01_tasks")["metrics"]
            != read_result(base_run[0], "step_01_tasks")["metrics"])


def test_resume_skips_matching_steps_and_recomputes_changed_config(base_run, task_model_dir, tmp_path):
    out = copy_run(base_run, tmp_path)
    before = {f: (out / f / "result.json").stat().st_mtime_ns for f in ("step_00_setup", "step_02_activations")}
    _, summary = run_pipeline(task_model_dir, out, resume=True, figures=True)
    assert all(r.resumed and r.status == "completed" for r in summary.records.values())
    assert (out / "step_02_activations" / "result.json").stat().st_mtime_ns == before["step_02_activations"]
    # samples changes what steps 1 and 2 read (and so their keys), not step 0's
    _, summary = run_pipeline(task_model_dir, out, resume=True, samples=10, figures=True)
    assert [summary.records[n].resumed for n in (0, 1, 2)] == [True, False, False]
    assert read_result(out, "step_02_activations")["metrics"]["sequences"] == 10


def test_failed_step_is_recorded_and_independent_steps_still_run(base_run, task_model_dir, tmp_path, temp_steps):
    @register_step(90, "boom", requires=(1,))
    def boom(ctx):
        (ctx.out_dir / "partial.txt").write_text("half")
        raise ValueError("planted failure")

    @register_step(91, "after_boom", requires=(90,))
    def after(ctx):
        return StepResult(metrics={"ran": True})

    @register_step(92, "independent", requires=(0,))
    def independent(ctx):
        return StepResult(metrics={"ran": True})

    @register_step(93, "not_applicable")
    def not_applicable(ctx):
        raise StepSkipped("needs a Mamba-2 model")

    temp_steps += [90, 91, 92, 93]
    out = copy_run(base_run, tmp_path)
    _, summary = run_pipeline(task_model_dir, out, steps="0-2,90-93", resume=True, figures=True)
    status = {n: r.status for n, r in summary.records.items()}
    assert status == {0: "completed", 1: "completed", 2: "completed", 90: "failed", 91: "skipped",
                      92: "completed", 93: "skipped"}
    assert summary.exit_code == 1
    failed = read_result(out, "step_90_boom")
    assert failed["status"] == "failed" and failed["error"]["type"] == "ValueError"
    assert "planted failure" in failed["error"]["message"] and "Traceback" in failed["error"]["traceback"]
    skipped = read_result(out, "step_91_after_boom")
    assert skipped["status"] == "skipped" and "requires step 90 (boom), which failed" in skipped["reason"]
    assert read_result(out, "step_93_not_applicable")["reason"] == "needs a Mamba-2 model"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "completed_with_failures"
    report = (out / "report.html").read_text()
    assert "planted failure" in report and "requires step 90" in report
    # resume re-runs only what did not complete
    calls = []

    @register_step(90, "boom", requires=(1,))
    def boom(ctx):  # noqa: F811 (re-registered: the same qualname, now working)
        calls.append(1)
        return StepResult(metrics={"fixed": True})

    _, summary = run_pipeline(task_model_dir, out, steps="0-2,90-93", resume=True, figures=True)
    assert calls == [1] and summary.records[91].status == "completed" and summary.records[2].resumed


def test_interrupted_step_leaves_no_result_and_resume_finishes(base_run, task_model_dir, tmp_path, temp_steps):
    state = {"interrupt": True}

    @register_step(94, "slow", requires=(2,))
    def slow(ctx):
        if state["interrupt"]:
            (ctx.out_dir / "figure.png").write_bytes(b"half-written")
            raise KeyboardInterrupt
        acts = ctx.data(2)["activations"]
        batch = ctx.data(1)["batch"]
        return StepResult(metrics={"tokens": int(acts.mask.sum()), "sequences": len(batch)})

    temp_steps.append(94)
    out = copy_run(base_run, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(task_model_dir, out, steps="0-2,94", resume=True, figures=True)
    assert not (out / "step_94_slow" / "result.json").exists()
    assert (out / "step_94_slow" / "figure.png").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    assert {s["name"]: s["status"] for s in manifest["steps"]}["slow"] == "interrupted"
    state["interrupt"] = False
    runner, summary = run_pipeline(task_model_dir, out, steps="0-2,94", resume=True, figures=True)
    assert [summary.records[n].resumed for n in (0, 1, 2, 94)] == [True, True, True, False]
    # step 94 got step 2's activations from disk and step 1's batches rebuilt from the seed
    assert read_result(out, "step_94_slow")["metrics"] == {"tokens": 12 * 24, "sequences": 12}
    assert not (out / "step_94_slow" / "figure.png").exists()


def test_selected_step_reuses_unselected_requirements_from_disk(base_run, task_model_dir, tmp_path, temp_steps):
    @register_step(95, "reader", requires=(2,))
    def reader(ctx):
        return StepResult(metrics={"layers": list(ctx.data(2)["activations"].layers)})

    temp_steps.append(95)
    out = copy_run(base_run, tmp_path)
    (out / "step_02_activations" / "activations.safetensors").unlink()  # the loader fails: step 2 is re-run
    _, summary = run_pipeline(task_model_dir, out, steps="95", figures=True)
    assert [summary.records[n].resumed for n in (0, 1)] == [True, True]
    assert read_result(out, "step_95_reader")["metrics"] == {"layers": [0, 1]}
    assert (out / "step_02_activations" / "activations.safetensors").is_file()


def _oom_step(temp_steps, number, fail_while):
    seen = []

    @register_step(number, f"oom_{number}")
    def step(ctx):
        seen.append((ctx.batch_size, ctx.device.type))
        (ctx.out_dir / "partial.bin").write_bytes(b"x")
        if fail_while(ctx):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return StepResult(metrics={"batch_size": ctx.batch_size})

    temp_steps.append(number)
    return seen


def test_oom_retries_with_smaller_batches(task_model_dir, tmp_path, temp_steps):
    seen = _oom_step(temp_steps, 96, lambda ctx: ctx.batch_size > 8)
    out = tmp_path / "run"
    _, summary = run_pipeline(task_model_dir, out, steps="96", batch_size=32)
    assert summary.records[96].status == "completed" and seen == [(32, "cpu"), (16, "cpu"), (8, "cpu")]
    res = read_result(out, "step_96_oom_96")
    assert [f["action"] for f in res["fallbacks"]] == ["smaller_batch", "smaller_batch"]
    assert res["batch_size"] == 8 and res["metrics"] == {"batch_size": 8}
    assert "out of memory" in res["fallbacks"][0]["error"]


def test_oom_that_persists_on_cpu_fails_cleanly(task_model_dir, tmp_path, temp_steps):
    _oom_step(temp_steps, 97, lambda ctx: True)
    _, summary = run_pipeline(task_model_dir, tmp_path / "run", steps="97", batch_size=32)
    res = read_result(tmp_path / "run", "step_97_oom_97")
    assert res["status"] == "failed" and res["error"]["type"] == "OutOfMemoryError"
    assert len(res["fallbacks"]) == 2


def test_oom_on_cuda_falls_back_to_cpu(task_model_dir, tmp_path, temp_steps, monkeypatch):
    """Simulated CUDA: the runner believes it runs on cuda; the step runs out of memory until it is on CPU."""
    seen = _oom_step(temp_steps, 98, lambda ctx: ctx.device.type == "cuda")
    moves = []
    monkeypatch.setattr(Runner, "_move_model", lambda self, device: moves.append(str(device)))
    runner = Runner(small_config(task_model_dir, tmp_path / "run", steps="98", batch_size=32))
    runner.prepare()
    runner.device = torch.device("cuda")
    monkeypatch.setattr(Runner, "_restore_device", lambda self: moves.append("restore"))
    try:
        summary = runner.run()
    finally:
        runner.close()
    assert summary.records[98].status == "completed"
    assert seen == [(32, "cuda"), (16, "cuda"), (8, "cuda"), (8, "cpu")]
    res = read_result(tmp_path / "run", "step_98_oom_98")
    assert [f["action"] for f in res["fallbacks"]] == ["smaller_batch", "smaller_batch", "cpu"]
    assert res["device"] == "cpu" and "cpu" in moves


def test_language_model_with_tokenizer_gets_text_prompt_sets(tokenizer_model_dir, tmp_path):
    _, summary = run_pipeline(tokenizer_model_dir, tmp_path / "tok", seq_len=12)
    assert summary.exit_code == 0
    m1 = read_result(tmp_path / "tok", "step_01_tasks")["metrics"]
    assert m1["primary"] == "text_induction" and set(m1["datasets"]) == {"text_induction", "ioi", "factual_recall"}
    assert m1["datasets"]["ioi"]["padded"] and m1["datasets"]["ioi"]["scored_positions"] == 12
    m2 = read_result(tmp_path / "tok", "step_02_activations")["metrics"]
    assert m2["dataset"] == "text_induction" and m2["tokens"] == 12 * 12


def test_analyzer_collects_activations_of_texts(tokenizer_model_dir, tmp_path):
    from mamba_interp.experimental_framework import MambaMechanisticAnalyzer

    an = MambaMechanisticAnalyzer(small_config(tokenizer_model_dir, tmp_path / "texts"))
    an.setup()
    acts = an.collect_activations(texts=["Mary went to the store", "The capital of France"],
                                  layers=[1], hooks=["resid_post"])
    an.close()
    assert acts[("resid_post", 1)].shape == (2, 5, 32)
    # left padding: the shorter text's first position is padding, the last is always real
    assert acts.mask.tolist() == [[True] * 5, [False, True, True, True, True]]


def test_text_task_on_a_language_model_uses_the_folders_tokenizer(tokenizer_model_dir, tmp_path):
    """``--task ioi`` on a language-model folder with tokenizer files: the task is built with that tokenizer."""
    runner, summary = run_pipeline(tokenizer_model_dir, tmp_path / "ioi", steps="0-1", task="ioi")
    assert summary.exit_code == 0
    m1 = read_result(tmp_path / "ioi", "step_01_tasks")["metrics"]
    assert m1["kind"] == "task" and m1["primary"] == "ioi" and m1["datasets"]["ioi"]["sequences"] == 12
    assert runner.source.task_params == {"tokenizer": str(tokenizer_model_dir)}
