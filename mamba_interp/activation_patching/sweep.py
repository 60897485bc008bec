"""Activation patching sweeps over hooks × positions (× channels), denoising or noising.

Denoising (TransformerLens' ``generic_activation_patch``) runs the corrupted input with one clean activation
written in: sufficiency of that activation to restore the behaviour. Noising runs the clean input with one
corrupted activation: necessity. The two are not symmetric (Heimersheim & Nanda 2024, arXiv 2404.15255): run
both before calling a site unimportant. One clean and one corrupted run are cached, then each site costs one
forward that recomputes only what the patch changes (``engine``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mamba_interp.activation_patching.engine import (
    DEFAULT_MAX_CACHE_BYTES,
    STATE_MODES,
    BaseRun,
    Patch,
    base_run,
    cache_bytes,
    hook_shapes,
    patched_metric,
    resid_in,
)
from mamba_interp.activation_patching.result import PatchResult, normalise
from mamba_interp.activation_patching.sites import (
    flat_features,
    hook_layer,
    n_channels,
    resolve_hooks,
    resolve_positions,
)

DIRECTIONS = ("denoise", "noise")


def check_pair(clean_ids: Tensor, corrupt_ids: Tensor, direction: str, state_mode: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is unknown; use 'denoise' or 'noise'")
    if state_mode not in STATE_MODES:
        raise ValueError(f"state_mode={state_mode!r} is unknown; use 'propagate' or 'readout'")
    if clean_ids.dim() != 2 or clean_ids.shape != corrupt_ids.shape:
        raise ValueError(f"clean and corrupted ids must have the same shape [b, l], got {tuple(clean_ids.shape)} and "
                         f"{tuple(corrupt_ids.shape)} (positions are patched one to one)")


def patch_sweep(
    model: Any,
    clean_ids: Tensor,
    corrupt_ids: Tensor,
    metric: Callable[..., Tensor],
    hooks: str | Sequence[str] | None = None,
    positions: Any = "all",
    direction: str = "denoise",
    per_channel: bool = False,
    batch_size: int | None = None,
    state_mode: str = "propagate",
    layers: Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    stream: bool | None = None,
    window: bool = True,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
    progress: Callable | None = None,
) -> PatchResult:
    """Patch every (hook, position) — every channel too with ``per_channel`` — and measure ``metric``.

    ``hooks``: full names, globs or short names over ``layers`` (default: ``sites.DEFAULT_HOOKS`` at every layer);
    ``positions``: ``"all"``, ints, or ``{class: positions}`` (see ``sites``); ``metric``: logits [b, l, v] -> [b]
    (a ``metrics.Metric`` lets the engine skip unchanged examples and positions). ``attention_mask`` applies to
    both runs (clean and corrupted prompts are aligned position by position). ``stream``: cache one hook at a time
    (the two caches of the swept hook and the residual stream entering its block, without position suffixes) so
    that a large model fits in memory; None chooses it when the full caches would exceed ``max_cache_bytes``.

    Cost: one forward per site and channel (``result.meta["forwards"]``), each started at the site's layer.
    ``progress``: a tqdm-like factory called as ``progress(total=number_of_hooks)``.
    """
    check_pair(clean_ids, corrupt_ids, direction, state_mode)
    names = resolve_hooks(model, hooks, layers)
    b, length = clean_ids.shape
    labels, masks = resolve_positions(positions, b, length)
    shapes = hook_shapes(model)
    n = model.cfg.n_layer
    full = cache_bytes(model, names + [resid_in(i, n) for i in range(n + 1)], b * length)
    if stream is None:
        stream = 2 * full > max_cache_bytes
    src_ids, dst_ids = (clean_ids, corrupt_ids) if direction == "denoise" else (corrupt_ids, clean_ids)

    def runs(hook_names: list[str], boundary: list[str] | None, use_window: bool) -> tuple[BaseRun, BaseRun]:
        kw = dict(attention_mask=attention_mask, batch_size=batch_size, boundary=boundary,
                  max_cache_bytes=max_cache_bytes)
        source = base_run(model, src_ids, metric, hook_names, window=False, **{**kw, "boundary": []})
        target = base_run(model, dst_ids, metric, hook_names, window=use_window, **kw)
        return source, target

    groups = [[h] for h in names] if stream else [names]
    effect, per_example = {}, {}
    meta: dict[str, Any] = {"forwards": 0, "streamed": bool(stream), "peak_cache_bytes": 0, "windowed": False}
    clean_m = corrupt_m = None
    bar = progress(total=len(names)) if progress is not None else None
    for group in groups:
        boundary = [resid_in(max(hook_layer(group[0], n), 0), n)] if stream else None
        source, target = runs(group, boundary, window and not stream)
        meta["peak_cache_bytes"] = max(meta["peak_cache_bytes"], source.nbytes() + target.nbytes())
        meta["windowed"] = meta["windowed"] or target.windowable
        if clean_m is None:
            clean, corrupt = (source, target) if direction == "denoise" else (target, source)
            clean_m, corrupt_m = clean.metric_values, corrupt.metric_values
            del clean, corrupt
        for name in group:
            channels = range(n_channels(shapes[name])) if per_channel else [None]
            vals = torch.empty(b, len(labels), len(channels))
            for p, mask in enumerate(masks):
                for j, c in enumerate(channels):
                    feats = None if c is None else flat_features(shapes[name], [c])
                    patch = Patch(name, mask, source.cache[name], features=feats, state_mode=state_mode)
                    vals[:, p, j] = patched_metric(model, target, [patch], metric, batch_size, window)
            per = normalise(vals, clean_m, corrupt_m, direction).float()
            per_example[name] = per if per_channel else per[..., 0]
            effect[name] = per_example[name].mean(0)
            if bar is not None:
                bar.update(1)
        meta["forwards"] += target.stats.get("forwards", 0)
        del source, target  # streaming: only one hook's two caches are alive at a time
    if bar is not None:
        bar.close()
    return PatchResult(effect, per_example, labels, direction, "exact", state_mode, float(clean_m.double().mean()),
                       float(corrupt_m.double().mean()), n, meta)
