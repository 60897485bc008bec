"""Ground-truth variables per token of a ``TaskBatch``, for correlating SAE latents (step 3) and probes.

Every variable is a float64 tensor [b, l] aligned with the batch's tokens, NaN where it is undefined (padding, or
positions where the quantity does not exist, e.g. the answer outside the answer positions). Variables are
numeric/binary or categorical; categorical ones hold class ids and are expanded into one indicator per class by
:func:`expand_variables` (``mamba_interp.sparse_autoencoder.one_hot_variables``: ``"token=3"``), keeping the most
frequent classes only.

Generic variables (every batch):

* ``token`` (categorical): the current token; ``prev_token`` (categorical): the token before (Mamba's short
  convolution mixes it in; NaN at position 0); ``position`` (numeric);
* ``answer`` (categorical): the task's answer at its answer positions (``metadata["answer"]`` /
  ``metadata["answer_pos"]``, [b] or [b, k]), NaN elsewhere.

Task-specific variables (from the metadata each task documents in ``mamba_interp/tasks``):

* induction: ``after_trigger`` (binary: the position p+1 right after the first trigger, where X sits),
  ``stored_value`` (categorical: X at every position after p+1, i.e. what the model must remember; NaN before);
* mqar: ``is_key``, ``is_value`` (the key–value context), ``is_query`` (binary);
* selective_copy: ``is_data`` (binary);
* parity: ``running_parity`` (binary);
* text_induction / repeated_tokens: ``second_copy`` (binary: positions whose token repeats one ``period`` earlier);
* modular_addition: ``a`` and ``b`` (categorical, at every position from where they appear on);
* ioi: ``is_io`` / ``is_s`` (binary: the indirect object's name; the subject's two names), ``abba`` (binary, at the
  last position: 1 for ABBA prompts, where the IO comes first, 0 for BABA);
* factual_recall: ``is_subject`` (binary: the subject's tokens), ``subject_last`` (binary: its last token, where
  recall is localised), ``relation`` (categorical, at the last position: the relation's index in ``FACTS``).

:func:`variable_labels` gives the labels of one variable on the valid tokens, ready for a probe: categorical and
0/1 variables are classification targets (class ids), the others regression targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mamba_interp.sparse_autoencoder import one_hot_variables

NAN = float("nan")


@dataclass
class TaskVariables:
    """Variables of one batch: ``numeric`` (name -> [b, l]) and ``categorical`` (name -> [b, l] class ids)."""

    numeric: dict[str, Tensor] = field(default_factory=dict)
    categorical: dict[str, Tensor] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.numeric) + list(self.categorical)


def _positions(meta_pos: Tensor, b: int, l: int) -> Tensor:
    """[b, l] bool marking ``meta_pos`` ([b] or [b, k] position indices)."""
    pos = meta_pos.reshape(b, -1).long()
    out = torch.zeros(b, l, dtype=torch.bool)
    out.scatter_(1, pos.clamp(0, l - 1), True)
    return out


def _at(values: Tensor, meta_pos: Tensor, b: int, l: int) -> Tensor:
    """[b, l] float64: ``values`` ([b] or [b, k]) placed at ``meta_pos`` (same shape), NaN elsewhere."""
    v = values.reshape(b, -1).double()
    pos = meta_pos.reshape(b, -1).long()
    out = torch.full((b, l), NAN, dtype=torch.float64)
    out.scatter_(1, pos.clamp(0, l - 1), v)
    return out


def task_variables(batch, valid: Tensor | None = None) -> TaskVariables:
    """The ground-truth variables of ``batch`` (a ``TaskBatch``); ``valid`` [b, l] bool masks padding (NaN there)."""
    tokens = batch.tokens.long()
    b, l = tokens.shape
    meta = batch.metadata
    if valid is None:
        valid = torch.ones(b, l, dtype=torch.bool) if batch.attention_mask is None else batch.attention_mask.bool()
    positions = torch.arange(l).expand(b, l)
    out = TaskVariables()
    out.categorical["token"] = tokens.double()
    prev = torch.full((b, l), NAN, dtype=torch.float64)
    prev[:, 1:] = tokens[:, :-1].double()
    prev[:, 1:][~valid[:, :-1]] = NAN  # the token before is padding
    out.categorical["prev_token"] = prev
    out.numeric["position"] = positions.double()
    if isinstance(meta.get("answer"), Tensor) and isinstance(meta.get("answer_pos"), Tensor):
        if meta["answer"].numel() == meta["answer_pos"].numel():
            out.categorical["answer"] = _at(meta["answer"], meta["answer_pos"], b, l)

    task = batch.task
    if task == "induction":
        value_pos = meta["value_pos"].long()[:, None]  # (b, 1)
        out.numeric["after_trigger"] = (positions == value_pos).double()
        stored = meta["answer"].double()[:, None].expand(b, l).clone()
        stored[positions <= value_pos] = NAN
        out.categorical["stored_value"] = stored
    elif task == "mqar":
        out.numeric["is_key"] = _positions(meta["key_pos"], b, l).double()
        out.numeric["is_value"] = _positions(meta["value_pos"], b, l).double()
        out.numeric["is_query"] = _positions(meta["query_pos"], b, l).double()
    elif task == "selective_copy" and isinstance(meta.get("is_data"), Tensor):
        out.numeric["is_data"] = meta["is_data"].double()
    elif task == "parity" and isinstance(meta.get("running_parity"), Tensor):
        out.numeric["running_parity"] = meta["running_parity"].double()
    elif task in ("text_induction", "repeated_tokens") and "period" in meta:
        start = int(meta.get("first_start", 0)) + int(meta["period"])
        out.numeric["second_copy"] = (positions >= start).double()
    elif task == "ioi":
        out.numeric["is_io"] = _positions(meta["io_pos"], b, l).double()
        out.numeric["is_s"] = (_positions(meta["s1_pos"], b, l) | _positions(meta["s2_pos"], b, l)).double()
        abba = torch.tensor([o == "ABBA" for o in meta["order"]], dtype=torch.float64)
        out.numeric["abba"] = _at(abba, meta["end_pos"], b, l)
    elif task == "factual_recall":
        first, last = meta["subject_first_pos"].long()[:, None], meta["subject_last_pos"].long()[:, None]
        out.numeric["is_subject"] = ((positions >= first) & (positions <= last)).double()
        out.numeric["subject_last"] = (positions == last).double()
        out.categorical["relation"] = _at(_relation_ids(meta["relation"]), meta["answer_pos"], b, l)
    elif task == "modular_addition":
        for name, pos in (("a", 0), ("b", 1)):
            v = meta[name].double()[:, None].expand(b, l).clone()
            v[positions < pos] = NAN
            out.categorical[name] = v

    for group in (out.numeric, out.categorical):
        for name, v in group.items():
            group[name] = torch.where(valid, v, torch.full_like(v, NAN))
    return out


def _relation_ids(relations: list[str]) -> Tensor:
    """[b] the index of each prompt's relation among the relations of ``FACTS`` (in their order)."""
    from mamba_interp.tasks.text import FACTS

    order = list(dict.fromkeys(f[0] for f in FACTS))
    return torch.tensor([order.index(r) for r in relations], dtype=torch.float64)


def _top_classes(labels: Tensor, max_classes: int, min_count: int) -> list[int]:
    """The ``max_classes`` most frequent classes with at least ``min_count`` occurrences (ties: smaller id)."""
    finite = labels[torch.isfinite(labels)].long()
    if finite.numel() == 0:
        return []
    classes, counts = finite.unique(return_counts=True)
    order = sorted(zip((-counts).tolist(), classes.tolist()))
    return sorted(c for n, c in order[:max_classes] if -n >= min_count)


def _informative(v: Tensor, min_count: int) -> bool:
    """At least two distinct finite values, and (for indicators) the rarer one at least ``min_count`` times."""
    x = v[torch.isfinite(v)]
    if x.numel() < 3 or bool((x == x[0]).all()):
        return False
    if bool(((x == 0) | (x == 1)).all()):
        return min(int((x == 1).sum()), int((x == 0).sum())) >= min_count
    return True


def expand_variables(variables: TaskVariables, mask: Tensor, max_classes: int = 16, min_count: int = 5
                     ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Flatten to the valid tokens of ``mask`` [b, l] and one-hot the categorical variables.

    Returns (name -> [N] float64, name -> its base variable), e.g. ``"token=3" -> "token"``. Variables that are
    constant, or indicators with fewer than ``min_count`` positives or negatives, are dropped.
    """
    out: dict[str, Tensor] = {}
    base: dict[str, str] = {}
    for name, v in variables.numeric.items():
        flat = v[mask]
        if _informative(flat, min_count):
            out[name], base[name] = flat, name
    for name, labels in variables.categorical.items():
        flat = labels[mask]
        classes = _top_classes(flat, max_classes, min_count)
        for key, ind in one_hot_variables(name, flat, classes).items():
            if _informative(ind, min_count):
                out[key], base[key] = ind, name
    return out, base


def is_binary(v: Tensor) -> bool:
    """Every finite value is 0 or 1."""
    x = v[torch.isfinite(v)]
    return bool(((x == 0) | (x == 1)).all())


def variable_labels(variables: TaskVariables, name: str, mask: Tensor, max_classes: int = 16, min_count: int = 5
                    ) -> tuple[Tensor, str]:
    """Labels of variable ``name`` at the valid tokens of ``mask`` [b, l] -> ([N] float64, task).

    ``task`` is "classification" for a categorical or 0/1 variable (labels are class ids; a categorical variable
    keeps its ``max_classes`` most frequent classes with at least ``min_count`` tokens, the other tokens become NaN)
    and "regression" otherwise. NaN marks the tokens where the variable is undefined or not probed."""
    if name in variables.categorical:
        flat = variables.categorical[name][mask]
        classes = _top_classes(flat, max_classes, min_count)
        keep = torch.isin(flat, torch.tensor(classes, dtype=flat.dtype)) if classes else torch.zeros_like(flat).bool()
        return torch.where(keep, flat, torch.full_like(flat, NAN)), "classification"
    if name in variables.numeric:
        flat = variables.numeric[name][mask]
        return flat, "classification" if is_binary(flat) else "regression"
    raise KeyError(f"variable {name!r} is not defined for this batch; it has {', '.join(variables.names)}")
