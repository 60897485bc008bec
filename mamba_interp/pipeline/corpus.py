"""Natural text for a language model (``--corpus FILE``): documents streamed from a file, tokenised, and cut into
context windows of ``--seq-len`` tokens, up to a token budget (``--tokens``).

The file holds one document per line (plain text), or one JSON object per line with a ``text`` field (``.jsonl``;
other fields are ignored). Documents are read one at a time and tokenised as they come, each followed by the
tokenizer's end-of-text token when it has one; the token stream is cut into consecutive windows of ``seq_len``
tokens (documents packed across windows, as LM pre-training and SAELens's activation store do), and reading stops
once the budget's windows are full, so a corpus larger than memory is never loaded whole. The windows form a
``TaskBatch`` scored on next-token prediction at every position but the last, with ``metadata["document"]`` the
document of each token; steps 2–4 analyse it instead of the synthetic prompt sets.

This reads local files only; the ``datasets`` library is not needed for it (a hub dataset can be exported to
``.jsonl`` with ``Dataset.to_json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mamba_interp.tasks.base import IGNORE, TaskBatch


def iter_documents(path: str | Path) -> Iterator[str]:
    """The documents of a corpus file, in order (empty lines skipped)."""
    path = Path(path).expanduser()
    jsonl = path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not jsonl:
                yield line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number} is not valid JSON; a .jsonl corpus holds one JSON object per "
                                 "line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number} has no 'text' string field; each line must be like "
                                 '{"text": "..."}')
            if record["text"].strip():
                yield record["text"]


@dataclass
class CorpusWindows:
    """Context windows of a corpus: tokens [n, l] and the document of each token [n, l]."""

    tokens: torch.Tensor
    document: torch.Tensor
    documents_read: int
    tokens_read: int


def corpus_windows(path: str | Path, tokenizer: Any, seq_len: int, windows: int) -> CorpusWindows:
    """The first ``windows`` windows of ``seq_len`` tokens of the corpus (fewer if it is shorter)."""
    if windows < 1 or seq_len < 2:
        raise ValueError(f"need at least one window of at least 2 tokens (windows={windows}, seq_len={seq_len})")
    eos = getattr(tokenizer, "eos_token_id", None)
    need = windows * seq_len
    ids: list[int] = []
    docs: list[int] = []
    n_docs = 0
    for n_docs, text in enumerate(iter_documents(path), 1):
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            piece.append(int(eos))
        ids += piece
        docs += [n_docs - 1] * len(piece)
        if len(ids) >= need:
            break
    full = len(ids) // seq_len
    if full == 0:
        raise ValueError(f"the corpus {str(path)!r} holds {len(ids)} tokens, fewer than one window of {seq_len}; "
                         "use a longer corpus or a smaller --seq-len")
    n = min(full, windows)
    tokens = torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)
    document = torch.tensor(docs[:n * seq_len], dtype=torch.long).view(n, seq_len)
    return CorpusWindows(tokens, document, n_docs, n * seq_len)


def corpus_batch(path: str | Path, tokenizer: Any, seq_len: int, windows: int) -> tuple[TaskBatch, str]:
    """The corpus windows as a ``TaskBatch`` (next-token targets) and a one-line description of what was read."""
    w = corpus_windows(path, tokenizer, seq_len, windows)
    targets = torch.full_like(w.tokens, IGNORE)
    targets[:, :-1] = w.tokens[:, 1:]
    batch = TaskBatch(w.tokens, targets, {"document": w.document}, eval_mask=targets != IGNORE, task="corpus")
    note = (f"corpus {Path(path).name}: {w.tokens.shape[0]} windows of {seq_len} tokens ({w.tokens_read} tokens "
            f"from {w.documents_read} documents)")
    return batch, note
