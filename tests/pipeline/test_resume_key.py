"""Resume keys: a step's key covers exactly what it reads (config fields, options, model, card/task, tokenizer,
and the keys of its requirements), so --resume never reuses a result computed for something else and never
recomputes a step for a change it cannot see."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass

import pytest
from pipeline_helpers import read_result, run_pipeline

from mamba_interp.pipeline import RunConfig, StepResult, register_step
from mamba_interp.pipeline.model_source import load_model_source
from mamba_interp.pipeline.registry import all_steps, get_step


@pytest.fixture(scope="module")
def source(task_model_dir):
    return load_model_source(str(task_model_dir))


def keys_of(source, numbers=(0, 1, 2, 3), **config):
    from mamba_interp.pipeline.resume_key import ResumeKeys

    cfg = RunConfig(model="tiny", **config)
    options = {n: s.make_options(cfg.step_options.get(s.name)) for n, s in all_steps().items()}
    keys = ResumeKeys(cfg, options, "fingerprint", cfg.layers or (0, 1), source)  # the runner resolves "all"
    return {n: keys.key(get_step(n)) for n in numbers}


def changed(a: dict, b: dict) -> list[int]:
    return [n for n in a if a[n] != b[n]]


def test_key_covers_what_each_step_reads_and_only_that(source):
    base = keys_of(source)
    assert changed(base, keys_of(source, samples=10)) == [1, 2, 3]  # step 0 does not read samples
    assert changed(base, keys_of(source, hooks="x,dt")) == [2, 3]
    # step 0 reads layers; step 1 does not, but it requires step 0, and a requirement's key is part of the key
    assert changed(base, keys_of(source, layers="1")) == [0, 1, 2, 3]
    assert changed(base, keys_of(source, step_options={"sae": {"expansion": 8}})) == [3]
    assert changed(base, keys_of(source, step_options={"dictionary": {"alpha": 0.5}})) == []
    for always in ({"seed": 1}, {"dtype": "bfloat16"}, {"scan_impl": "reference"}):
        assert changed(base, keys_of(source, **always)) == [0, 1, 2, 3], always
    presentation = keys_of(source, output="elsewhere", device="cpu", quiet=True, threads=1, steps="0-1", resume=True)
    assert presentation == base


def test_key_covers_the_card_task_and_tokenizer(source, tokenizer_model_dir, tmp_path):
    base = keys_of(source)
    other_task = dataclasses.replace(source, task_params={"vocab_size": 16, "seq_len": 32})
    assert changed(base, keys_of(other_task)) == [0, 1, 2, 3]
    no_task = dataclasses.replace(source, task=None, task_params={})
    assert changed(base, keys_of(no_task)) == [0, 1, 2, 3]
    other_card = dataclasses.replace(source, card={**source.card, "accuracy": 0.5})
    assert changed(base, keys_of(other_card)) == [0, 1, 2, 3]
    # tokenizer files: their bytes are hashed; a folder without any has none
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_model_dir, folder)
    tok_source = dataclasses.replace(source, path=folder)
    before = tok_source.tokenizer_fingerprint()
    assert before is not None and source.tokenizer_fingerprint() is None
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    assert tok_source.tokenizer_fingerprint() != before
    assert changed(keys_of(dataclasses.replace(source, path=tokenizer_model_dir)), keys_of(tok_source)) == [0, 1, 2, 3]


def test_resume_recomputes_a_step_whose_model_card_now_names_a_task(lm_model_dir, tmp_path):
    """The issue's case: a folder without a task, then its card names one; --resume must not keep step 1's
    language-model datasets while the manifest says induction."""
    model = tmp_path / "model"
    shutil.copytree(lm_model_dir, model)
    out = tmp_path / "run"
    run_pipeline(model, out, steps="0-1", seq_len=16)
    assert read_result(out, "step_01_tasks")["metrics"]["kind"] == "lm"
    (model / "card.json").write_text(json.dumps({"task": "induction", "task_params": {"vocab_size": 16}}))
    _, summary = run_pipeline(model, out, steps="0-1", seq_len=16, resume=True)
    assert not any(r.resumed for r in summary.records.values())
    assert json.loads((out / "manifest.json").read_text())["model"]["task"] == "induction"
    assert read_result(out, "step_01_tasks")["metrics"]["kind"] == "task"


@dataclass(frozen=True)
class Knob:
    level: int = 1


def test_changing_one_steps_option_keeps_the_steps_it_requires(task_model_dir, tmp_path, temp_steps):
    calls = []

    @register_step(89, "knob", requires=(2,), options=Knob)
    def knob(ctx):
        calls.append(ctx.options.level)
        return StepResult(metrics={"level": ctx.options.level})

    temp_steps.append(89)
    out = tmp_path / "run"
    run_pipeline(task_model_dir, out, steps="0-2,89")
    _, summary = run_pipeline(task_model_dir, out, steps="0-2,89", resume=True,
                              step_options={"knob": {"level": 2}, "sae": {"expansion": 8}})
    assert [summary.records[n].resumed for n in (0, 1, 2, 89)] == [True, True, True, False]
    assert calls == [1, 2] and read_result(out, "step_89_knob")["metrics"] == {"level": 2}
    inputs = read_result(out, "step_89_knob")["key_inputs"]
    assert inputs["options"] == {"level": 2} and set(inputs["requires"]) == {"2"}


def test_a_step_reading_an_undeclared_field_fails_with_the_fix(task_model_dir, tmp_path, temp_steps):
    @register_step(86, "reads_hooks", reads=("samples",))
    def reads_hooks(ctx):
        return StepResult(metrics={"hooks": list(ctx.config.hooks)})

    @register_step(87, "reads_layers", reads=("samples",))
    def reads_layers(ctx):
        assert ctx.config.samples == 12 and ctx.config.quiet  # declared, and a presentation field
        return StepResult(metrics={"layers": list(ctx.layers)})

    @register_step(88, "reads_options", reads=())
    def reads_options(ctx):
        return StepResult(metrics={"o": dict(ctx.config.step_options)})

    temp_steps += [86, 87, 88]
    out = tmp_path / "run"
    _, summary = run_pipeline(task_model_dir, out, steps="86-88")
    assert {n: summary.records[n].status for n in (86, 87, 88)} == {86: "failed", 87: "failed", 88: "failed"}
    assert "reads 'hooks', which is not in its register_step(reads=...)" in summary.records[86].reason
    assert "reads 'layers'" in summary.records[87].reason
    assert "ctx.options" in summary.records[88].reason
    with pytest.raises(ValueError, match="not a result-relevant RunConfig field"):
        register_step(85, "bad_reads", reads=("output",))(lambda ctx: None)
