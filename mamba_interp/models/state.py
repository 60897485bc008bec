"""The inference state: every layer's conv window and SSM state, so a sequence can be processed in pieces.

A Mamba layer carries two things from one token to the next (Gu & Dao 2023, §3.4 "recurrent mode"; mamba_ssm's
``inference_params`` / transformers' ``MambaCache`` hold the same): the last k−1 inputs of its causal depthwise
conv (k = d_conv), and the SSM state h (Mamba-1 [b, e, n], Mamba-2 [b, h, p, n]). With both, processing a
sequence piece by piece — ``logits, state = model(piece, state=state)`` — equals processing it whole; without
the conv window it does not (the first k−1 outputs of each piece would see zeros instead of the previous tokens).

States are values: a forward returns a new :class:`InferenceState` and never changes the one it was given, so
one prompt's state can be continued several ways. Index letters: see ``models/config.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mamba_interp.models.ops import kernels
from mamba_interp.models.ops.conv import causal_conv1d, causal_conv1d_window

if TYPE_CHECKING:  # pragma: no cover
    from mamba_interp.models.config import MambaConfig
    from mamba_interp.models.hooks import HookPoint


@dataclass(frozen=True)
class LayerState:
    conv: torch.Tensor  # (b, k-1, c): the last k-1 conv inputs (rows of hook_in_x), c = conv channels
    ssm: torch.Tensor  # (b, e, n) Mamba-1 | (b, h, p, n) Mamba-2, float32


@dataclass(frozen=True)
class InferenceState:
    """Per-layer :class:`LayerState` after ``offset`` tokens (``model.init_state(b)`` starts at zeros)."""

    layers: tuple[LayerState, ...]
    offset: int = 0

    @classmethod
    def zeros(cls, cfg: MambaConfig, batch_size: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> InferenceState:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        shapes = ssm_state_shape(cfg, batch_size)
        conv = (batch_size, cfg.d_conv - 1, cfg.conv_dim)
        layer = lambda: LayerState(torch.zeros(conv, device=device, dtype=dtype),  # noqa: E731
                                   torch.zeros(shapes, device=device, dtype=torch.float32))
        return cls(tuple(layer() for _ in range(cfg.n_layer)))

    @property
    def batch_size(self) -> int:
        return self.layers[0].ssm.shape[0]

    def to(self, device: torch.device | str) -> InferenceState:
        return InferenceState(tuple(LayerState(s.conv.to(device), s.ssm.to(device)) for s in self.layers),
                              self.offset)

    def select(self, index: slice | list[int] | torch.Tensor) -> InferenceState:
        """The state of some batch rows (e.g. to continue a few prompts of a batch)."""
        return InferenceState(tuple(LayerState(s.conv[index], s.ssm[index]) for s in self.layers), self.offset)


def check_state(state: object, cfg: MambaConfig, batch_size: int) -> InferenceState:
    """One-line errors for a state that does not belong to this model or batch."""
    if not isinstance(state, InferenceState):
        raise TypeError(f"state must be an InferenceState (model.init_state(b)), got {type(state).__name__}")
    if len(state.layers) != cfg.n_layer:
        raise ValueError(f"the state has {len(state.layers)} layers, the model {cfg.n_layer}; "
                         "make it with this model's init_state")
    conv = (batch_size, cfg.d_conv - 1, cfg.conv_dim)
    ssm = ssm_state_shape(cfg, batch_size)
    for i, s in enumerate(state.layers):
        if tuple(s.conv.shape) != conv or tuple(s.ssm.shape) != ssm:
            raise ValueError(
                f"state layer {i} holds conv {tuple(s.conv.shape)} and ssm {tuple(s.ssm.shape)}, expected "
                f"{conv} and {ssm} for a batch of {batch_size}; use model.init_state({batch_size})"
            )
    return state


def ssm_state_shape(cfg: MambaConfig, batch_size: int) -> tuple[int, ...]:
    if cfg.arch == "mamba1":
        return (batch_size, cfg.d_inner, cfg.d_state)
    return (batch_size, cfg.nheads, cfg.headdim, cfg.d_state)


def mixer_conv(x: torch.Tensor, conv1d: nn.Conv1d, hook: HookPoint, state: LayerState | None,
               scan_impl: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The mixer's causal conv of x [b, l, c] (before SiLU) and the window after it ([b, k-1, c]; None without a
    state). It continues the window before the first token (``hook_conv_state``): the state's, or zeros when only
    the hook asks; with neither, the plain zero-padded conv runs (the fused kernel when asked for, on CUDA)."""
    window = None if state is None else state.conv.to(x.dtype)
    if hook.active:  # a copy: a hook must never be able to change the caller's state
        k = conv1d.kernel_size[0]
        window = hook(torch.zeros(x.shape[0], k - 1, x.shape[2], device=x.device, dtype=x.dtype)
                      if window is None else window.clone())
    if window is not None:
        return causal_conv1d_window(x, conv1d.weight, conv1d.bias, window)
    fused = scan_impl == "kernel" and kernels.causal_conv1d_fn is not None and x.is_cuda
    return (kernels.causal_conv1d if fused else causal_conv1d)(x, conv1d.weight, conv1d.bias), None


def initial_ssm_state(hook: HookPoint, state: LayerState | None, shape: tuple[int, ...],
                      device: torch.device) -> torch.Tensor | None:
    """The SSM state before the first token (``hook_h0``): the state's, or zeros when only the hook asks; None
    when neither (the scan starts from zero)."""
    h0 = None if state is None else state.ssm.float()
    if hook.active:
        h0 = hook(torch.zeros(shape, device=device, dtype=torch.float32) if h0 is None else h0.clone())
    return h0
