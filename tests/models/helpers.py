"""Shared builders for the model-core tests: random transformers configs and weight perturbation."""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch
import transformers as tf

from mamba_interp import HookedMamba

CPU_KERNEL_EXPECTED = (shutil.which(os.environ.get("CC", "cc")) is not None
                       and os.environ.get("MAMBA_INTERP_CPU_KERNEL", "1") != "0")
"""Whether the compiled Mamba-1 CPU scan must build here: a C compiler is on PATH and the kernel is not switched
off. Tests of it skip only then, so a failed build with a compiler present fails them instead of hiding."""

needs_cpu_kernel = pytest.mark.skipif(not CPU_KERNEL_EXPECTED, reason="no C compiler on PATH ($CC or cc), or "
                                      "MAMBA_INTERP_CPU_KERNEL=0: the compiled Mamba-1 CPU scan is not built")
CPU_M1_SCAN = "compiled" if CPU_KERNEL_EXPECTED else "loop"
"""The scan ``auto`` must pick for Mamba-1 on this CPU."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error used for the ≤ 1e-5 parity bound."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Move every parameter away from its initial value (init values hide bugs: D = 1, norms = 1, biases = 0)."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
        p.add_(noise * scale * (p.float().std().clamp_min(0.05) if p.numel() > 1 else 0.1))


def random_hf_config(arch: str, seed: int):
    """A random small transformers Mamba / Mamba2 / FalconMamba config."""
    r = random.Random(seed)
    d = r.choice([16, 24, 32, 48])
    common = dict(
        vocab_size=r.choice([11, 37, 64]), hidden_size=d, num_hidden_layers=r.choice([1, 2, 3]),
        state_size=r.choice([4, 8, 16]), conv_kernel=r.choice([2, 3, 4]), expand=r.choice([1, 2]),
        use_bias=r.random() < 0.3, use_conv_bias=r.random() < 0.8, residual_in_fp32=r.random() < 0.7,
        tie_word_embeddings=r.random() < 0.5, layer_norm_epsilon=r.choice([1e-5, 1e-6]),
    )
    if arch == "mamba2":
        e = common["expand"] * d
        head_dim = r.choice([h for h in (4, 8, 16) if e % h == 0])
        heads = e // head_dim
        groups = r.choice([g for g in (1, 2, 4) if heads % g == 0])
        limit = r.choice([(0.0, float("inf")), (0.01, 0.5)])
        return tf.Mamba2Config(num_heads=heads, head_dim=head_dim, n_groups=groups,
                               chunk_size=r.choice([4, 8, 16, 256]), time_step_limit=limit, **common)
    rank = r.choice(["auto", 1, 3])
    if arch == "falcon_mamba":
        return tf.FalconMambaConfig(time_step_rank=rank, mixer_rms_eps=1e-6, **common)
    return tf.MambaConfig(time_step_rank=rank, **common)


HF_CLASSES = {"mamba": tf.MambaForCausalLM, "mamba2": tf.Mamba2ForCausalLM, "falcon_mamba": tf.FalconMambaForCausalLM}


def hf_and_ours(arch: str, seed: int, **overrides):
    """(transformers model, HookedMamba with the same perturbed weights), both in eval mode, float32."""
    torch.manual_seed(seed)
    hf_cfg = random_hf_config(arch, seed)
    for k, v in overrides.items():
        setattr(hf_cfg, k, v)
    hf = HF_CLASSES[arch](hf_cfg).eval()
    perturb(hf, seed)
    return hf, HookedMamba.from_transformers(hf)


def byte_bpe_tokenizer(corpus: list[str], vocab_size: int = 400):
    """A GPT-2-style byte-level BPE (the leading space belongs to the word) trained here, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
