"""HookedMamba: an exact, fully hooked Mamba-1 / Mamba-2 language model.

Block structure as transformers' ``MambaBlock``/``Mamba2Block`` (pre-norm, ``residual + mixer(norm(residual))``,
residual kept in float32 when ``residual_in_fp32``). This equals state-spaces' fused Add→Norm→Mixer block whose
true residual is ``hidden + residual`` (``mamba.md`` §1.3), so ``blocks.i.hook_resid_pre`` is the residual stream
itself. Index letters: see ``models/config.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mamba_interp.models.config import MambaConfig
from mamba_interp.models.hooks import HookedRootModule, HookPoint
from mamba_interp.models.mixer_mamba1 import Mamba1Mixer
from mamba_interp.models.mixer_mamba2 import Mamba2Mixer
from mamba_interp.models.norms import RMSNorm
from mamba_interp.models.ops.dispatch import validate_scan_impl

MIXERS = {"mamba1": Mamba1Mixer, "mamba2": Mamba2Mixer}


class Block(nn.Module):
    """Pre-norm residual block around any mixer (state-spaces' generic ``Block``)."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.hook_resid_pre = HookPoint()  # (b, l, d)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hook_norm = HookPoint()  # (b, l, d)
        self.mixer = MIXERS[cfg.arch](cfg)
        self.hook_resid_post = HookPoint()  # (b, l, d)

    def forward(self, resid: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        resid = self.hook_resid_pre(resid)
        normed = self.hook_norm(self.norm(resid.to(self.norm.weight.dtype)))
        if self.residual_in_fp32:
            resid = resid.float()
        return self.hook_resid_post(resid + self.mixer(normed, mask))


class HookedMamba(HookedRootModule):
    """Mamba-1 or Mamba-2 LM with a hook point on every activation (DESIGN.md §3).

    >>> model = HookedMamba(MambaConfig(arch="mamba2", d_model=64, n_layer=2, headdim=16))
    >>> logits, cache = model.run_with_cache(tokens, names_filter="blocks.*.mixer.hook_dt")

    ``scan_impl`` picks the scan ("auto" by device; see ``models/ops/dispatch.py``).
    """

    def __init__(
        self,
        cfg: MambaConfig,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        scan_impl: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(cfg, MambaConfig):
            raise TypeError(f"HookedMamba needs a MambaConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        v = cfg.padded_vocab_size
        self.embed = nn.Embedding(v, cfg.d_model)
        self.hook_embed = HookPoint()  # (b, l, d)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hook_norm_final = HookPoint()  # (b, l, d)
        self.lm_head = nn.Linear(cfg.d_model, v, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()
        self.set_scan_impl(scan_impl)
        self.setup_hooks()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # ---- construction -----------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed.weight, std=self.cfg.initializer_range)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.cfg.initializer_range)
        for block in self.blocks:
            block.mixer.reset_parameters()
            block.norm.weight.fill_(1.0)
        self.norm_f.weight.fill_(1.0)

    def set_scan_impl(self, scan_impl: str) -> None:
        validate_scan_impl(self.cfg.arch, scan_impl)
        self.scan_impl = scan_impl
        for block in self.blocks:
            block.mixer.scan_impl = scan_impl

    @property
    def last_scans(self) -> list[str]:
        """The scan each layer used in the last forward ("loop", "chunked", "kernel", "materialised", ...)."""
        return [block.mixer.last_scan for block in self.blocks]

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        scan_impl: str = "auto",
    ) -> HookedMamba:
        """Load a transformers-format (``model_type`` mamba / mamba2 / falcon_mamba) or state-spaces-format
        checkpoint from a local folder, or a hub id already in the local Hugging Face cache."""
        from mamba_interp.models.loading import load_pretrained

        return load_pretrained(cls, name_or_path, device=device, dtype=dtype, scan_impl=scan_impl)

    @classmethod
    def from_transformers(cls, hf_model: Any, scan_impl: str = "auto") -> HookedMamba:
        """Build from a live ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` / ``FalconMambaForCausalLM``."""
        from mamba_interp.models.loading import from_transformers

        return from_transformers(cls, hf_model, scan_impl=scan_impl)

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` (our fields) + ``model.safetensors``; reload with ``from_pretrained``."""
        from mamba_interp.models.loading import save_pretrained

        save_pretrained(self, path)

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        stop_at_layer: int | None = None,
    ) -> torch.Tensor:
        """input_ids [b, l] (or [l]) -> logits [b, l, v] in float32 (v = padded vocabulary).

        ``attention_mask`` [b, l] of 0/1 zeroes padding inside each mixer exactly as transformers does, so left-
        and right-padded batches match transformers. ``stop_at_layer=i`` returns the residual stream entering
        block i ([b, l, d]) instead of logits.
        """
        input_ids, mask = self._check_inputs(input_ids, attention_mask)
        n = self.cfg.n_layer
        if stop_at_layer is not None and not 0 <= stop_at_layer <= n:
            raise ValueError(f"stop_at_layer={stop_at_layer} is out of range 0..{n}")
        resid = self.hook_embed(self.embed(input_ids))  # (b, l, d)
        for block in self.blocks[: n if stop_at_layer is None else stop_at_layer]:
            resid = block(resid, mask)
        if stop_at_layer is not None:
            return resid
        normed = self.hook_norm_final(self.norm_f(resid))
        return self.lm_head(normed.to(self.lm_head.weight.dtype)).float()  # (b, l, v)

    def _check_inputs(
        self, input_ids: Any, attention_mask: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}; use .long()")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
            if attention_mask is not None and attention_mask.dim() == 1:
                attention_mask = attention_mask.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one token")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} is outside the vocabulary 0..{self.cfg.vocab_size - 1}; "
                "check the tokenizer matches the model"
            )
        input_ids = input_ids.to(self.embed.weight.device)
        if attention_mask is None:
            return input_ids, None
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must match input_ids' shape {tuple(input_ids.shape)}, got {shape}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        mask = attention_mask.to(input_ids.device)
        return input_ids, (None if bool(mask.all()) else mask)

    def run_with_saes(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Logits with SAEs spliced in at hook points (``mamba_interp.sparse_autoencoder.splice.run_with_saes``)."""
        from mamba_interp.sparse_autoencoder.splice import run_with_saes

        return run_with_saes(self, *args, **kwargs)

    # ---- conveniences ------------------------------------------------------------------------
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fingerprint(self) -> str:
        """SHA-256 of the config and every parameter (stable across processes; for manifests)."""
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps(self.cfg.to_dict(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]
