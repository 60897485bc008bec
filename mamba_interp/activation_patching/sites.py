"""What a patch addresses: hook names, positions (absolute or per-example position classes) and channels.

* Hooks: full names (``blocks.1.mixer.hook_dt``), globs, or the short names of step 2 (``"resid_pre"``, ``"x"``,
  ``"dt"``, ``"ssm_state"`` or ``"state"``, ...) expanded over the chosen layers.
* Positions: ``"all"`` (every position separately), an int or a list of ints (negative = from the end), or a
  mapping ``{name: positions}`` of *position classes* whose positions may differ per example: a [b] or [b, k] long
  tensor, or a [b, l] bool mask. Every spec becomes a list of labels and one [b, l] bool mask per label.
* Channels: the first feature axis of a hook's activation (dim 2): channels for Mamba-1 ([b, l, e]; the state
  [b, l, e, n] by channel), heads for Mamba-2's per-head hooks (x, y, Δ, state [b, l, h, ...]), groups for its
  B and C, dimensions of d_model for the residual stream. Internally a channel set becomes flat indices into the
  flattened feature axis (prod of the dims after b, l).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mamba_interp.models.cache import get_act_name

DEFAULT_HOOKS = ("resid_pre", "conv", "x", "dt", "B", "C", "ssm_state", "y", "gate", "out")
"""The sweep's default sites (issue 10): residual, conv, SSM input, Δ, B, C, state, readout, gate, mixer output."""
ALIASES = {"state": "ssm_state", "delta": "dt", "resid": "resid_pre"}
MODEL_LEVEL = {"embed", "norm_final"}
HOOK_LIKE = ("embed", "resid_pre", "norm", "in_x", "in_z", "conv", "x", "dt_low", "dt", "B", "C", "dA", "ssm_state",
             "y", "gate", "gated", "out", "resid_post", "norm_final", *ALIASES)
"""Short names ``resolve_hooks`` understands (``dt_low`` exists in Mamba-1 only)."""
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def resolve_hooks(model: Any, hooks: str | Sequence[str] | None = None, layers: Sequence[int] | None = None
                  ) -> list[str]:
    """Full hook names, in execution order. Short names expand over ``layers`` (default: all); names a layer
    lacks (``dt_low`` on Mamba-2) raise a clear error."""
    hooks = DEFAULT_HOOKS if hooks is None else ((hooks,) if isinstance(hooks, str) else tuple(hooks))
    n_layer = model.cfg.n_layer
    layers = range(n_layer) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= int(i) < n_layer]
    if bad:
        raise ValueError(f"layer {bad[0]} does not exist; the model has layers 0..{n_layer - 1}")
    patterns: list[str] = []
    for h in hooks:
        if not isinstance(h, str):
            raise TypeError(f"hooks must be names, got {type(h).__name__}")
        short = ALIASES.get(h, h)
        if "." in short or "*" in short or short.startswith("hook_"):
            patterns.append(short)
        elif short in MODEL_LEVEL:
            patterns.append(get_act_name(short))
        else:
            patterns.extend(get_act_name(short, int(i)) for i in layers)
    names = model.hook_names(patterns)
    lazy_only = [n for n in names if n.endswith(("hook_h0", "hook_conv_state"))]
    if lazy_only:
        raise ValueError(f"{lazy_only[0]} has no position axis and cannot be patched by position; leave it out")
    return names


def hook_layer(name: str, n_layer: int) -> int:
    """The block a hook belongs to: -1 for ``hook_embed``, ``n_layer`` for ``hook_norm_final``."""
    m = _LAYER.match(name)
    if m:
        return int(m.group(1))
    return -1 if name == "hook_embed" else n_layer


def short_name(name: str) -> str:
    """``blocks.1.mixer.hook_dt`` -> ``dt``; ``blocks.0.hook_resid_pre`` -> ``resid_pre``; ``hook_embed`` -> ``embed``."""
    return name.rsplit(".", 1)[-1].removeprefix("hook_")


# ---- positions ---------------------------------------------------------------------------------
def _class_mask(value: Any, b: int, length: int, name: str) -> Tensor:
    t = torch.as_tensor(value)
    if t.dtype == torch.bool:
        if tuple(t.shape) != (b, length):
            raise ValueError(f"position class {name!r}: a bool mask must be [b, l] = {(b, length)}, got {tuple(t.shape)}")
        return t.clone()
    t = t.long()
    if t.dim() == 0:
        t = t.expand(b)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != b:
        raise ValueError(f"position class {name!r}: positions must be [b] or [b, k] with b={b}, got {tuple(t.shape)}")
    t = torch.where(t < 0, t + length, t)
    if bool((t < 0).any()) or bool((t >= length).any()):
        raise ValueError(f"position class {name!r} has positions outside 0..{length - 1}")
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask.scatter_(1, t, True)
    return mask


def resolve_positions(positions: Any, b: int, length: int) -> tuple[list, Tensor]:
    """(labels, masks [P, b, l] bool) for a position spec (module docstring)."""
    if isinstance(positions, str):
        if positions != "all":
            raise ValueError(f"positions={positions!r} is unknown; use 'all', ints, or a mapping of position classes")
        labels: list = list(range(length))
        masks = torch.eye(length, dtype=torch.bool)[:, None, :].expand(length, b, length).clone()
        return labels, masks
    if isinstance(positions, Mapping):
        if not positions:
            raise ValueError("positions is an empty mapping; give at least one position class")
        labels = [str(k) for k in positions]
        return labels, torch.stack([_class_mask(v, b, length, str(k)) for k, v in positions.items()])
    items = [positions] if isinstance(positions, int) else list(positions)
    labels = []
    for p in items:
        if not isinstance(p, int) or not -length <= p < length:
            raise ValueError(f"position {p!r} is outside the sequence (length {length})")
        labels.append(p % length)
    return labels, torch.stack([_class_mask(p, b, length, str(p)) for p in labels])


def position_classes(batch: Any) -> dict[str, Tensor]:
    """Position classes of a ``TaskBatch`` from its task metadata, as [b, l] bool masks (``"other"``: every real
    token in no other class). Induction: ``trigger`` (p), ``answer`` (p+1, where X sits), ``final``; IOI: ``io``,
    ``s1``, ``s2``, ``final``; factual recall: ``subject``, ``subject_last``, ``final``; MQAR: ``key``, ``value``,
    ``query``; repeated tokens: ``first_copy``, ``second_copy``; otherwise ``final`` (the answer positions)."""
    b, length = batch.tokens.shape
    meta, task = batch.metadata, batch.task
    classes: dict[str, Any] = {}
    if task == "induction":
        classes = {"trigger": meta["trigger_pos"], "answer": meta["value_pos"], "final": meta["query_pos"]}
    elif task == "ioi":
        classes = {"io": meta["io_pos"], "s1": meta["s1_pos"], "s2": meta["s2_pos"], "final": meta["end_pos"]}
    elif task == "factual_recall":
        pos = torch.arange(length)[None]
        first, last = meta["subject_first_pos"][:, None], meta["subject_last_pos"][:, None]
        classes = {"subject": (pos >= first) & (pos < last), "subject_last": meta["subject_last_pos"],
                   "final": torch.full((b,), length - 1)}
    elif task == "mqar":
        classes = {"key": meta["key_pos"], "value": meta["value_pos"], "query": meta["query_pos"]}
    elif task in ("text_induction", "repeated_tokens") and "period" in meta:
        pos = torch.arange(length)[None].expand(b, length)
        start, period = int(meta.get("first_start", 0)), int(meta["period"])
        classes = {"first_copy": (pos >= start) & (pos < start + period), "second_copy": pos >= start + period}
    elif "answer_pos" in meta:
        classes = {"final": meta["answer_pos"]}
    else:
        classes = {"final": torch.full((b,), length - 1)}
    masks = {k: _class_mask(v, b, length, k) for k, v in classes.items()}
    valid = torch.ones(b, length, dtype=torch.bool) if batch.attention_mask is None else batch.attention_mask.bool()
    taken = torch.zeros(b, length, dtype=torch.bool)
    for k in masks:
        masks[k] &= valid & ~taken  # classes are disjoint: the first listed wins
        taken |= masks[k]
    other = valid & ~taken
    if bool(other.any()):
        masks["other"] = other
    return {k: v for k, v in masks.items() if bool(v.any())}


# ---- channels ----------------------------------------------------------------------------------
def n_channels(feature_shape: Sequence[int]) -> int:
    """Channels (dim 2 of the activation) of a hook with feature shape ``feature_shape`` (the dims after b, l)."""
    return int(feature_shape[0]) if len(feature_shape) else 1


def flat_features(feature_shape: Sequence[int], channels: Sequence[int] | Tensor | None, flat: bool = False
                  ) -> Tensor | None:
    """Flat feature indices of ``channels`` (dim-2 indices, or already flat when ``flat``); None = all."""
    if channels is None:
        return None
    idx = torch.as_tensor(channels, dtype=torch.long).reshape(-1)
    total = 1
    for s in feature_shape:
        total *= int(s)
    if flat:
        if bool((idx < 0).any()) or bool((idx >= total).any()):
            raise ValueError(f"feature index out of range 0..{total - 1}")
        return idx
    c = n_channels(feature_shape)
    if bool((idx < 0).any()) or bool((idx >= c).any()):
        raise ValueError(f"channel index out of range 0..{c - 1}")
    per = total // c
    return (idx[:, None] * per + torch.arange(per)[None]).reshape(-1)
