"""The materialised state path: used when a hook reads or writes ``hook_dA`` / ``hook_ssm_state``.

State substitution (docs/hooks.md): a hook on ``hook_ssm_state`` that returns a changed tensor substitutes the
state at every (batch, position) where it differs, and the recurrence continues from it. A substituted
position is a *reset* of the recurrence — decay 0, input = the new state — so the same linear recurrence
reproduces exactly a step loop that overwrites h_t, and gradients flow into the substituted values.
"""

from __future__ import annotations

import torch

from mamba_interp.models.hooks import HookPoint
from mamba_interp.models.ops.selective_scan import linear_recurrence


def states_with_substitution(
    decay: torch.Tensor, inp: torch.Tensor, h0: torch.Tensor | None, state_hook: HookPoint
) -> torch.Tensor:
    """Per-token states [b, l, ...] of ``h_t = decay_t h_{t-1} + inp_t``, passed through ``state_hook``."""
    states = linear_recurrence(decay, inp, h0)
    if not state_hook.active:
        return states
    new = state_hook(states)
    if new is states:
        return states
    changed = (new != states).flatten(2).any(-1)  # (b, l)
    if not bool(changed.any()):
        return new
    mask = changed.view(*changed.shape, *([1] * (inp.dim() - 2)))
    return linear_recurrence(decay.expand_as(inp).masked_fill(mask, 0.0), torch.where(mask, new, inp), h0)
