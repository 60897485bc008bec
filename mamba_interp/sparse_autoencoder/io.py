"""Save / load an SAE as a folder ``cfg.json`` + ``sae_weights.safetensors``, as SAELens 6.x writes and reads it.

Tensors: ``W_enc`` [d, m], ``W_dec`` [m, d], ``b_enc`` [m], ``b_dec`` [d], and ``threshold`` [m] for JumpReLU (BatchTopK
SAEs are exported as JumpReLU with their single threshold, as SAELens does). ``cfg.json`` carries SAELens's fields
(``architecture`` ∈ {standard, topk, jumprelu}, ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``,
``normalize_activations``, ``reshape_activations``, ``k``, ``rescale_acts_by_decoder_norm``) and ``metadata`` with
``sae_lens_version`` (the config format, 6.0.0: SAELens' ``handle_config_defaulting`` then keeps ``metadata`` as
written instead of rebuilding it from pre-6.0 top-level keys), ``hook_name`` and ``model_name``; plus our full
``SAEConfig`` under ``"mamba_interp"``, which SAELens ignores. ``sae_lens.SAE.load_from_disk(folder)`` loads it
with its default file names. The activation normalisation is folded into the weights
(``normalize_activations = "none"``). ``load_sae`` also reads folders written before the rename
(``sae.safetensors``) and folders written by SAELens.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mamba_interp.sparse_autoencoder.config import SAEConfig
from mamba_interp.sparse_autoencoder.model import SparseAutoencoder
from mamba_interp.utils.io import atomic_path, atomic_write_json

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
"""SAELens's ``SAE_WEIGHTS_FILENAME``."""
LEGACY_WEIGHTS_FILENAME = "sae.safetensors"
"""What mamba_interp wrote before it used SAELens's name; still read."""
SAELENS_CONFIG_VERSION = "6.0.0"
"""The SAELens config format ``cfg.json`` follows (``metadata.sae_lens_version``)."""
FORMAT_VERSION = 1

_TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}


def folded_copy(sae: SparseAutoencoder) -> SparseAutoencoder:
    """A copy of ``sae`` with its activation scale folded into the weights (the original is untouched)."""
    out = copy.deepcopy(sae)
    out.training_history = None
    out.fold_activation_scale()
    return out


def saelens_state_dict(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """The tensors SAELens expects, from an SAE whose activation scale is folded (scale 1)."""
    if sae.activation_scale != 1.0:
        raise ValueError("fold the activation scale first (folded_copy(sae)); SAELens weights take raw activations")
    state = {
        name: getattr(sae, name).detach().cpu().contiguous().clone() for name in ("W_enc", "W_dec", "b_enc", "b_dec")
    }
    threshold = sae.threshold
    if threshold is not None:
        state["threshold"] = threshold.detach().cpu().contiguous().clone()
    return state


def saelens_cfg(sae: SparseAutoencoder, hook_name: str | None = None, model_name: str | None = None) -> dict[str, Any]:
    cfg = sae.cfg
    out: dict[str, Any] = {
        "architecture": _TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    # not trained by SAELens: its training version stays null rather than defaulting to the installed version
    metadata: dict[str, Any] = {"sae_lens_version": SAELENS_CONFIG_VERSION, "sae_lens_training_version": None}
    metadata.update({key: value for key, value in (("hook_name", hook_name), ("model_name", model_name))
                     if value is not None})
    out["metadata"] = metadata
    return out


def save_sae(
    sae: SparseAutoencoder,
    folder: str | Path,
    hook_name: str | None = None,
    model_name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/sae_weights.safetensors`` then ``folder/cfg.json`` (each atomically); returns the folder.

    The activation scale is folded into the saved weights, so the saved SAE takes raw activations.
    ``hook_name`` / ``model_name`` go to ``cfg.json["metadata"]`` (SAELens reads them from there);
    ``extra`` (JSON-able) is stored under ``cfg.json["mamba_interp"]["extra"]``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folded = folded_copy(sae)
    state = saelens_state_dict(folded)
    with atomic_path(folder / WEIGHTS_FILENAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    (folder / LEGACY_WEIGHTS_FILENAME).unlink(missing_ok=True)  # a stale copy from an older save
    cfg = saelens_cfg(folded, hook_name=hook_name, model_name=model_name)
    cfg["mamba_interp"] = {
        "format_version": FORMAT_VERSION,
        "architecture": sae.cfg.architecture,
        "sae_config": sae.cfg.to_dict(),
        "folded_activation_scale": sae.activation_scale,
        "extra": extra or {},
    }
    atomic_write_json(folder / CFG_FILENAME, cfg)
    return folder


def _config_from_saelens(cfg: dict[str, Any]) -> SAEConfig:
    arch = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}.get(cfg.get("architecture", ""))
    if arch is None:
        raise ValueError(
            f"cannot load SAELens architecture {cfg.get('architecture')!r}; supported: standard, topk, jumprelu"
        )
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(
            f"cfg.json has normalize_activations={cfg['normalize_activations']!r}; fold the scaling factor into the "
            "weights first (SAELens fold_activation_norm_scaling_factor)"
        )
    if not cfg.get("apply_b_dec_to_input", True):
        raise ValueError(
            "SAEs with apply_b_dec_to_input=False are not supported; subtract b_dec@W_enc from b_enc first"
        )
    return SAEConfig(
        d_in=int(cfg["d_in"]),
        d_sae=int(cfg["d_sae"]),
        architecture=arch,
        k=int(cfg["k"]) if arch == "topk" else None,
        l1_coefficient=1.0 if arch in ("relu", "jumprelu") else 0.0,  # training-only; any valid value
    )


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE saved by ``save_sae`` (or by SAELens: standard, topk or jumprelu) from ``folder``."""
    folder = Path(folder)
    cfg_path = folder / CFG_FILENAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CFG_FILENAME} in {folder}; is this an SAE folder written by save_sae?")
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    weights = next((folder / n for n in (WEIGHTS_FILENAME, LEGACY_WEIGHTS_FILENAME) if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"no {WEIGHTS_FILENAME} (or {LEGACY_WEIGHTS_FILENAME}) in {folder}")
    state = load_file(str(weights))
    ours = raw.get("mamba_interp")
    cfg = SAEConfig.from_dict(ours["sae_config"]) if ours else _config_from_saelens(raw)
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            target = getattr(sae, name)
            if state[name].shape != target.shape:
                raise ValueError(
                    f"{weights}: {name} has shape {tuple(state[name].shape)}, expected {tuple(target.shape)}"
                )
            target.data = state[name].to(target.dtype).clone()
        if raw.get("architecture") == "topk" and raw.get("rescale_acts_by_decoder_norm", False):
            # SAELens TopK ranks h·‖W_dec,i‖ and decodes f/‖W_dec,i‖: fold the norms into the weights
            norms = sae.W_dec.norm(dim=1)
            sae.W_enc.mul_(norms)
            sae.b_enc.mul_(norms)
            sae.W_dec.div_(norms[:, None])
        if sae.threshold is not None:
            if "threshold" not in state:
                raise ValueError(f"{weights}: a {cfg.architecture} SAE needs a 'threshold' tensor")
            sae.threshold.data = state["threshold"].to(sae.W_dec.dtype).clone()
    sae.activation_scale = 1.0
    sae.eval()
    return sae.to(device)
