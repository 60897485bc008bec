"""Fixtures for pipeline tests: tiny checkpoints saved to disk (no zoo needed) and a helper to run the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.pipeline.registry import unregister_step


def _save(folder: Path, cfg: MambaConfig, card: dict | None, seed: int) -> Path:
    torch.manual_seed(seed)
    HookedMamba(cfg).save_pretrained(folder)
    if card is not None:
        (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="session")
def task_model_dir(tmp_path_factory) -> Path:
    """A random-init Mamba-1 whose card names the induction task (vocab 16, length 24)."""
    cfg = MambaConfig(arch="mamba1", d_model=32, n_layer=2, vocab_size=16, d_state=8)
    card = {"task": "induction", "task_params": {"vocab_size": 16, "seq_len": 24}}
    return _save(tmp_path_factory.mktemp("m1task"), cfg, card, seed=1)


@pytest.fixture(scope="session")
def m2_model_dir(tmp_path_factory) -> Path:
    """A random-init Mamba-2 (4 heads) on the induction task."""
    cfg = MambaConfig(arch="mamba2", d_model=32, n_layer=2, vocab_size=16, d_state=8, headdim=16)
    card = {"task": "induction", "task_params": {"vocab_size": 16, "seq_len": 24}}
    return _save(tmp_path_factory.mktemp("m2task"), cfg, card, seed=2)


@pytest.fixture(scope="session")
def lm_model_dir(tmp_path_factory) -> Path:
    """A random-init Mamba-1 'language model' without a card or tokenizer."""
    cfg = MambaConfig(arch="mamba1", d_model=32, n_layer=3, vocab_size=50, d_state=8)
    return _save(tmp_path_factory.mktemp("m1lm"), cfg, None, seed=3)


@pytest.fixture(scope="session")
def tokenizer_model_dir(tmp_path_factory) -> Path:
    """A random-init Mamba-1 language model whose folder holds a word-level tokenizer (built locally)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mamba_interp.tasks.text import builtin_words

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2}
    for w in builtin_words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")
    cfg = MambaConfig(arch="mamba1", d_model=32, n_layer=2, vocab_size=len(vocab), d_state=8)
    folder = _save(tmp_path_factory.mktemp("m1tok"), cfg, None, seed=4)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture
def temp_steps():
    """Step numbers a test registers; unregistered afterwards."""
    numbers: list[int] = []
    yield numbers
    for n in numbers:
        unregister_step(n)
