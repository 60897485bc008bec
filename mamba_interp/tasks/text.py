"""Prompt sets for real language models, built through the model's tokenizer.

* ``text_induction``: random tokens repeated twice (Olsson et al. 2022's repeated-sequence test); in the second
  copy each next token is predictable only by induction.
* ``ioi``: indirect-object identification templates (Wang et al. 2022, arXiv 2211.00593), in the ABBA / BABA
  forms used for Mamba by Ensign & Garriga-Alonso (arXiv 2407.14008).
* ``factual_recall``: subject–relation prompts whose answer is a fact (Meng et al. 2022; for Mamba, Sharma et
  al. 2024, arXiv 2404.03646), with the subject's token span as ground truth.

Prompts are built segment by segment (literal text, slot values), so every slot's token positions are exact;
prompts of different lengths in a batch are **left**-padded (``attention_mask`` 0 on padding), so the
prediction position is always the last one (``answer_pos`` = L−1). Names must be single tokens (with their
leading space) in the tokenizer; the others are dropped, and an error names the problem if too few remain.

Nothing is downloaded: :func:`load_tokenizer` reads a local folder or the local Hugging Face cache only and
raises :class:`TokenizerUnavailableError` with the remedy when that fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamba_interp.models.tokens import encode as _encode
from mamba_interp.models.tokens import pad_id as _pad_id
from mamba_interp.tasks.base import IGNORE, Task, TaskBatch, check_positive_int, register_task, to_long


class TokenizerUnavailableError(RuntimeError):
    """No tokenizer could be loaded offline for a text prompt set."""


def load_tokenizer(name_or_path: Any) -> Any:
    """A tokenizer object (returned as is), a local folder, or a hub id already in the local cache."""
    if not isinstance(name_or_path, (str, Path)):
        if not callable(getattr(name_or_path, "encode", None)):
            raise TypeError(f"expected a tokenizer or a folder / hub id, got {type(name_or_path).__name__}")
        return name_or_path
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, ... depending on what is missing
        raise TokenizerUnavailableError(
            f"no tokenizer could be loaded offline for {str(name_or_path)!r} ({type(exc).__name__}); pass a local "
            "folder holding tokenizer.json (e.g. written by tokenizer.save_pretrained) or a tokenizer object"
        ) from exc


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)




_SLOT = re.compile(r"\{(\w*)\}")


def encode_template(tokenizer: Any, template: str, values: dict[str, str]) -> tuple[list[int], list[tuple]]:
    """Encode ``template`` with ``{slot}`` values, segment by segment.

    Returns the ids and ``[(slot, start, end), ...]`` token spans in order of appearance. A space before a
    slot travels with the slot's value (" Mary"), as BPE tokenizers attach it to the following word.
    """
    ids: list[int] = []
    spans: list[tuple] = []
    pos = 0
    for match in _SLOT.finditer(template):
        literal = template[pos : match.start()]
        lead = " " if literal.endswith(" ") else ""
        literal = literal[:-1] if lead else literal
        if literal:
            ids += _encode(tokenizer, literal)
        start = len(ids)
        ids += _encode(tokenizer, lead + values[match.group(1)])
        spans.append((match.group(1), start, len(ids)))
        pos = match.end()
    if template[pos:]:
        ids += _encode(tokenizer, template[pos:])
    return ids, spans


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """rows -> tokens [b, l], attention_mask [b, l], per-row offsets added to every position."""
    width = max(len(r) for r in rows)
    tokens = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    offsets = np.array([width - len(r) for r in rows])
    for i, row in enumerate(rows):
        tokens[i, offsets[i] :] = row
        mask[i, offsets[i] :] = 1
    return to_long(tokens), to_long(mask), offsets


# ---- base class --------------------------------------------------------------------------------------
class TextTask(Task):
    """A prompt set bound to a tokenizer. ``get_task(name, tokenizer=obj_or_folder, ...)``; the parameters
    record the tokenizer's name."""

    def __init__(self, params: Any, tokenizer: Any = None) -> None:
        super().__init__(params)
        self.tokenizer = load_tokenizer(params.tokenizer if tokenizer is None else tokenizer)

    @classmethod
    def from_params(cls, **kwargs: Any) -> Task:
        if "tokenizer" not in kwargs:
            raise ValueError(f"task {cls.name!r} needs tokenizer= (a tokenizer object or a local folder)")
        tok = load_tokenizer(kwargs.pop("tokenizer"))
        kwargs.pop("vocab_size", None)
        kwargs.pop("seq_len", None)
        fields = set(cls.Params.__dataclass_fields__)
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise ValueError(f"task {cls.name!r} has no parameter(s) {unknown}; its parameters are {sorted(fields)}")
        return cls(cls.Params(tokenizer=tokenizer_name(tok), **kwargs), tokenizer=tok)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if self.p.prepend_bos and bos is None:
            raise ValueError(f"prepend_bos=True but tokenizer {self.p.tokenizer!r} has no BOS token")
        return [int(bos)] if self.p.prepend_bos else []

    def single_token_words(self, words: list[str], what: str, need: int) -> list[tuple[str, int]]:
        """``(word, id)`` for the words that encode to one token with a leading space."""
        out = []
        for word in words:
            ids = _encode(self.tokenizer, " " + word)
            if len(ids) == 1:
                out.append((word, ids[0]))
        if len(out) < need:
            raise ValueError(
                f"task {self.name!r}: only {len(out)} of {len(words)} {what} are single tokens in tokenizer "
                f"{self.p.tokenizer!r}; need {need}"
            )
        return out


# ---- induction on repeated random tokens -----------------------------------------------------------
@dataclass(frozen=True)
class TextInductionParams:
    tokenizer: str = ""
    half_len: int = 20
    """Length of the random block; the sequence is the block twice (plus BOS if ``prepend_bos``)."""
    prepend_bos: bool = False

    def __post_init__(self) -> None:
        check_positive_int("TextInductionParams", half_len=self.half_len)
        if self.half_len < 2:
            raise ValueError(f"TextInductionParams.half_len={self.half_len} must be >= 2")


def repeated_block_batch(block: np.ndarray, prefix: list[int], task: str = "") -> TaskBatch:
    """``prefix + block + block`` (Olsson et al. 2022's repeated random tokens): in the second copy each next token
    is predictable only by copying from the first. block [b, half] -> tokens [b, len(prefix) + 2·half]; targets and
    metadata (``answer``, ``answer_pos``, ``source_pos``, ``period``, ``first_start``) on the second copy."""
    n, half = block.shape
    off = len(prefix)
    tokens = np.concatenate([np.full((n, off), prefix[0] if prefix else 0, dtype=np.int64), block, block], 1)
    answer_pos = off + half + np.arange(half - 1)  # (half-1,)
    targets = np.full_like(tokens, IGNORE)
    targets[:, answer_pos] = tokens[:, answer_pos + 1]
    metadata = {
        "answer": to_long(tokens[:, answer_pos + 1]),
        "answer_pos": to_long(np.broadcast_to(answer_pos, (n, half - 1))),
        "source_pos": to_long(np.broadcast_to(answer_pos + 1 - half, (n, half - 1))),
        "period": half,
        "first_start": off,
    }
    return TaskBatch(to_long(tokens), to_long(targets), metadata, task=task)


@register_task
class TextInductionTask(TextTask):
    """Random non-special tokens ``r`` then ``r`` again. Targets: in the second copy, the next token, at
    positions ``offset + half_len + i`` for i = 0..half_len−2 (offset = 1 with BOS, else 0). Metadata:

    * ``answer``, ``answer_pos`` [b, half_len−1]; ``source_pos`` [b, half_len−1]: the first-copy position
      holding the same token as the answer (the induction "attend-to" position is ``source_pos``, the
      token after the earlier occurrence of the current one);
    * ``period``: int half_len; ``first_start``: int offset.
    """

    name = "text_induction"
    Params = TextInductionParams

    @property
    def seq_len(self) -> int:
        return 2 * self.p.half_len + len(self._bos())

    def _generate(self, n, rng, seq_len, split):
        if seq_len != self.seq_len:
            raise ValueError(f"text_induction sets its length with half_len; seq_len must be {self.seq_len}")
        half, bos = self.p.half_len, self._bos()
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        allowed = np.array([i for i in range(self.vocab_size) if i not in special])
        block = allowed[rng.integers(0, len(allowed), size=(n, half))]  # (b, half)
        return repeated_block_batch(block, bos)

    def corrupt(self, batch: TaskBatch, seed: int) -> TaskBatch:
        """The first copy replaced by fresh random tokens: the second copy is no longer predictable."""
        fresh = self.sample(len(batch), seed, split="test")
        tokens = batch.tokens.clone()
        off, half = len(self._bos()), self.p.half_len
        tokens[:, off : off + half] = fresh.tokens[:, off : off + half]
        return TaskBatch(tokens, batch.targets.clone(), dict(batch.metadata), task=self.name)


# ---- indirect object identification ---------------------------------------------------------------
IOI_TEMPLATES = (
    "When {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "Then, {A} and {B} went to the {PLACE}. {C} gave a {OBJECT} to",
    "After {A} and {B} went to the {PLACE}, {C} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE}, {C} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {C} decided to give it to",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {C} gave it to",
    "Then, {A} and {B} had a long argument. Afterwards {C} said to",
    "After the lunch, {A} and {B} went to the {PLACE}. {C} gave a {OBJECT} to",
)
IOI_NAMES = (
    "Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Lisa", "Paul", "Anna", "Kate", "Mike",
    "Sarah", "David", "Laura", "Mark", "Emma", "Jack", "Alice", "Bob", "Rose", "Peter", "Jane",
)
IOI_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
IOI_OBJECTS = ("drink", "book", "ring", "bone", "computer", "basketball", "necklace", "snack")


@dataclass(frozen=True)
class IOIParams:
    tokenizer: str = ""
    prepend_bos: bool = False


@register_task
class IOITask(TextTask):
    """IOI prompts, half ABBA (``A`` = IO, ``B`` = ``C`` = S) and half BABA (``A`` = ``C`` = S, ``B`` = IO).
    The target at the last position is the indirect object (IO). Metadata ([b] long unless noted):

    * ``answer`` = ``io_token``; ``wrong`` = ``s_token`` (for the logit difference IO − S);
    * ``io_pos``, ``s1_pos``, ``s2_pos``, ``answer_pos`` (= ``end_pos`` = L−1);
    * ``template_id``; ``order`` (list of "ABBA"/"BABA"); ``text`` (list of prompt strings).
    """

    name = "ioi"
    Params = IOIParams

    @property
    def seq_len(self) -> int | None:  # type: ignore[override]
        return None  # prompts vary; batches are left-padded to their longest prompt

    def sample(self, n, seed, seq_len=None, split="train"):
        if seq_len is not None:
            raise ValueError("ioi prompts have their template's length; leave seq_len=None")
        return super().sample(n, seed, None, split)

    def _generate(self, n, rng, seq_len, split):
        names = self.single_token_words(list(IOI_NAMES), "names", need=3)
        rows, meta = [], {k: [] for k in ("io", "s", "io_pos", "s1_pos", "s2_pos", "template_id", "order", "text")}
        bos = self._bos()
        for i in range(n):
            t = int(rng.integers(len(IOI_TEMPLATES)))
            io, s = (names[j] for j in rng.choice(len(names), size=2, replace=False))
            order = "ABBA" if i % 2 == 0 else "BABA"
            a, b = (io, s) if order == "ABBA" else (s, io)
            values = {"A": a[0], "B": b[0], "C": s[0], "PLACE": IOI_PLACES[rng.integers(len(IOI_PLACES))],
                      "OBJECT": IOI_OBJECTS[rng.integers(len(IOI_OBJECTS))]}
            ids, spans = encode_template(self.tokenizer, IOI_TEMPLATES[t], values)
            pos = {slot: start + len(bos) for slot, start, _ in spans}
            rows.append(bos + ids)
            meta["io"].append(io[1])
            meta["s"].append(s[1])
            meta["io_pos"].append(pos["A"] if order == "ABBA" else pos["B"])
            meta["s1_pos"].append(pos["B"] if order == "ABBA" else pos["A"])
            meta["s2_pos"].append(pos["C"])
            meta["template_id"].append(t)
            meta["order"].append(order)
            meta["text"].append(IOI_TEMPLATES[t].format(**values))
        tokens, mask, off = _left_pad(rows, _pad_id(self.tokenizer))
        width = tokens.shape[1]
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = torch.tensor(meta["io"])
        metadata = {
            "answer": torch.tensor(meta["io"]),
            "io_token": torch.tensor(meta["io"]),
            "wrong": torch.tensor(meta["s"]),
            "s_token": torch.tensor(meta["s"]),
            "io_pos": to_long(np.array(meta["io_pos"]) + off),
            "s1_pos": to_long(np.array(meta["s1_pos"]) + off),
            "s2_pos": to_long(np.array(meta["s2_pos"]) + off),
            "end_pos": torch.full((n,), width - 1),
            "answer_pos": torch.full((n,), width - 1),
            "template_id": torch.tensor(meta["template_id"]),
            "order": meta["order"],
            "text": meta["text"],
        }
        return TaskBatch(tokens, targets, metadata, attention_mask=mask)

    def corrupt(self, batch: TaskBatch, seed: int) -> TaskBatch:
        """"ABC" partner: S2 replaced by a third name, so no name repeats (positions are unchanged)."""
        names = [tid for _, tid in self.single_token_words(list(IOI_NAMES), "names", need=3)]
        rng = np.random.default_rng([int(seed), 5])
        tokens = batch.tokens.clone()
        for i in range(len(batch)):
            taken = {int(batch.metadata["io_token"][i]), int(batch.metadata["s_token"][i])}
            choices = [t for t in names if t not in taken]
            tokens[i, batch.metadata["s2_pos"][i]] = choices[rng.integers(len(choices))]
        return TaskBatch(tokens, batch.targets.clone(), dict(batch.metadata), attention_mask=batch.attention_mask,
                         task=self.name)

    def logit_diff(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """[b] logit(IO) − logit(S) at the last position."""
        last = logits[:, -1].float()  # (b, v)
        rows = torch.arange(len(batch), device=logits.device)
        io, s = batch.metadata["io_token"].to(logits.device), batch.metadata["s_token"].to(logits.device)
        return (last[rows, io] - last[rows, s]).cpu()


# ---- factual recall -------------------------------------------------------------------------------
FACTS = (  # (relation, template with {SUBJECT}, subject, answer)
    ("located_in_city", "The {SUBJECT} is located in the city of", "Eiffel Tower", "Paris"),
    ("located_in_city", "The {SUBJECT} is located in the city of", "Colosseum", "Rome"),
    ("located_in_city", "The {SUBJECT} is located in the city of", "Brandenburg Gate", "Berlin"),
    ("located_in_city", "The {SUBJECT} is located in the city of", "Statue of Liberty", "New"),
    ("located_in_city", "The {SUBJECT} is located in the city of", "Big Ben", "London"),
    ("capital_of", "The capital of {SUBJECT} is", "France", "Paris"),
    ("capital_of", "The capital of {SUBJECT} is", "Italy", "Rome"),
    ("capital_of", "The capital of {SUBJECT} is", "Germany", "Berlin"),
    ("capital_of", "The capital of {SUBJECT} is", "Japan", "Tokyo"),
    ("capital_of", "The capital of {SUBJECT} is", "Spain", "Madrid"),
    ("capital_of", "The capital of {SUBJECT} is", "Egypt", "Cairo"),
    ("language_of", "The official language of {SUBJECT} is", "France", "French"),
    ("language_of", "The official language of {SUBJECT} is", "Germany", "German"),
    ("language_of", "The official language of {SUBJECT} is", "Spain", "Spanish"),
    ("language_of", "The official language of {SUBJECT} is", "Japan", "Japanese"),
    ("plays_sport", "{SUBJECT} plays the sport of", "Michael Jordan", "basketball"),
    ("plays_sport", "{SUBJECT} plays the sport of", "Lionel Messi", "soccer"),
    ("plays_sport", "{SUBJECT} plays the sport of", "Tiger Woods", "golf"),
    ("plays_sport", "{SUBJECT} plays the sport of", "Roger Federer", "tennis"),
    ("founded_by", "{SUBJECT} was founded by", "Microsoft", "Bill"),
    ("founded_by", "{SUBJECT} was founded by", "Apple", "Steve"),
    ("headquarters", "{SUBJECT} is headquartered in the country of", "Toyota", "Japan"),
    ("headquarters", "{SUBJECT} is headquartered in the country of", "Volkswagen", "Germany"),
    ("headquarters", "{SUBJECT} is headquartered in the country of", "Ferrari", "Italy"),
    ("continent", "{SUBJECT} is located on the continent of", "Kenya", "Africa"),
    ("continent", "{SUBJECT} is located on the continent of", "Brazil", "South"),
    ("continent", "{SUBJECT} is located on the continent of", "India", "Asia"),
    ("continent", "{SUBJECT} is located on the continent of", "Norway", "Europe"),
)


@dataclass(frozen=True)
class FactualRecallParams:
    tokenizer: str = ""
    prepend_bos: bool = False


@register_task
class FactualRecallTask(TextTask):
    """Factual prompts; the target at the last position is the first token of " " + answer. Metadata:

    * ``answer`` [b] (first answer token), ``answer_pos`` [b] = L−1;
    * ``subject_first_pos``, ``subject_last_pos`` [b] (the last subject token is where Meng et al. and
      Sharma et al. localise recall); ``fact_id`` [b] (index into ``FACTS``);
    * ``relation``, ``subject``, ``answer_text``, ``text``: lists of strings.
    """

    name = "factual_recall"
    Params = FactualRecallParams

    @property
    def seq_len(self) -> int | None:  # type: ignore[override]
        return None

    def sample(self, n, seed, seq_len=None, split="train"):
        if seq_len is not None:
            raise ValueError("factual_recall prompts have their template's length; leave seq_len=None")
        return super().sample(n, seed, None, split)

    def _generate(self, n, rng, seq_len, split):
        # without replacement while the facts last, so small sets cover distinct facts
        order = np.concatenate([rng.permutation(len(FACTS)) for _ in range(-(-n // len(FACTS)))])[:n]
        bos = self._bos()
        rows, first, last, answers = [], [], [], []
        for f in order:
            _, template, subject, answer = FACTS[f]
            ids, spans = encode_template(self.tokenizer, template, {"SUBJECT": subject})
            _, start, end = spans[0]
            rows.append(bos + ids)
            first.append(start + len(bos))
            last.append(end - 1 + len(bos))
            answers.append(_encode(self.tokenizer, " " + answer)[0])
        tokens, mask, off = _left_pad(rows, _pad_id(self.tokenizer))
        width = tokens.shape[1]
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = torch.tensor(answers)
        metadata = {
            "answer": torch.tensor(answers),
            "answer_pos": torch.full((n,), width - 1),
            "subject_first_pos": to_long(np.array(first) + off),
            "subject_last_pos": to_long(np.array(last) + off),
            "fact_id": to_long(order),
            "relation": [FACTS[f][0] for f in order],
            "subject": [FACTS[f][2] for f in order],
            "answer_text": [FACTS[f][3] for f in order],
            "text": [FACTS[f][1].format(SUBJECT=FACTS[f][2]) for f in order],
        }
        return TaskBatch(tokens, targets, metadata, attention_mask=mask)


    def corrupt(self, batch: TaskBatch, seed: int) -> TaskBatch:
        """Symmetric token replacement (Zhang & Nanda 2023, arXiv 2309.16042): each subject is replaced by another
        subject with as many tokens, of the same relation when one exists (else of any relation; else tokens of the
        other subjects), so every position keeps its role. The corrupted batch's ``answer`` is the replacement
        fact's answer token for a same-relation swap (the clean answer's rival in a logit difference), else −1."""
        rng = np.random.default_rng([int(seed), 7])
        spans = []
        for _, template, subject, answer in FACTS:
            ids, slots = encode_template(self.tokenizer, template, {"SUBJECT": subject})
            _, start, end = slots[0]
            spans.append((ids[start:end], _encode(self.tokenizer, " " + answer)[0]))
        tokens = batch.tokens.clone()
        new_answer = torch.full((len(batch),), -1, dtype=torch.long)
        for i in range(len(batch)):
            f = int(batch.metadata["fact_id"][i])
            relation, sub_ids = FACTS[f][0], spans[f][0]
            same_len = [g for g in range(len(FACTS)) if len(spans[g][0]) == len(sub_ids) and spans[g][0] != sub_ids]
            same_rel = [g for g in same_len if FACTS[g][0] == relation and spans[g][1] != spans[f][1]]
            pool = same_rel or same_len
            first = int(batch.metadata["subject_first_pos"][i])
            if pool:
                g = pool[int(rng.integers(len(pool)))]
                replacement = spans[g][0]
            else:
                others = [t for h, (ids, _) in enumerate(spans) if FACTS[h][2] != FACTS[f][2] for t in ids]
                replacement = [others[int(j)] for j in rng.integers(len(others), size=len(sub_ids))]
            tokens[i, first:first + len(sub_ids)] = torch.tensor(replacement)
            if same_rel:
                new_answer[i] = spans[g][1]
        return TaskBatch(tokens, batch.targets.clone(), {**batch.metadata, "answer": new_answer},
                         attention_mask=batch.attention_mask, task=self.name)


def builtin_words() -> list[str]:
    """Every word and punctuation mark the built-in IOI and factual templates use (to build a toy tokenizer)."""
    text = " ".join(
        [t.format(A="", B="", C="", PLACE="", OBJECT="") for t in IOI_TEMPLATES]
        + list(IOI_NAMES) + list(IOI_PLACES) + list(IOI_OBJECTS)
        + [f[1].format(SUBJECT=f[2]) + " " + f[3] for f in FACTS]
    )
    return sorted(set(re.findall(r"\w+|[^\w\s]", text)))
