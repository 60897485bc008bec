"""Token ids of every integer dtype, and ids in the padding rows of a padded vocabulary."""

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32]


@pytest.fixture(scope="module")
def padded():
    """45 real tokens, embedding padded to 48 rows (as state-spaces pads 50277 to 50280)."""
    torch.manual_seed(0)
    return HookedMamba(MambaConfig(d_model=16, n_layer=1, vocab_size=45, pad_vocab_size_multiple=16)).eval()


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_every_integer_dtype_gives_the_int64_logits(padded, dtype):
    ids = torch.randint(0, 45, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = padded(ids)
    assert torch.equal(padded(ids.to(dtype)), ref)
    assert torch.equal(padded.run_with_cache(ids.to(dtype), names_filter="hook_embed")[0], ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64], ids=str)
def test_non_integer_ids_are_rejected_in_one_line(padded, dtype):
    with pytest.raises(TypeError, match=r"^input_ids must hold integer token ids, got dtype .*; use \.long\(\)$"):
        padded(torch.ones(1, 3, dtype=dtype))


def test_ids_in_the_padding_rows_are_accepted(padded):
    """transformers and mamba_ssm index the padded embedding; so does HookedMamba."""
    logits = padded(torch.tensor([[1, 45, 46, 47]]))
    assert logits.shape == (1, 4, 48) and torch.isfinite(logits).all()


@pytest.mark.parametrize("bad", [48, -1])
def test_ids_beyond_the_embedding_name_the_padding_range(padded, bad):
    with pytest.raises(ValueError, match=r"outside the vocabulary.*0\.\.47; 45\.\.47 are padding rows") as err:
        padded(torch.tensor([[1, bad]]))
    assert "\n" not in str(err.value) and f"token id {bad}" in str(err.value)
