"""Tokenizer on the model: attached by from_pretrained, to_tokens / to_str_tokens / to_string, readable tokens."""

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.models.tokens import render_token, token_label
from tests.models.helpers import byte_bpe_tokenizer

CORPUS = ["When Mary and John went to the store, John gave a drink to Mary.",
          "A Disclaimer: the cat sat on the mat.\n\tIndented line", "caf\u00e9 na\u00efve \u65e5\u672c"] * 30
TEXTS = ["When Mary went to the store", " the cat sat.\n\tMary", "Disclaimer: John"]


@pytest.fixture(scope="module")
def tok():
    return byte_bpe_tokenizer(CORPUS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=len(tok), pad_vocab_size_multiple=8)
    HookedMamba(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return HookedMamba.from_pretrained(folder)


def test_from_pretrained_attaches_the_folders_tokenizer(model, folder, tok, tmp_path):
    assert model.tokenizer is not None and model.tokenizer_error is None
    assert model.tokenizer.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    assert HookedMamba.from_pretrained(folder, tokenizer=None).tokenizer is None
    assert HookedMamba.from_pretrained(folder, tokenizer=tok).tokenizer is tok
    model.save_pretrained(tmp_path)  # weights and config only
    bare = HookedMamba.from_pretrained(tmp_path)
    assert bare.tokenizer is None and "holds no tokenizer files" in bare.tokenizer_error
    with pytest.raises(ValueError, match=r"no tokenizer \(.*holds no tokenizer files.*\); attach one"):
        bare.to_tokens("hi")


def test_to_tokens(model, tok):
    ids = model.to_tokens(TEXTS[0])
    assert ids.dtype == torch.long and ids.shape == (1, len(tok.encode(TEXTS[0])))
    bos = model.to_tokens(TEXTS[0], prepend_bos=True)
    assert bos[0, 0] == tok.bos_token_id and torch.equal(bos[:, 1:], ids)
    with pytest.raises(ValueError, match="different lengths.*return_mask=True"):
        model.to_tokens(TEXTS)
    for side in ("left", "right"):
        padded, mask = model.to_tokens(TEXTS, padding_side=side, return_mask=True)
        for row, text in enumerate(TEXTS):
            assert padded[row][mask[row].bool()].tolist() == tok.encode(text)
        assert bool(mask[:, -1 if side == "left" else 0].all())
    with pytest.raises(TypeError, match="string"):
        model.to_tokens([1, 2])


@pytest.mark.parametrize("text", TEXTS + ["caf\u00e9 \u65e5\u672c  two  spaces"])
def test_to_str_tokens_and_to_string_round_trip(model, text):
    pieces = model.to_str_tokens(text)
    assert len(pieces) == model.to_tokens(text).shape[1]
    if text.isascii():  # a character split across tokens decodes piece by piece to replacement characters
        assert "".join(pieces) == text
    assert model.to_string(model.to_tokens(text)[0]) == text
    assert model.to_str_tokens(model.to_tokens(text)) == [pieces]  # a batch gives one list per row


def test_render_token_is_readable(tok):
    ids = tok.encode(" Disclaimer")
    assert tok.convert_ids_to_tokens(ids) == ["ĠDisclaimer"] and render_token(tok, ids[0]) == " Disclaimer"
    assert token_label(tok, ids[0]) == '" Disclaimer"'
    newline = tok.convert_tokens_to_ids("Ċ")
    assert render_token(tok, newline) == "\\n"
    assert render_token(tok, tok.convert_tokens_to_ids("ĉ")) == "\\t"
    part = tok.convert_tokens_to_ids("æ")  # the first byte of a three-byte character
    assert tok.decode([part]) == "\ufffd" and render_token(tok, part) == "\\xe6"
    assert render_token(tok, tok.eos_token_id) == "<|endoftext|>"
    assert render_token(None, 588) == "588" and token_label(None, 588) == "588"


def test_embedding_accessors_and_unembed(model):
    cfg = model.cfg
    assert model.W_E.shape == (cfg.padded_vocab_size, cfg.d_model)
    assert model.W_U.shape == (cfg.d_model, cfg.padded_vocab_size)
    ids = model.to_tokens(TEXTS[1])
    logits, cache = model.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    resid = cache["resid_post", 0]
    assert torch.allclose(model.unembed(resid), logits, atol=1e-5)
    assert torch.allclose(model.unembed(resid, apply_norm=False), resid @ model.W_U, atol=1e-5)


def test_generate_from_text(model):
    out = model.generate(TEXTS[:2], 4)  # different lengths: left-padded with a mask
    assert out.shape == (2, model.to_tokens(TEXTS[:2], return_mask=True)[0].shape[1] + 4)
    assert isinstance(model.to_string(out[0]), str)
