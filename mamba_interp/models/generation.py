"""Generation through the inference state, with hooks applied at every generated token.

The prompt is processed once (one forward over [b, l]); each new token then costs one forward over [b, 1] that
continues the conv windows and SSM states (Gu & Dao 2023, §3.4: constant time per generated token), so the cost
is linear in the generated length and the prefix is never re-processed. Hooks passed as ``fwd_hooks`` stay
attached for the whole generation: they see the prompt's activations [b, l, ...] once, then [b, 1, ...] per
generated token, which is what re-running the full sequence with the same hook at every step would give for a
hook that treats every position alike (tested).

Greedy decoding takes the argmax; sampling draws from softmax(logits / temperature), optionally restricted to
the ``top_k`` largest logits, with a ``torch.Generator`` seeded by ``seed`` (same seed, same tokens). Only the
real vocabulary is sampled from: logits of the embedding's padding rows (``cfg.vocab_size`` and above) are
ignored, as mamba_ssm's ``decode`` does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mamba_interp.models.hooks import HookFn, NamesFilter


def _check_options(max_new_tokens: Any, greedy: bool, temperature: float, top_k: int | None, vocab: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 when sampling (or pass greedy=True)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k <= vocab):
        raise ValueError(f"top_k={top_k!r} must be an integer in 1..{vocab} (the vocabulary) or None")


def next_token(logits: torch.Tensor, greedy: bool, temperature: float, top_k: int | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """logits [b, v] -> token ids [b]: argmax, or a sample from softmax(logits / temperature) over the top k."""
    if greedy:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor | str | list[str],
    max_new_tokens: int,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    fwd_hooks: Iterable[tuple[NamesFilter, HookFn]] = (),
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Any]:
    """``input_ids`` [b, l] (or [l], or text when the model has a tokenizer) -> ids [b, l + t], t ≤
    ``max_new_tokens`` (fewer only when every row has produced ``eos_token_id``; finished rows repeat it).

    ``attention_mask`` marks left padding of the prompts (texts of different lengths get it automatically).
    ``return_state=True`` also returns the inference state after the last token *fed to the model* (every
    generated token except the last), so ``model(tokens[:, -1:], state=state)`` continues the generation.
    """
    if isinstance(input_ids, (str, list)):
        input_ids, attention_mask = model.to_tokens(input_ids, return_mask=True)
    vocab = model.cfg.vocab_size
    _check_options(max_new_tokens, greedy, temperature, top_k, vocab)
    ids, _ = model._check_inputs(input_ids, None)  # [l] -> [1, l], dtype and range checked
    generator = None
    if not greedy:
        generator = torch.Generator(device=ids.device).manual_seed(int(seed))
    out = [ids]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    with model.hooks(fwd_hooks=fwd_hooks):
        logits, state = model(ids, attention_mask=attention_mask, state=model.init_state(ids.shape[0]))
        for step in range(max_new_tokens):
            token = next_token(logits[:, -1, :vocab], greedy, temperature, top_k, generator)  # (b,)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            out.append(token[:, None])
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits, state = model(token[:, None], state=state)  # one token through the state
    tokens = torch.cat(out, dim=1)
    return (tokens, state) if return_state else tokens
