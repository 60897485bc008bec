"""Tokenizer conveniences: text <-> token ids, and token ids rendered readably for reports.

TransformerLens' ``to_tokens`` / ``to_str_tokens`` / ``to_string`` on a Hugging Face tokenizer (``HookedMamba``
exposes them as methods). Mamba's released checkpoints use the GPT-NeoX byte-level BPE, trained on documents
without a BOS token, so ``prepend_bos`` defaults to False (``True`` prepends the BOS id, or EOS when the tokenizer
has no BOS: GPT-NeoX's ``<|endoftext|>`` is both).

For reports, :func:`render_token` turns a BPE piece into what it stands for (``"ĠDisclaim"`` -> ``" Disclaim"``),
with control characters escaped (``"\\n"``) and partial UTF-8 bytes shown as ``\\xNN``; :func:`token_label`
names a variable by its text (``answer=" Mary"``) and falls back to the id without a tokenizer.
Nothing is downloaded: :func:`load_folder_tokenizer` reads local files only.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def load_folder_tokenizer(folder: Path) -> tuple[Any | None, str | None]:
    """``(tokenizer, None)`` from the folder's tokenizer files (offline), or ``(None, why there is none)``."""
    # transformers builds an empty tokenizer from config.json alone; only real tokenizer files count
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None, f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)"
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # any loader failure means "no tokenizer here"
        return None, f"no tokenizer could be loaded offline from {folder} ({type(exc).__name__})"
    if len(tok) < 3:
        return None, f"the tokenizer in {folder} is empty"
    return tok, None


def check_tokenizer(tokenizer: Any) -> Any:
    if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
        raise TypeError(f"a tokenizer needs encode() and decode() methods; got {type(tokenizer).__name__}")
    return tokenizer


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without the tokenizer's own special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """``ids`` -> text, exactly (no clean-up of spaces before punctuation)."""
    try:
        return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
    except TypeError:  # a tokenizer without that keyword
        return tokenizer.decode(list(ids))


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: pad, else EOS, else BOS, else 0 (padding is masked, so its value is moot)."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def bos_id(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("prepend_bos=True but the tokenizer has neither a BOS nor an EOS token; use prepend_bos=False")


def to_tokens(
    tokenizer: Any,
    text: str | Sequence[str],
    prepend_bos: bool = False,
    padding_side: str = "left",
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Text -> token ids [b, l] (b = 1 for one string).

    Prompts of different lengths are padded on ``padding_side`` ("left" keeps every prompt's last token at
    position l−1) and need ``return_mask=True``: the model only ignores padding given the mask
    (``model(tokens, attention_mask=mask)``), so unequal lengths without it raise instead of padding silently.
    """
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("to_tokens needs a string or a non-empty list of strings")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} must be 'left' or 'right'")
    rows = [([bos_id(tokenizer)] if prepend_bos else []) + encode(tokenizer, t) for t in texts]
    if any(not r for r in rows):
        raise ValueError("an empty string has no tokens; pass non-empty text (or prepend_bos=True)")
    width = max(len(r) for r in rows)
    if not return_mask and any(len(r) != width for r in rows):
        raise ValueError(
            f"the texts have different lengths ({min(len(r) for r in rows)}..{width} tokens); pass "
            "return_mask=True and give the mask to the model as attention_mask"
        )
    tokens = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        tokens[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return (tokens, mask) if return_mask else tokens


def _id_rows(tokens: Any) -> tuple[list[list[int]], bool]:
    """Token ids (tensor [l] / [b, l], list, list of lists) -> (rows, whether the input was one sequence)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.dim() not in (0, 1, 2):
            raise TypeError(f"expected integer token ids of shape [l] or [b, l], got {tokens.dtype} "
                            f"{tuple(tokens.shape)}")
        values = tokens.long().tolist()
        values = [values] if tokens.dim() == 0 else values
        return ([values], True) if tokens.dim() < 2 else (values, False)
    values = list(tokens)
    if values and all(isinstance(v, (list, tuple)) for v in values):
        return [list(v) for v in values], False
    return [values], True


def to_str_tokens(tokenizer: Any, tokens: Any, prepend_bos: bool = False) -> list[str] | list[list[str]]:
    """Each token decoded on its own (``" Mary"``); text is tokenised first. Joined back, the pieces of
    byte-level BPE text equal the text. A batch [b, l] gives one list per row."""
    if isinstance(tokens, str):
        tokens = to_tokens(tokenizer, tokens, prepend_bos=prepend_bos)[0]
    rows, single = _id_rows(tokens)
    out = [[decode(tokenizer, [int(t)]) for t in row] for row in rows]
    return out[0] if single else out


def to_string(tokenizer: Any, tokens: Any) -> str | list[str]:
    """Token ids [l] -> text; [b, l] -> one text per row."""
    rows, single = _id_rows(tokens)
    out = [decode(tokenizer, row) for row in rows]
    return out[0] if single else out


def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {ch: b for b, ch in bytes_to_unicode().items()}


def _escape(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") or ch == "\ufffd":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def render_token(tokenizer: Any | None, token_id: int) -> str:
    """One token as readable text for reports: the decoded string, control characters escaped, partial UTF-8
    bytes of a byte-level piece as ``\\xNN``; the id itself (``"588"``) without a tokenizer."""
    token_id = int(token_id)
    if tokenizer is None:
        return str(token_id)
    text = decode(tokenizer, [token_id])
    if "\ufffd" in text and hasattr(tokenizer, "convert_ids_to_tokens"):  # an incomplete UTF-8 sequence
        piece = tokenizer.convert_ids_to_tokens(token_id)
        table = _byte_decoder()
        if isinstance(piece, str) and piece and all(ch in table for ch in piece):
            return _escape(bytes(table[ch] for ch in piece).decode("utf-8", errors="backslashreplace"))
    if not text and hasattr(tokenizer, "convert_ids_to_tokens"):
        text = str(tokenizer.convert_ids_to_tokens(token_id) or "")
    return _escape(text) if text else f"<{token_id}>"


def token_label(tokenizer: Any | None, token_id: int) -> str:
    """A token as a value in a report: ``" Mary"`` (quoted text) with a tokenizer, else ``588``."""
    if tokenizer is None:
        return str(int(token_id))
    return '"' + render_token(tokenizer, token_id).replace('"', '\\"') + '"'
