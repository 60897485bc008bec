"""Logits equal transformers' MambaForCausalLM / Mamba2ForCausalLM / FalconMambaForCausalLM."""

import pytest
import torch

from tests.models.helpers import hf_and_ours, rel_err

TOL = 1e-5  # max relative error, float32
SEEDS = range(6)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("arch", ["mamba", "mamba2", "falcon_mamba"])
def test_logits_match_transformers(arch, seed):
    hf, ours = hf_and_ours(arch, seed)
    length = [1, 7, 33, 64, 100, 97][seed]
    x = torch.randint(0, hf.config.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(x).logits
        out = ours(x)
        cached, cache = ours.run_with_cache(x)  # every hook attached: the materialised state path
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= TOL
    assert rel_err(cached, ref) <= TOL
    assert len(cache) == len(ours.hook_dict)


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "falcon_mamba"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_mask_matches_transformers(arch, side):
    hf, ours = hf_and_ours(arch, seed=11)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, hf.config.vocab_size, (3, 40), generator=g)
    mask = torch.ones(3, 40, dtype=torch.long)
    for row, pad in enumerate((0, 5, 17)):
        if pad:
            if side == "left":
                mask[row, :pad] = 0
            else:
                mask[row, -pad:] = 0
    with torch.no_grad():
        ref = hf(x, attention_mask=mask).logits
        out = ours(x, attention_mask=mask)
        hooked = ours.run_with_hooks(x, attention_mask=mask, fwd_hooks=[("blocks.*.mixer.hook_ssm_state", lambda t, h: None)])
    keep = mask.bool()
    assert rel_err(out[keep], ref[keep]) <= TOL
    assert rel_err(hooked[keep], ref[keep]) <= TOL


def test_left_padding_equals_unpadded_sequence():
    """Left padding must not change the real tokens' logits (state starts at 0 and padding writes nothing).

    Holds without an in_proj bias; with one, the conv reads the bias at padded positions (as in transformers)."""
    _, ours = hf_and_ours("mamba", seed=2, use_bias=False)
    x = torch.randint(0, ours.cfg.vocab_size, (1, 20))
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 20)], dim=1).long()
    with torch.no_grad():
        assert rel_err(ours(padded, attention_mask=mask)[:, 6:], ours(x)) <= TOL


def test_logits_have_padded_vocab_width():
    from mamba_interp import HookedMamba, MambaConfig

    model = HookedMamba(MambaConfig(vocab_size=50, pad_vocab_size_multiple=16, d_model=16, n_layer=1))
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)
