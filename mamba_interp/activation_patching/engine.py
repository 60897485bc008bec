"""The patching engine: run a model with some activations replaced, recomputing only what the replacement changes.

A :class:`Patch` writes source values (another run's activations, a mean, zeros) into one hook at chosen
(example, position) entries and features. :func:`patched_metric` evaluates a metric of the patched run against a
:class:`BaseRun` (the unpatched run being patched, with its cache), and saves work in three exact ways:

1. **examples**: an example whose patched entries already hold the source values runs unchanged, so it keeps its
   base metric without a forward pass;
2. **layers**: the forward starts at the first patched layer from the cached residual stream (TransformerLens'
   ``start_at_layer``, TL PR #382);
3. **positions**: Mamba is causal, so nothing before the first patched position t0 changes. The forward runs on
   the suffix from s = t0 − (k − 1) (k = conv width) with each layer's initial state set to the cached state after
   s − 1 (``hook_h0``) and the conv output at the k − 1 positions whose window would reach before s restored from
   the cache (``hook_conv``); every later value is then the full run's. This needs the per-token states of the base
   run, so it is used when they fit ``max_cache_bytes``.

State patches (``hook_ssm_state``) have two semantics (docs/hooks.md): ``"propagate"`` — the
substituted state feeds the rest of the recurrence (the model's own ``hook_ssm_state`` semantics, a step loop that
overwrites h_t); ``"readout"`` — only y_t sees the patched state: y_t += C_t·(h'_t − h_t), while the recurrence
continues from the unpatched h_t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mamba_interp.activation_patching.metrics import as_metric
from mamba_interp.activation_patching.sites import hook_layer

STATE_MODES = ("propagate", "readout")
DEFAULT_MAX_CACHE_BYTES = 2 * 2**30
WINDOW_GROUPS = 4
"""Examples sorted by first patched position run in this many groups (each from its own suffix start)."""
MIN_GROUP = 16


@dataclass
class Patch:
    """Write ``source`` into ``hook`` where ``mask`` [b, l] is True, at ``features`` (flat indices; None = all).

    ``source``: [b, l, *feat] (another run's activations) or [*feat] (one vector for every patched entry: a
    mean, zeros). ``basis`` [F, k] (orthonormal columns): patch only the component in their span,
    x + (src − x)·U Uᵀ. ``state_mode``: for ``hook_ssm_state``, ``"propagate"`` or ``"readout"``.
    """

    hook: str
    mask: Tensor
    source: Tensor
    features: Tensor | None = None
    basis: Tensor | None = None
    state_mode: str = "propagate"

    def __post_init__(self) -> None:
        if self.state_mode not in STATE_MODES:
            raise ValueError(f"state_mode={self.state_mode!r} is unknown; use one of {STATE_MODES}")
        if self.mask.dtype != torch.bool or self.mask.dim() != 2:
            raise ValueError(f"Patch.mask must be a [b, l] bool tensor, got {tuple(self.mask.shape)} {self.mask.dtype}")

    @property
    def full_source(self) -> bool:
        return self.source.dim() >= 2 and tuple(self.source.shape[:2]) == tuple(self.mask.shape)


@dataclass
class BaseRun:
    """An unpatched run: its inputs, cached activations (hook name -> [b, l, ...]) and per-example metric."""

    ids: Tensor
    attention_mask: Tensor | None
    cache: dict[str, Tensor]
    metric_values: Tensor
    windowable: bool = False
    """The cache holds every layer's residual stream, conv output and per-token state (position suffixes)."""
    logits: Tensor | None = None
    """Full logits, kept only for plain-callable metrics (which are evaluated on the whole batch)."""
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    def select(self, index: Tensor) -> BaseRun:
        """The same run restricted to the examples ``index`` (cached tensors sliced, nothing recomputed)."""
        am = None if self.attention_mask is None else self.attention_mask[index]
        logits = None if self.logits is None else self.logits[index]
        return BaseRun(self.ids[index], am, {k: v[index] for k, v in self.cache.items()}, self.metric_values[index],
                       self.windowable, logits)


def resid_in(layer: int, n_layer: int) -> str:
    """The residual stream entering block ``layer`` (``layer == n_layer``: after the last block)."""
    return f"blocks.{n_layer - 1}.hook_resid_post" if layer == n_layer else f"blocks.{layer}.hook_resid_pre"


def hook_shapes(model: Any) -> dict[str, tuple]:
    """Feature shape (dims after b, l) of every position-indexed hook, from one 1-token forward (memoised)."""
    memo = getattr(model, "_patching_shapes", None)
    if memo is None:
        device = next(model.parameters()).device
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.zeros(1, 1, dtype=torch.long, device=device),
                                            names_filter=lambda n: not n.endswith(("hook_h0", "hook_conv_state")))
        memo = {n: tuple(v.shape[2:]) for n, v in cache.items()}
        object.__setattr__(model, "_patching_shapes", memo)
    return memo


def _feature_numel(model: Any, name: str) -> int:
    out = 1
    for s in hook_shapes(model)[name]:
        out *= int(s)
    return out


def boundary_names(model: Any) -> list[str]:
    n = model.cfg.n_layer
    return [resid_in(i, n) for i in range(n + 1)]


def window_names(model: Any) -> list[str]:
    n = model.cfg.n_layer
    return [f"blocks.{i}.mixer.hook_{h}" for i in range(n) for h in ("conv", "ssm_state")]


def cache_bytes(model: Any, names: Sequence[str], tokens: int) -> int:
    return 4 * tokens * sum(_feature_numel(model, n) for n in set(names))


@torch.no_grad()
def base_run(model: Any, ids: Tensor, metric: Any, hooks: Sequence[str] = (), attention_mask: Tensor | None = None,
             batch_size: int | None = None, window: bool = True, boundary: Sequence[str] | None = None,
             max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES) -> BaseRun:
    """Run the model on ``ids`` and cache ``hooks`` plus what starting later needs: the residual stream entering
    every block (or only ``boundary``), and with ``window`` (if it fits ``max_cache_bytes``) the conv outputs and
    per-token states of every layer."""
    fn, flexible = as_metric(metric)
    b, length = ids.shape
    bounds = boundary_names(model) if boundary is None else list(boundary)
    names = list(dict.fromkeys([*hooks, *bounds]))
    windowable = bool(window and flexible)
    if windowable and cache_bytes(model, [*names, *window_names(model)], b * length) > max_cache_bytes:
        windowable = False
    if windowable:
        names = list(dict.fromkeys([*names, *window_names(model), *boundary_names(model)]))
    if cache_bytes(model, names, b * length) > max_cache_bytes:
        raise MemoryError(
            f"caching {len(names)} hooks for {b}x{length} tokens needs "
            f"{cache_bytes(model, names, b * length) / 2**30:.2f} GiB > max_cache_bytes; sweep fewer hooks at once, "
            "use fewer examples, or stream=True"
        )
    device = next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    values, all_logits = [], []
    step = batch_size or b
    for s0 in range(0, b, step):
        sl = slice(s0, s0 + step)
        am = None if attention_mask is None else attention_mask[sl].to(device)
        logits, cache = model.run_with_cache(ids[sl].to(device), attention_mask=am, names_filter=names)
        for n in names:
            parts[n].append(cache[n])
        if flexible:
            values.append(fn.subset(torch.arange(s0, min(s0 + step, b)))(logits).float().cpu())
        else:
            all_logits.append(logits)
        del cache
    cache = {n: torch.cat(v) for n, v in parts.items()}
    logits = None
    if flexible:
        metric_values = torch.cat(values)
    else:
        logits = torch.cat(all_logits)
        metric_values = fn(logits).float().cpu()
    return BaseRun(ids, attention_mask, cache, metric_values, windowable, logits)


# ---- one patched forward ----------------------------------------------------------------------
def _write(x: Tensor, p: Patch, entries: tuple[Tensor, ...]) -> Tensor:
    """x [b, w, *feat] with ``p.source`` written at the entries (rows, cols) of x, read from (src_rows, src_cols)
    of a full source [B, L, *feat] (or the single vector [*feat]); only those entries are touched."""
    rows, cols, src_rows, src_cols = entries
    b, w = x.shape[:2]
    out = x.reshape(b, w, -1).clone()
    if rows.numel() == 0:
        return out.reshape(x.shape)
    if p.full_source:
        vals = p.source[src_rows, src_cols].reshape(rows.numel(), -1)
    else:
        vals = p.source.reshape(1, -1).expand(rows.numel(), -1)
    vals = vals.to(out.device, out.dtype)
    cur = out[rows, cols]  # (k, F)
    if p.basis is not None:
        U = p.basis.to(out)  # (F, k)
        out[rows, cols] = cur + ((vals - cur) @ U) @ U.T
    elif p.features is not None:
        f = p.features.to(out.device)
        cur[:, f] = vals[:, f]
        out[rows, cols] = cur
    else:
        out[rows, cols] = vals
    return out.reshape(x.shape)


def _entries(p: Patch, index: Tensor | None, start: int, device: Any) -> tuple[Tensor, ...]:
    """The patched entries of a run on examples ``index`` from position ``start``: local (rows, cols) and the
    matching (rows, cols) of the full-size source."""
    mask = p.mask if index is None else p.mask[index]
    rows, cols = mask[:, start:].nonzero(as_tuple=True)
    src_rows = rows if index is None else index[rows]
    return rows.to(device), cols.to(device), src_rows, cols + start


def _readout_hooks(p: Patch, entries: tuple[Tensor, ...], arch: str, heads_per_group: int) -> list:
    """Hooks giving y_t += C_t·(h'_t − h_t) at the patched entries, with the recurrence left alone."""
    prefix = p.hook[: -len("hook_ssm_state")]
    store: dict[str, Tensor] = {}

    def grab_c(c: Tensor, hook: Any) -> None:
        store["C"] = c

    def grab_states(h: Tensor, hook: Any) -> None:
        store["h"] = h

    def fix_y(y: Tensor, hook: Any) -> Tensor:
        h = store["h"]
        diff = _write(h, p, entries) - h
        C = store["C"].float()
        if arch == "mamba1":
            corr = torch.einsum("blen,bln->ble", diff, C)
        else:
            corr = torch.einsum("blhpn,blhn->blhp", diff, C.repeat_interleave(heads_per_group, dim=2))
        return y + corr.to(y.dtype)

    return [(prefix + "hook_C", grab_c), (p.hook, grab_states), (prefix + "hook_y", fix_y)]


def patch_hooks(model: Any, patches: Sequence[Patch], index: Tensor | None = None, start: int = 0) -> list:
    """Forward hooks applying ``patches`` to the examples ``index`` of positions ``start..`` (a run on them)."""
    device = next(model.parameters()).device
    cfg = model.cfg
    hpg = cfg.nheads // cfg.ngroups if cfg.arch == "mamba2" else 1
    hooks = []
    for p in patches:
        entries = _entries(p, index, start, device)
        if p.hook.endswith("hook_ssm_state") and p.state_mode == "readout":
            hooks.extend(_readout_hooks(p, entries, cfg.arch, hpg))
        else:
            hooks.append((p.hook, lambda x, hook, e=entries, p=p: _write(x, p, e)))
    return hooks


def forward_from(model: Any, layer: int, inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Logits [b, l, v] from the residual stream entering block ``layer`` (``inputs`` [b, l, d]); ``layer = -1``
    starts from token ids. The same computation as ``HookedMamba.forward`` (hooks fire as usual)."""
    mask = attention_mask
    if mask is not None and bool(mask.all()):
        mask = None
    resid = model.hook_embed(model.embed(inputs)) if layer < 0 else inputs
    for block in model.blocks[max(layer, 0):]:
        resid = block(resid, mask)
    normed = model.hook_norm_final(model.norm_f(resid))
    return model.lm_head(normed.to(model.lm_head.weight.dtype)).float()


def _differs(base: BaseRun, patches: Sequence[Patch]) -> Tensor:
    """[b] bool: examples where some patch writes a value the base run does not already hold."""
    out = torch.zeros(len(base), dtype=torch.bool)
    for p in patches:
        if not p.full_source or p.hook not in base.cache:
            out |= p.mask.any(1)
            continue
        rows, cols = p.mask.nonzero(as_tuple=True)
        cur = base.cache[p.hook][rows, cols].reshape(rows.numel(), -1).cpu()
        src = p.source[rows, cols].reshape(rows.numel(), -1).to(cur)
        if p.features is not None and p.basis is None:
            cur, src = cur[:, p.features], src[:, p.features]
        out[rows[(cur != src).any(-1)]] = True
    return out


def _first_position(patches: Sequence[Patch], index: Tensor) -> int:
    cols = torch.zeros(patches[0].mask.shape[1], dtype=torch.bool)
    for p in patches:
        cols |= p.mask[index].any(0)
    hits = cols.nonzero()
    return int(hits[0]) if hits.numel() else cols.numel()


@torch.no_grad()
def patched_logits(model: Any, base: BaseRun, patches: Sequence[Patch], index: Tensor, window: bool = True,
                   metric_start: int | None = None) -> tuple[Tensor, int]:
    """Logits of the patched run of examples ``index`` for positions ``offset..`` and that ``offset``."""
    n, k = model.cfg.n_layer, model.cfg.d_conv
    device = next(model.parameters()).device
    length = base.ids.shape[1]
    layer = min(hook_layer(p.hook, n) for p in patches) if patches else n
    start = 0
    if window and base.windowable and patches:
        t0 = min(_first_position(patches, index), length - 1 if metric_start is None else metric_start)
        start = max(0, t0 - (k - 1))
    hooks = list(patch_hooks(model, patches, index, start))
    if start > 0:
        for i in range(max(layer, 0), n):
            conv = base.cache[f"blocks.{i}.mixer.hook_conv"][index, start:start + k - 1].to(device)
            state = base.cache[f"blocks.{i}.mixer.hook_ssm_state"][index, start - 1].to(device)
            hooks.insert(0, (f"blocks.{i}.mixer.hook_conv", _restore_prefix(conv)))
            hooks.insert(0, (f"blocks.{i}.mixer.hook_h0", lambda h, hook, s=state: s.to(h.dtype)))
    am = None if base.attention_mask is None else base.attention_mask[index, start:].to(device)
    if layer < 0:
        inputs = base.ids[index, start:].to(device)
    else:
        inputs = base.cache[resid_in(layer, n)][index, start:].to(device)
    with model.hooks(fwd_hooks=hooks):
        logits = forward_from(model, layer, inputs, am)
    base.stats["forwards"] = base.stats.get("forwards", 0) + 1
    base.stats["token_layers"] = base.stats.get("token_layers", 0) + len(index) * (length - start) * (n - max(layer, 0))
    return logits, start


def _restore_prefix(values: Tensor):
    width = values.shape[1]

    def restore(conv: Tensor, hook: Any) -> Tensor:
        return torch.cat([values.to(conv.dtype), conv[:, width:]], dim=1)

    return restore


def patched_metric(model: Any, base: BaseRun, patches: Sequence[Patch], metric: Any, batch_size: int | None = None,
                   window: bool = True) -> Tensor:
    """Per-example metric [b] of the base run with ``patches`` applied (see the module docstring). With position
    suffixes, examples are sorted by their first patched position and run in up to ``WINDOW_GROUPS`` groups, so
    each group starts as late as its own examples allow."""
    fn, flexible = as_metric(metric)
    if not patches:
        return base.metric_values.clone()
    if not flexible:
        logits, _ = patched_logits(model, base, patches, torch.arange(len(base)), window=False)
        return fn(logits).float().cpu()
    out = base.metric_values.clone()
    active = _differs(base, patches).nonzero().flatten()
    if active.numel() == 0:
        return out
    size = batch_size or len(base)
    if window and base.windowable:
        first = torch.stack([p.mask[active].float().argmax(1) + (~p.mask[active].any(1)) * p.mask.shape[1]
                             for p in patches]).min(0).values
        if int(first.min()) != int(first.max()):
            active = active[torch.argsort(first, stable=True)]
            size = min(size, max(MIN_GROUP, -(-active.numel() // WINDOW_GROUPS)))
    metric_start = fn.first_position(base.ids.shape[1])
    for chunk in active.split(size):
        logits, offset = patched_logits(model, base, patches, chunk, window, metric_start)
        out[chunk] = fn.subset(chunk)(logits, offset).float().cpu()
    return out
