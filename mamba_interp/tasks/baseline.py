"""The same-size transformer baseline: a tiny GPT-2 (transformers' ``GPT2LMHeadModel``, random init) with
HookedMamba's calling convention, ``model(input_ids [b, l]) -> logits [b, l, v]`` in float32.

GPT-2 has learned absolute position embeddings, so positions beyond the training length are untrained: the
baseline is expected to fail length extrapolation where Mamba succeeds (Gu & Dao 2023, §4.1.2, Table 2).
``n_positions`` is set large enough to *evaluate* at long lengths (16× the training length by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-call progress bars (``Loading weights``) while saving/loading tiny models."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class TransformerBaseline(nn.Module):
    """A GPT-2 LM. ``hf_model`` is the wrapped ``GPT2LMHeadModel`` (use it for attentions / hidden states)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model

    @classmethod
    def build(cls, vocab_size: int, d_model: int, n_layer: int, n_head: int, n_positions: int) -> TransformerBaseline:
        """Random init (seed with ``torch.manual_seed`` first); no dropout, tied embeddings, MLP width 4·d."""
        from transformers import GPT2Config, GPT2LMHeadModel

        if d_model % n_head:
            raise ValueError(f"transformer d_model={d_model} must be divisible by n_head={n_head}")
        cfg = GPT2Config(
            vocab_size=vocab_size, n_positions=n_positions, n_embd=d_model, n_layer=n_layer, n_head=n_head,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
            tie_word_embeddings=True,
        )
        return cls(GPT2LMHeadModel(cfg))

    @property
    def config(self):
        return self.hf_model.config

    @property
    def n_positions(self) -> int:
        return int(self.hf_model.config.n_positions)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [b, l] -> logits [b, l, v] float32."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.shape[1] > self.n_positions:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds the baseline's n_positions={self.n_positions}"
            )
        out = self.hf_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits.float()

    def hidden_states(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The residual stream: embeddings, then the output of each block (the last one after ``ln_f``)."""
        out = self.hf_model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
        return tuple(out.hidden_states)

    # ---- persistence -------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """``config.json`` + ``model.safetensors`` via transformers (GPT-2 format, loadable by transformers)."""
        folder = Path(path)
        with _quiet_transformers():
            self.hf_model.save_pretrained(folder)
        (folder / "generation_config.json").unlink(missing_ok=True)  # irrelevant for a task model

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TransformerBaseline:
        from transformers import GPT2LMHeadModel

        with _quiet_transformers():
            return cls(GPT2LMHeadModel.from_pretrained(str(path))).eval()

    @staticmethod
    def is_checkpoint(path: str | Path) -> bool:
        config = Path(path) / "config.json"
        return config.exists() and json.loads(config.read_text()).get("model_type") == "gpt2"

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fingerprint(self) -> str:
        """SHA-256 of the config and every parameter, like ``HookedMamba.fingerprint``."""
        c = self.hf_model.config  # the architecture fields only: loading adds bookkeeping keys to the config
        cfg = {k: getattr(c, k, None) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head",
                                                 "n_inner", "activation_function", "layer_norm_epsilon")}
        digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]
