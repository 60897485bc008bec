"""HookedMamba: an exact, fully hooked Mamba-1 / Mamba-2 language model.

Block structure as transformers' ``MambaBlock``/``Mamba2Block`` (pre-norm, ``residual + mixer(norm(residual))``,
residual kept in float32 when ``residual_in_fp32``). This equals state-spaces' fused Add→Norm→Mixer block whose
true residual is ``hidden + residual``, so ``blocks.i.hook_resid_pre`` is the residual stream itself.
Index letters: see ``models/config.py``.
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
from mamba_interp.models.state import InferenceState, LayerState, check_state

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

    def forward(
        self, resid: torch.Tensor, mask: torch.Tensor | None = None, state: LayerState | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, LayerState]:
        """resid [b, l, d] -> [b, l, d]; with the layer's inference ``state``, also the state after it."""
        resid = self.hook_resid_pre(resid)
        normed = self.hook_norm(self.norm(resid.to(self.norm.weight.dtype)))
        if self.residual_in_fp32:
            resid = resid.float()
        if state is None:
            return self.hook_resid_post(resid + self.mixer(normed, mask))
        out, state = self.mixer(normed, mask, state)
        return self.hook_resid_post(resid + out), state


class HookedMamba(HookedRootModule):
    """Mamba-1 or Mamba-2 LM with a hook point on every activation (hook table: docs/hooks.md).

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
        self.tokenizer: Any = None  # attached by from_pretrained when the folder holds one, or set_tokenizer
        self.tokenizer_error: str | None = None  # why from_pretrained attached none
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
        allow_nonfinite: bool = False,
        tokenizer: Any = "auto",
    ) -> HookedMamba:
        """Load a transformers-format (``model_type`` mamba / mamba2 / falcon_mamba) or state-spaces-format
        checkpoint from a local folder, or a hub id already in the local Hugging Face cache.

        ``tokenizer="auto"`` attaches the folder's tokenizer (``model.tokenizer``; None, with the reason in
        ``model.tokenizer_error``, when the folder has none); None attaches nothing; a tokenizer object or another
        folder is attached instead. NaN / Inf in a weight raise a ``CheckpointError`` naming the tensor unless
        ``allow_nonfinite=True`` (to study a broken model on purpose)."""
        from mamba_interp.models.loading import load_pretrained

        return load_pretrained(cls, name_or_path, device=device, dtype=dtype, scan_impl=scan_impl,
                               allow_nonfinite=allow_nonfinite, tokenizer=tokenizer)

    @classmethod
    def from_transformers(cls, hf_model: Any, scan_impl: str = "auto", allow_nonfinite: bool = False,
                          tokenizer: Any = None) -> HookedMamba:
        """Build from a live ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` / ``FalconMambaForCausalLM``."""
        from mamba_interp.models.loading import from_transformers

        return from_transformers(cls, hf_model, scan_impl=scan_impl, allow_nonfinite=allow_nonfinite,
                                 tokenizer=tokenizer)

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
        state: InferenceState | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, InferenceState]:
        """input_ids [b, l] (or [l]) -> logits [b, l, v] in float32 (v = padded vocabulary).

        ``attention_mask`` [b, l] of 0/1 zeroes padding inside each mixer exactly as transformers does, so left-
        and right-padded batches match transformers. ``stop_at_layer=i`` returns the residual stream entering
        block i ([b, l, d]) instead of logits. ``state`` (from :meth:`init_state` or an earlier call) continues
        a sequence: the call returns ``(logits, new_state)`` and processing a sequence in pieces equals
        processing it whole (the given state is not changed).
        """
        input_ids, mask = self._check_inputs(input_ids, attention_mask)
        n = self.cfg.n_layer
        if stop_at_layer is not None and not 0 <= stop_at_layer <= n:
            raise ValueError(f"stop_at_layer={stop_at_layer} is out of range 0..{n}")
        if state is not None:
            if stop_at_layer is not None:
                raise ValueError("stop_at_layer cannot be combined with state (the state needs every layer)")
            check_state(state, self.cfg, input_ids.shape[0])
        new_states = []
        resid = self.hook_embed(self.embed(input_ids))  # (b, l, d)
        for i, block in enumerate(self.blocks[: n if stop_at_layer is None else stop_at_layer]):
            if state is None:
                resid = block(resid, mask)
            else:
                resid, new = block(resid, mask, state.layers[i])
                new_states.append(new)
        if stop_at_layer is not None:
            return resid
        normed = self.hook_norm_final(self.norm_f(resid))
        logits = self.lm_head(normed.to(self.lm_head.weight.dtype)).float()  # (b, l, v)
        if state is None:
            return logits
        return logits, InferenceState(tuple(new_states), state.offset + input_ids.shape[1])

    def init_state(self, batch_size: int) -> InferenceState:
        """Zero conv windows and SSM states for ``batch_size`` sequences (on the model's device)."""
        w = self.embed.weight
        return InferenceState.zeros(self.cfg, batch_size, device=w.device, dtype=w.dtype)

    def generate(self, input_ids: Any, max_new_tokens: int, **kwargs: Any) -> Any:
        """Continue ``input_ids`` [b, l] (or text, with a tokenizer) by ``max_new_tokens`` tokens through the
        inference state, hooks (``fwd_hooks=``) applied at every generated token; see
        :func:`mamba_interp.models.generation.generate` for the options (greedy, temperature, top_k, seed)."""
        from mamba_interp.models.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    def run_blocks(self, resid: torch.Tensor, start_layer: int,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks ``start_layer ..`` on the residual stream entering ``start_layer`` [b, l, d] (e.g. a cached
        ``stop_at_layer=start_layer`` output) -> the residual stream after the last block, as ``forward`` computes
        it; hooks attached with ``self.hooks(...)`` at those blocks fire as in a full pass."""
        if not 0 <= start_layer <= self.cfg.n_layer:
            raise ValueError(f"start_layer={start_layer} is out of range 0..{self.cfg.n_layer}")
        mask = None
        if attention_mask is not None:
            mask = attention_mask.to(resid.device)
            if bool(mask.all()):
                mask = None  # as forward: an all-ones mask is no mask
        for block in self.blocks[start_layer:]:
            resid = block(resid, mask)
        return resid

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
        # every integer dtype is accepted (the embedding takes only int32/int64); a cast of int64 is free
        input_ids = input_ids.long()
        lo, hi = int(input_ids.min()), int(input_ids.max())
        rows = self.embed.weight.shape[0]  # ids in the padding rows are valid, as in transformers and mamba_ssm
        if lo < 0 or hi >= rows:
            padding = (f"; {self.cfg.vocab_size}..{rows - 1} are padding rows" if rows > self.cfg.vocab_size
                       else "")
            raise ValueError(
                f"token id {lo if lo < 0 else hi} is outside the vocabulary: the embedding has rows 0..{rows - 1}"
                f"{padding}; check the tokenizer matches the model"
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

    # ---- tokens and embeddings ------------------------------------------------------------------
    def set_tokenizer(self, tokenizer: Any) -> None:
        """Attach a tokenizer (a Hugging Face tokenizer, or anything with encode/decode)."""
        from mamba_interp.models.tokens import check_tokenizer

        self.tokenizer, self.tokenizer_error = check_tokenizer(tokenizer), None

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            why = f" ({self.tokenizer_error})" if self.tokenizer_error else ""
            raise ValueError(f"this model has no tokenizer{why}; attach one with model.set_tokenizer(tok)")
        return self.tokenizer

    def to_tokens(self, text: str | list[str], prepend_bos: bool = False, padding_side: str = "left",
                  return_mask: bool = False) -> Any:
        """Text -> token ids [b, l] on the model's device (with ``return_mask=True`` also the attention mask,
        needed when texts differ in length); see :func:`mamba_interp.models.tokens.to_tokens`."""
        from mamba_interp.models import tokens

        out = tokens.to_tokens(self._need_tokenizer(), text, prepend_bos, padding_side, return_mask)
        device = self.embed.weight.device
        return tuple(t.to(device) for t in out) if return_mask else out.to(device)

    def to_str_tokens(self, tokens: Any, prepend_bos: bool = False) -> list[str] | list[list[str]]:
        """Each token of a text or of ids [l] / [b, l] decoded on its own (``[" Mary", " went"]``)."""
        from mamba_interp.models.tokens import to_str_tokens

        return to_str_tokens(self._need_tokenizer(), tokens, prepend_bos)

    def to_string(self, tokens: Any) -> str | list[str]:
        """Token ids [l] -> text; [b, l] -> a list of texts."""
        from mamba_interp.models.tokens import to_string

        return to_string(self._need_tokenizer(), tokens)

    @property
    def W_E(self) -> torch.Tensor:
        """The embedding matrix [v, d] (v = padded vocabulary)."""
        return self.embed.weight

    @property
    def W_U(self) -> torch.Tensor:
        """The unembedding [d, v] (TransformerLens' orientation: logits = resid @ W_U after the final norm)."""
        return self.lm_head.weight.T

    def unembed(self, resid: torch.Tensor, apply_norm: bool = True) -> torch.Tensor:
        """Logits [..., v] (float32) of a residual-stream vector [..., d]: through ``norm_f`` then ``lm_head``, as
        the model's last step (the logit lens); ``apply_norm=False`` multiplies by ``W_U`` only."""
        if resid.shape[-1] != self.cfg.d_model:
            raise ValueError(f"unembed needs [..., d_model={self.cfg.d_model}], got {tuple(resid.shape)}")
        x = resid.to(self.norm_f.weight.dtype)
        x = self.norm_f(x) if apply_norm else x
        return self.lm_head(x.to(self.lm_head.weight.dtype)).float()

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
