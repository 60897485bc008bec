"""RunConfig: parsing of steps/layers, validation messages, YAML + override precedence, the resume key."""

from __future__ import annotations

import pytest

from mamba_interp.pipeline.config import (
    RunConfig,
    UsageError,
    build_config,
    parse_layers,
    parse_steps,
    read_config_file,
)


@pytest.mark.parametrize("text,expected", [
    ("0-2,5", (0, 1, 2, 5)), ("3", (3,)), (4, (4,)), ("2, 0", (0, 2)), ("1-1", (1,)), ([2, 1], (1, 2)),
    ("all", None), (None, None),
])
def test_parse_steps(text, expected):
    assert parse_steps(text) == expected


@pytest.mark.parametrize("text", ["a", "2-1", "1,,2", "-1", "0-2;5", "1.5", "", True])
def test_parse_steps_malformed(text):
    with pytest.raises(UsageError, match="steps|step range"):
        parse_steps(text)


@pytest.mark.parametrize("text,expected", [
    ("all", None), (2, (2,)), ("0,2", (0, 2)), ("0-3", (0, 1, 2, 3)), ([1, 0], (0, 1)), ("ALL", None),
])
def test_parse_layers(text, expected):
    assert parse_layers(text) == expected


@pytest.mark.parametrize("text", ["x", "3-1", "-2", "1;2", True, 1.5])
def test_parse_layers_bad(text):
    with pytest.raises(UsageError):
        parse_layers(text)


@pytest.mark.parametrize("field,value,needle", [
    ("samples", 0, "samples=0 must be >= 1"),
    ("samples", -3, "samples=-3"),
    ("samples", "ten", "must be an integer"),
    ("batch_size", 0, "batch_size"),
    ("seed", -1, "seed"),
    ("device", "tpu", "device='tpu' is unknown"),
    ("dtype", "float8", "dtype"),
    ("hooks", ("x", "nope"), "hook 'nope' is unknown"),
    ("outlier_ratio", 1.0, "outlier_ratio"),
    ("seq_len", 1, "seq_len"),
    ("threads", 0, "threads=0"),
    ("scan_impl", "fast", "scan_impl='fast' is unknown"),
    ("resume", "yes", "resume"),
])
def test_runconfig_validation(field, value, needle):
    with pytest.raises(UsageError) as info:
        RunConfig(**{field: value})
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_runconfig_normalises_and_round_trips():
    cfg = RunConfig(layers="0-1", steps="2,0", hooks="x, dt")
    assert cfg.layers == (0, 1) and cfg.steps == (0, 2) and cfg.hooks == ("x", "dt")
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_from_dict_rejects_unknown_keys_and_accepts_aliases():
    with pytest.raises(UsageError, match="unknown config key 'modle'"):
        RunConfig.from_dict({"modle": "x"})
    assert RunConfig.from_dict({"layer": 1, "n_samples": 5}).samples == 5


def test_result_fields_leave_out_presentation_fields_only():
    fields = set(RunConfig.result_fields())
    assert not fields & {"output", "device", "resume", "steps", "quiet", "threads", "step_options"}
    assert {"model", "layers", "samples", "seq_len", "batch_size", "seed", "dtype", "scan_impl", "task", "hooks",
            "figures", "save_activations", "dead_threshold", "outlier_ratio"} <= fields


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: some-model\nsamples: 40\nlayers: [0, 1]\nstep_options:\n  sae: {d_sae: 8}\n")
    cfg = build_config(path, samples=7, seed=None)
    assert cfg.model == "some-model" and cfg.samples == 7 and cfg.layers == (0, 1)
    assert cfg.step_options == {"sae": {"d_sae": 8}}


@pytest.mark.parametrize("content,needle", [
    (None, "does not exist"),
    ("dir", "is not a file"),
    ("model: [unclosed\n", "not valid YAML"),
    ("- a\n- b\n", "must hold a mapping"),
    ("samples: 0\n", "samples=0"),
    ("colour: blue\n", "unknown config key 'colour'"),
])
def test_bad_config_files(tmp_path, content, needle):
    path = tmp_path / "cfg.yaml"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UsageError) as info:
        build_config(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_empty_config_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert read_config_file(path) == {}
    assert build_config(path) == RunConfig()
