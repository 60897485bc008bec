"""Checkpoint loading and saving (transformers' format and
the state-spaces ``config.json`` + ``pytorch_model.bin`` format).

Two on-disk formats are read:

* **transformers** — ``config.json`` with ``model_type`` ``mamba`` / ``mamba2`` / ``falcon_mamba``; weights in
  ``model.safetensors`` or ``pytorch_model.bin`` (sharded or not); keys ``backbone.embeddings.weight``,
  ``backbone.layers.{i}.{norm,mixer.*}``, ``backbone.norm_f.weight``, ``lm_head.weight``.
* **state-spaces** (mamba_ssm) — ``config.json`` with ``d_model``, ``n_layer``, ``ssm_cfg`` (``"layer": "Mamba2"``
  selects Mamba-2), ``pad_vocab_size_multiple``, ``tie_embeddings``; ``pytorch_model.bin`` with the same keys but
  ``backbone.embedding.weight``.

Both map onto our parameter names by a key rename (``backbone.layers.`` -> ``blocks.``, ``embedding(s).`` ->
``embed.``). ``save_pretrained`` writes the transformers format (so transformers loads our checkpoints too) plus
our exact config under ``"mamba_interp_config"``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from mamba_interp.models.config import MambaConfig

HF_TYPES = ("mamba", "mamba2", "falcon_mamba")
_SAFETENSORS, _BIN = "model.safetensors", "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint folder, its config or its weights do not describe a supported Mamba model."""


# ---- configs ---------------------------------------------------------------------------------------
def config_from_transformers(hf_cfg: Any) -> MambaConfig:
    """MambaConfig from a transformers ``MambaConfig`` / ``Mamba2Config`` / ``FalconMambaConfig`` object."""
    model_type = getattr(hf_cfg, "model_type", None)
    if model_type not in HF_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; expected one of {HF_TYPES}")
    act = getattr(hf_cfg, "hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"hidden_act={act!r} is not supported (Mamba uses 'silu')")
    common = dict(
        d_model=hf_cfg.hidden_size,
        n_layer=hf_cfg.num_hidden_layers,
        vocab_size=hf_cfg.vocab_size,
        d_state=hf_cfg.state_size,
        d_conv=hf_cfg.conv_kernel,
        expand=int(hf_cfg.expand),
        bias=bool(hf_cfg.use_bias),
        conv_bias=bool(hf_cfg.use_conv_bias),
        norm_eps=float(hf_cfg.layer_norm_epsilon),
        residual_in_fp32=bool(hf_cfg.residual_in_fp32),
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)),
        dt_min=float(hf_cfg.time_step_min),
        dt_max=float(hf_cfg.time_step_max),
        dt_init_floor=float(hf_cfg.time_step_floor),
    )
    if model_type in ("mamba", "falcon_mamba"):
        cfg = MambaConfig(
            arch="mamba1",
            dt_rank=int(hf_cfg.time_step_rank),
            bcdt_rms_eps=float(hf_cfg.mixer_rms_eps) if model_type == "falcon_mamba" else None,
            **common,
        )
    else:
        heads = int(hf_cfg.num_heads)
        if heads * hf_cfg.head_dim != hf_cfg.expand * hf_cfg.hidden_size:
            raise CheckpointError(
                f"Mamba-2 config: num_heads*head_dim = {heads * hf_cfg.head_dim} must equal "
                f"expand*hidden_size = {hf_cfg.expand * hf_cfg.hidden_size}"
            )
        cfg = MambaConfig(
            arch="mamba2",
            headdim=int(hf_cfg.head_dim),
            ngroups=int(hf_cfg.n_groups),
            chunk_size=int(hf_cfg.chunk_size),
            dt_limit=tuple(float(x) for x in hf_cfg.time_step_limit),
            **common,
        )
    return cfg


_SSM_DEFAULTS = {
    "Mamba1": dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False),
    "Mamba2": dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, conv_bias=True,
                   bias=False, D_has_hdim=False, dt_limit=(0.0, math.inf), A_init_range=(1.0, 16.0)),
}
_SSM_IGNORED = {"layer", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "rmsnorm", "norm_before_gate",
                "d_ssm", "use_fast_path", "layer_idx", "A_init_range", "sequence_parallel", "process_group",
                "use_mem_eff_path", "activation"}


def config_from_state_spaces(raw: dict[str, Any], source: str = "config.json") -> MambaConfig:
    """MambaConfig from a state-spaces (mamba_ssm ``MambaConfig``) ``config.json`` dict, ``ssm_cfg`` in full."""
    for key in ("d_model", "n_layer"):
        if key not in raw:
            raise CheckpointError(f"{source}: state-spaces config lacks {key!r}")
    if raw.get("attn_layer_idx"):
        raise CheckpointError(f"{source}: hybrid attention layers (attn_layer_idx) are not supported")
    if raw.get("d_intermediate", 0):
        raise CheckpointError(f"{source}: MLP blocks (d_intermediate > 0) are not supported")
    if not raw.get("rms_norm", True):
        raise CheckpointError(f"{source}: rms_norm=false (LayerNorm blocks) is not supported")
    ssm = dict(raw.get("ssm_cfg") or {})
    layer = ssm.get("layer", "Mamba1")
    if layer not in _SSM_DEFAULTS:
        raise CheckpointError(f"{source}: ssm_cfg.layer={layer!r} is not supported; expected Mamba1 or Mamba2")
    if layer == "Mamba2":
        if not ssm.get("rmsnorm", True) or ssm.get("norm_before_gate", False):
            raise CheckpointError(f"{source}: Mamba2 needs rmsnorm=true and norm_before_gate=false")
        d_inner = ssm.get("expand", 2) * raw["d_model"]
        if ssm.get("d_ssm") not in (None, d_inner):
            raise CheckpointError(f"{source}: ssm_cfg.d_ssm={ssm['d_ssm']} != d_inner={d_inner} is not supported")
    fields = dict(_SSM_DEFAULTS[layer])
    for key, value in ssm.items():
        if key in fields:
            fields[key] = tuple(value) if key in ("dt_limit", "A_init_range") else value
        elif key not in _SSM_IGNORED:
            raise CheckpointError(f"{source}: unknown ssm_cfg key {key!r} for {layer}")
    for key in ("dt_min", "dt_max"):
        if key in ssm:
            fields[key] = float(ssm[key])
    if "dt_init_floor" in ssm:
        fields["dt_init_floor"] = float(ssm["dt_init_floor"])
    if layer == "Mamba2" and "A_init_range" in ssm:
        fields["A_init_range"] = tuple(ssm["A_init_range"])
    return MambaConfig(
        arch="mamba1" if layer == "Mamba1" else "mamba2",
        d_model=int(raw["d_model"]),
        n_layer=int(raw["n_layer"]),
        vocab_size=int(raw.get("vocab_size", 50277)),
        pad_vocab_size_multiple=int(raw.get("pad_vocab_size_multiple", 8)),
        residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        tie_embeddings=bool(raw.get("tie_embeddings", True)),
        norm_eps=float(raw.get("norm_epsilon", 1e-5)),
        **fields,
    )


def _decode_floats(value: Any) -> Any:
    """transformers 5 writes non-finite floats as ``{"__float__": "Infinity"}``."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_floats(v) for v in value]
    return value


def config_from_json(raw: dict[str, Any], source: str = "config.json") -> MambaConfig:
    """Detect the format of a ``config.json`` dict and translate it."""
    if "mamba_interp_config" in raw:
        return MambaConfig.from_dict(raw["mamba_interp_config"])
    if "model_type" in raw:
        model_type = raw["model_type"]
        if model_type not in HF_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not a Mamba model; supported: {HF_TYPES} "
                "(or a state-spaces config with d_model, n_layer, ssm_cfg)"
            )
        import transformers

        hf_cls = {"mamba": transformers.MambaConfig, "mamba2": transformers.Mamba2Config,
                  "falcon_mamba": transformers.FalconMambaConfig}[model_type]
        fields = {k: _decode_floats(v) for k, v in raw.items()
                  if k not in ("model_type", "architectures", "transformers_version")}
        try:
            hf_cfg = hf_cls(**fields)
        except Exception as exc:  # transformers' strict validation (the reason is on the message's next line)
            raise CheckpointError(f"{source}: invalid {model_type} config: {one_line(exc)}") from exc
        return config_from_transformers(hf_cfg)
    if "d_model" in raw and "n_layer" in raw:
        return config_from_state_spaces(raw, source)
    raise CheckpointError(
        f"{source} is neither a transformers Mamba config (model_type mamba/mamba2/falcon_mamba) nor a "
        "state-spaces config (d_model, n_layer, ssm_cfg)"
    )


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (validation errors often put the reason on the next one)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_config(config_path: Path) -> MambaConfig:
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        kind = "null" if raw is None else type(raw).__name__
        raise CheckpointError(
            f"{config_path} must hold a JSON object (the model's config fields), got {kind}; "
            "is this the checkpoint's config.json?"
        )
    try:
        return config_from_json(raw, str(config_path))
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError) as exc:  # a field of the right name but a wrong value
        raise CheckpointError(f"{config_path}: {one_line(exc)}") from exc


# ---- weights ---------------------------------------------------------------------------------------
def check_finite(sd: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN / Inf in any weight, naming the tensor: a broken checkpoint would otherwise load silently
    and fail far away (or give NaN logits)."""
    for key, value in sd.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
            raise CheckpointError(
                f"{source}: {key} holds {nan + inf} non-finite value(s) ({nan} NaN, {inf} Inf) of "
                f"{value.numel()}; the checkpoint is broken (pass allow_nonfinite=True to load it anyway)"
            )


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers / state-spaces keys -> HookedMamba keys."""
    out = {}
    for key, value in sd.items():
        new = re.sub(r"^backbone\.", "", key)
        new = re.sub(r"^embeddings?\.", "embed.", new)
        new = re.sub(r"^layers\.", "blocks.", new)
        out[new] = value
    return out


def to_transformers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HookedMamba keys -> transformers keys (``backbone.embeddings.weight``, ``backbone.layers.i...``)."""
    out = {}
    for key, value in sd.items():
        if key == "lm_head.weight":
            out[key] = value
            continue
        new = re.sub(r"^embed\.", "embeddings.", key)
        new = re.sub(r"^blocks\.", "layers.", new)
        out["backbone." + new] = value
    return out


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a checkpoint folder (safetensors preferred; sharded indexes followed)."""
    from safetensors.torch import load_file

    for name, loader in ((_SAFETENSORS, load_file), (_BIN, _torch_load)):
        single, index = folder / name, folder / (name + ".index.json")
        if single.exists():
            return _load_with(loader, single), single.name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid shard index ({exc})") from exc
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (folder / shard).exists():
                    raise CheckpointError(f"{index} names shard {shard!r}, which is missing from {folder}")
                sd.update(_load_with(loader, folder / shard))
            return sd, index.name
    raise CheckpointError(f"no weights in {folder}: expected {_SAFETENSORS} or {_BIN} (or a sharded index)")


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_with(loader, path: Path) -> dict[str, torch.Tensor]:
    try:
        return loader(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc


def load_state_dict_into(model, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy converted weights in, checking every key and shape; errors name the file, key and expectation."""
    expected = model.state_dict()
    tied = model.cfg.tie_embeddings
    sd = dict(sd)
    if tied:
        sd.pop("lm_head.weight", None)  # tied to the embedding (state-spaces may still store it)
    missing = [k for k in expected if k not in sd and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{source}: " + "; ".join(parts) + " (does config.json match the weights?)")
    for key, value in sd.items():
        want = expected[key].shape
        if value.shape != want:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(value.shape)}, expected {tuple(want)} from config.json"
            )
    with torch.no_grad():
        for key, param in model.state_dict(keep_vars=True).items():
            if key in sd:
                param.copy_(sd[key].to(param.dtype))


# ---- entry points ----------------------------------------------------------------------------------
def resolve_folder(name_or_path: str | Path) -> Path:
    """A local folder, or a hub id resolved through the local Hugging Face cache (download when online)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    name = str(name_or_path)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise CheckpointError(f"{name!r} is neither a local folder nor a Hugging Face hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"]
        try:
            return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
        except Exception:
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
                raise
            return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as exc:
        raise CheckpointError(
            f"{name!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}); download it where the hub is reachable and pass the folder path"
        ) from exc


def load_pretrained(cls, name_or_path, device=None, dtype=None, scan_impl="auto", allow_nonfinite=False,
                    tokenizer="auto"):
    folder = resolve_folder(name_or_path)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"no config.json in {folder}")
    cfg = _read_config(config_path).replace(extra={"source": str(folder)})
    sd, weights_name = _read_weights(folder)
    source = str(folder / weights_name)
    if not allow_nonfinite:
        check_finite(sd, source)
    model = cls(cfg, scan_impl=scan_impl)
    load_state_dict_into(model, convert_state_dict(sd), source)
    _attach_tokenizer(model, folder if isinstance(tokenizer, str) and tokenizer == "auto" else tokenizer)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


def from_transformers(cls, hf_model, scan_impl="auto", allow_nonfinite=False, tokenizer=None):
    cfg = config_from_transformers(hf_model.config)
    sd = hf_model.state_dict()
    if not allow_nonfinite:
        check_finite(sd, type(hf_model).__name__)
    model = cls(cfg, scan_impl=scan_impl)
    param = next(hf_model.parameters())
    model.to(device=param.device, dtype=param.dtype)
    load_state_dict_into(model, convert_state_dict(sd), type(hf_model).__name__)
    _attach_tokenizer(model, tokenizer)
    return model.eval()


def _attach_tokenizer(model, tokenizer) -> None:
    """``tokenizer``: None (none), a folder (its tokenizer files, offline, when there are any) or an object."""
    from mamba_interp.models.tokens import load_folder_tokenizer

    if tokenizer is None:
        return
    if isinstance(tokenizer, (str, Path)):
        model.tokenizer, model.tokenizer_error = load_folder_tokenizer(Path(tokenizer))
    else:
        model.set_tokenizer(tokenizer)


def transformers_config(cfg: MambaConfig):
    """The transformers config object describing ``cfg`` (padded vocabulary, as transformers expects)."""
    import transformers

    common = dict(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, vocab_size=cfg.padded_vocab_size,
        state_size=cfg.d_state, conv_kernel=cfg.d_conv, expand=cfg.expand, use_bias=cfg.bias,
        use_conv_bias=cfg.conv_bias, layer_norm_epsilon=cfg.norm_eps, residual_in_fp32=cfg.residual_in_fp32,
        tie_word_embeddings=cfg.tie_embeddings, time_step_min=cfg.dt_min, time_step_max=cfg.dt_max,
        time_step_floor=cfg.dt_init_floor, hidden_act="silu",
    )
    if cfg.arch == "mamba2":
        return transformers.Mamba2Config(num_heads=cfg.nheads, head_dim=cfg.headdim, n_groups=cfg.ngroups,
                                         chunk_size=cfg.chunk_size, time_step_limit=tuple(cfg.dt_limit), **common)
    if cfg.bcdt_rms_eps is not None:
        return transformers.FalconMambaConfig(time_step_rank=cfg.dt_rank_value, mixer_rms_eps=cfg.bcdt_rms_eps,
                                              **common)
    return transformers.MambaConfig(time_step_rank=cfg.dt_rank_value, **common)


def save_pretrained(model, path: str | Path) -> None:
    """Atomically write ``config.json`` + ``model.safetensors`` in transformers format (+ our exact config)."""
    from safetensors.torch import save_file

    from mamba_interp.utils.io import atomic_write_json, atomic_path

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    with atomic_path(folder / _SAFETENSORS) as tmp:
        save_file(to_transformers_state_dict(sd), str(tmp), metadata={"format": "pt"})
    hf_cfg = transformers_config(model.cfg)
    hf_cfg.architectures = [{"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM",
                             "falcon_mamba": "FalconMambaForCausalLM"}[hf_cfg.model_type]]
    raw = json.loads(hf_cfg.to_json_string(use_diff=False))
    raw["mamba_interp_config"] = model.cfg.to_dict()
    atomic_write_json(folder / "config.json", raw)
