"""Activation patching and attribution patching on every internal of a hooked Mamba-1 / Mamba-2 model.

    >>> from mamba_interp.activation_patching import patch_sweep, attribution_patch, logit_diff, position_classes
    >>> metric = logit_diff(answer, wrong)                       # logits [b, l, v] -> [b], at the last position
    >>> res = patch_sweep(model, clean_ids, corrupt_ids, metric, hooks=["resid_pre", "y", "ssm_state"],
    ...                   positions=position_classes(clean_batch))  # or "all", or a list of positions
    >>> res.effect["blocks.0.mixer.hook_y"]                      # [classes]: 0 = corrupted, 1 = clean restored
    >>> atp = attribution_patch(model, clean_ids, corrupt_ids, metric, hooks=["resid_pre", "y"])   # one backward
    >>> logits = ablate(model, clean_ids, [("y", position_classes(clean_batch)["final"])], kind="mean")

Modules: ``metrics`` (``logit_diff``, ``logprob``, ``kl_to_clean``), ``sites`` (hooks, positions, position
classes, channels), ``engine`` (the patched forward that recomputes only what changes), ``sweep``
(:func:`patch_sweep`), ``attribution`` (:func:`attribution_patch`: AtP and integrated gradients), ``ablation``
(:func:`ablate`), ``result`` (:class:`PatchResult`).
"""

from mamba_interp.activation_patching.ablation import ablate, class_mean, derangement
from mamba_interp.activation_patching.attribution import attribution_patch
from mamba_interp.activation_patching.engine import BaseRun, Patch, base_run, forward_from, patched_metric
from mamba_interp.activation_patching.metrics import (
    Metric,
    Stacked,
    correct,
    custom_metric,
    kl_to_clean,
    logit_diff,
    logprob,
    task_metric,
)
from mamba_interp.activation_patching.result import PatchResult, normalise
from mamba_interp.activation_patching.sites import DEFAULT_HOOKS, position_classes, resolve_hooks, resolve_positions
from mamba_interp.activation_patching.sweep import patch_sweep

__all__ = [
    "DEFAULT_HOOKS", "BaseRun", "Metric", "Patch", "PatchResult", "Stacked", "ablate", "attribution_patch", "base_run",
    "class_mean", "correct", "custom_metric", "derangement", "forward_from", "kl_to_clean", "logit_diff", "logprob",
    "normalise", "patch_sweep", "patched_metric", "position_classes", "resolve_hooks", "resolve_positions",
    "task_metric",
]
