"""Checkpoint round trips in both formats (saved here, no download) and loader errors."""

import json

import pytest
import torch
import transformers as tf

from mamba_interp import CheckpointError, HookedMamba, MambaConfig
from tests.models.helpers import HF_CLASSES, hf_and_ours, perturb, rel_err

TOL = 1e-5


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 23), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "falcon_mamba"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin", "sharded"])
def test_transformers_format_round_trip(tmp_path, arch, fmt):
    hf, _ = hf_and_ours(arch, seed=3)
    if fmt == "bin":
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        hf.save_pretrained(tmp_path, max_shard_size="20KB" if fmt == "sharded" else "5GB")
    if fmt == "sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    model = HookedMamba.from_pretrained(tmp_path)
    x = _ids(hf.config.vocab_size)
    with torch.no_grad():
        assert rel_err(model(x), hf(x).logits) <= TOL


def _state_spaces_checkpoint(folder, arch: str):
    """Write a state-spaces folder (config.json with ssm_cfg + pytorch_model.bin) and return the matching HF model."""
    torch.manual_seed(5)
    vocab, multiple = 45, 16  # padded to 48: logits keep the padded width
    if arch == "mamba1":
        ssm_cfg = {"d_state": 8, "d_conv": 3, "expand": 2, "dt_rank": 4, "conv_bias": True, "bias": False}
        hf_cfg = tf.MambaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, state_size=8, conv_kernel=3,
                                time_step_rank=4)
    else:
        ssm_cfg = {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 32, "expand": 2}
        hf_cfg = tf.Mamba2Config(vocab_size=48, hidden_size=32, num_hidden_layers=2, state_size=8, num_heads=4,
                                 head_dim=16, n_groups=2, chunk_size=32, tie_word_embeddings=True)
    hf = HF_CLASSES["mamba" if arch == "mamba1" else "mamba2"](hf_cfg).eval()
    perturb(hf, seed=5)
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    raw = {"d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": vocab, "ssm_cfg": ssm_cfg,
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": multiple, "tie_embeddings": True}
    (folder / "config.json").write_text(json.dumps(raw))
    torch.save(sd, folder / "pytorch_model.bin")
    return hf


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_state_spaces_format_round_trip(tmp_path, arch):
    hf = _state_spaces_checkpoint(tmp_path, arch)
    model = HookedMamba.from_pretrained(tmp_path)
    assert model.cfg.arch == arch
    assert model.cfg.vocab_size == 45 and model.cfg.padded_vocab_size == 48
    if arch == "mamba2":
        assert (model.cfg.d_state, model.cfg.headdim, model.cfg.ngroups) == (8, 16, 2)
    x = _ids(45)
    with torch.no_grad():
        logits = model(x)
        assert logits.shape[-1] == 48
        assert rel_err(logits, hf(x).logits) <= TOL


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_save_pretrained_round_trip_and_transformers_reads_it(tmp_path, arch):
    torch.manual_seed(0)
    cfg = MambaConfig(arch=arch, d_model=32, n_layer=2, vocab_size=20, headdim=16, d_state=8,
                      tie_embeddings=arch == "mamba1")
    model = HookedMamba(cfg)
    perturb(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    again = HookedMamba.from_pretrained(tmp_path)
    assert again.cfg == cfg
    x = _ids(20)
    assert torch.equal(again(x), model(x))
    hf = HF_CLASSES["mamba" if arch == "mamba1" else "mamba2"].from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel_err(model(x), hf(x).logits) <= TOL


def test_from_pretrained_device_and_dtype(tmp_path):
    torch.manual_seed(0)
    HookedMamba(MambaConfig(d_model=16, n_layer=1, vocab_size=10)).save_pretrained(tmp_path)
    model = HookedMamba.from_pretrained(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16


# ---- errors -------------------------------------------------------------------------------------------
def _saved(tmp_path):
    torch.manual_seed(0)
    HookedMamba(MambaConfig(d_model=16, n_layer=1, vocab_size=10)).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_error_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        HookedMamba.from_pretrained(tmp_path)


def test_error_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not a Mamba model"):
        HookedMamba.from_pretrained(tmp_path)


def test_error_unrecognised_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 8}))
    with pytest.raises(CheckpointError, match="neither a transformers Mamba config"):
        HookedMamba.from_pretrained(tmp_path)


def test_error_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        HookedMamba.from_pretrained(tmp_path)


def test_error_unknown_ssm_cfg_key(tmp_path):
    raw = {"d_model": 16, "n_layer": 1, "ssm_cfg": {"layer": "Mamba2", "d_stat": 8}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unknown ssm_cfg key 'd_stat'"):
        HookedMamba.from_pretrained(tmp_path)


def test_error_unsupported_hybrid(tmp_path):
    raw = {"d_model": 16, "n_layer": 2, "attn_layer_idx": [1]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="attn_layer_idx"):
        HookedMamba.from_pretrained(tmp_path)


def test_error_missing_weights(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        HookedMamba.from_pretrained(tmp_path)


def test_error_shape_mismatch_names_key_and_expectation(tmp_path):
    raw = _saved(tmp_path)
    raw["mamba_interp_config"]["d_state"] = 8
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"model.safetensors: blocks.0.mixer.A_log has shape \(32, 16\), expected \(32, 8\)"):
        HookedMamba.from_pretrained(tmp_path)


def test_error_missing_key(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["backbone.layers.0.mixer.D"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.0.mixer.D'\]"):
        HookedMamba.from_pretrained(tmp_path)


def test_error_corrupt_weights(tmp_path):
    _saved(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        HookedMamba.from_pretrained(tmp_path)


def test_error_not_a_folder_or_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither a local folder nor a Hugging Face hub id"):
        HookedMamba.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        HookedMamba.from_pretrained(tmp_path / "file.bin")


def test_error_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face hub"):
        HookedMamba.from_pretrained("state-spaces/mamba-130m-hf")


# ---- bad checkpoints are bad input (one line; CheckpointError from the API, exit 2 from the CLI) -------------
@pytest.mark.parametrize("content", ["null", "3", "[1, 2]", '"mamba"'], ids=["null", "number", "list", "string"])
def test_error_config_json_not_an_object(tmp_path, content):
    _saved(tmp_path)
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"config.json must hold a JSON object .*, got (null|int|list|str)"):
        HookedMamba.from_pretrained(tmp_path)


def _poison(folder, key, value):
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    sd[key].view(-1)[1] = value
    save_file(sd, folder / "model.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_error_nonfinite_weights_name_the_tensor(tmp_path, value):
    _saved(tmp_path)
    _poison(tmp_path, "backbone.layers.0.mixer.D", value)
    with pytest.raises(CheckpointError, match=r"backbone.layers.0.mixer.D holds 1 non-finite value.*"
                                              r"allow_nonfinite=True") as err:
        HookedMamba.from_pretrained(tmp_path)
    assert "\n" not in str(err.value)
    broken = HookedMamba.from_pretrained(tmp_path, allow_nonfinite=True)  # to study a broken model on purpose
    assert not torch.isfinite(broken.blocks[0].mixer.D).all()


def test_error_nonfinite_weights_from_transformers():
    hf, _ = hf_and_ours("mamba", seed=1)
    with torch.no_grad():
        hf.backbone.layers[0].mixer.A_log[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"MambaForCausalLM: backbone.layers.0.mixer.A_log holds 1 non-finite"):
        HookedMamba.from_transformers(hf)
    assert HookedMamba.from_transformers(hf, allow_nonfinite=True).blocks[0].mixer.A_log.isnan().any()


def test_error_config_validation_keeps_the_reason(tmp_path):
    """transformers puts the reason of a validation error on its second line; it must survive into one line."""
    from mamba_interp.pipeline.config import UsageError
    from mamba_interp.pipeline.model_source import load_model_source

    raw = _saved(tmp_path)
    raw.pop("mamba_interp_config")
    raw["hidden_size"] = "abc"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"hidden_size.*expected int, got str") as err:
        HookedMamba.from_pretrained(tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"hidden_size.*expected int, got str"):
        load_model_source(str(tmp_path))


@pytest.mark.parametrize("case", ["null-config", "nan-weights"])
def test_cli_exits_2_with_one_line_for_a_bad_checkpoint(tmp_path, capsys, case):
    from mamba_interp.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    _saved(folder)
    if case == "null-config":
        (folder / "config.json").write_text("null")
    else:
        _poison(folder, "backbone.embeddings.weight", float("nan"))
    code = main(["run", "--model", str(folder), "--output", str(tmp_path / "out"), "--steps", "0", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert ("JSON object" if case == "null-config" else "backbone.embeddings.weight holds") in err
    assert not (tmp_path / "out").exists()
