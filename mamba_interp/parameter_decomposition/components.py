"""Rank-one subcomponents of a weight matrix, causal-importance functions, and the masked linear stand-in.

Stochastic Parameter Decomposition (Bushnaq, Braun & Sharkey 2025, arXiv 2506.20790, §2.1–2.3, App. A):

    W ≈ Σ_c U_c V_cᵀ                               W [o, i], U [C, o], V [C, i]
    h_c(a) = V_c · a                               the subcomponent's inner activation on the matrix's input a
    g_c(a) = σ_H(MLP_c(h_c(a)))                    causal importance: one scalar MLP (1 → d_gate GELU → 1) each
    out = ((a Vᵀ) ⊙ m) Uᵀ + b                      the masked forward; m = g + (1 − g) r, r ~ U(0, 1)

The masked forward never builds U diag(m) V per sample: it costs O(C (i + o)) per token.

A :class:`MaskedLinear` stands in for one ``nn.Linear`` of the target (swapped in by :func:`stand_in`, restored in
``finally``). The target model calls it exactly as it called the Linear, so no code path that uses the matrix can
bypass the decomposition; it has no ``weight`` attribute, so code that would read the weight directly fails loudly
instead of silently using the undecomposed one.

Index letters: C subcomponents (c), i the matrix's input width, o its output width, k the rank of an APD component.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEAK = 0.01  # slope of the leaky parts of the hard sigmoids (SPD paper App. A)


def lower_leaky_hard_sigmoid(x: Tensor, alpha: float = LEAK) -> Tensor:
    """σ_H,lower: αx for x ≤ 0, x on [0, 1], 1 above. Its values build the masks."""
    return torch.where(x > 0, x.clamp(max=1.0), alpha * x)


def upper_leaky_hard_sigmoid(x: Tensor, alpha: float = LEAK) -> Tensor:
    """σ_H,upper: 0 for x ≤ 0, x on [0, 1], 1 + α(x − 1) above. Its values enter importance minimality."""
    return torch.where(x > 1, 1 + alpha * (x - 1), F.relu(x))


class Components(Protocol):
    """What a :class:`MaskedLinear` needs from a decomposition of one matrix (SPD's or APD's)."""

    d_in: int
    d_out: int

    def weight(self) -> Tensor:  # [o, i], the sum of all components
        ...

    def apply(self, x: Tensor, mask: Tensor | None) -> Tensor:  # x [..., i], mask [..., C] -> [..., o]
        ...


class LinearComponents(nn.Module):
    """C rank-one subcomponents U_c V_cᵀ of a matrix W [o, i] (SPD paper §2.1).

    ``tied_to`` makes this the transpose of another matrix's subcomponents (TMS's W and Wᵀ): U = source.V and
    V = source.U, one storage. ``separate_steps`` (the SPD paper code's tying) gives the tied matrix its own
    parameter tensors on the source's storage, so an optimiser steps once per matrix, each with its own gradient
    and Adam statistics; otherwise it has no parameters and the two uses' gradients are summed into the source's.
    """

    def __init__(self, d_in: int, d_out: int, C: int, tied_to: LinearComponents | None = None,
                 separate_steps: bool = False) -> None:
        super().__init__()
        if C < 1:
            raise ValueError(f"C={C} must be >= 1")
        self.d_in, self.d_out, self.C = d_in, d_out, C
        self.separate_steps = separate_steps and tied_to is not None
        object.__setattr__(self, "_source", tied_to)  # not a submodule: its parameters belong to the source
        if tied_to is not None:
            if (tied_to.d_in, tied_to.d_out, tied_to.C) != (d_out, d_in, C):
                raise ValueError(
                    f"tied subcomponents need the transposed shape: {d_out}x{d_in} with C={C}, got "
                    f"{tied_to.d_out}x{tied_to.d_in} with C={tied_to.C}"
                )
            if self.separate_steps:
                self._U = nn.Parameter(tied_to._V.data)  # aliases: the same storage as the source's V and U
                self._V = nn.Parameter(tied_to._U.data)
            else:
                self._U = self._V = None
        else:
            self._U = nn.Parameter(torch.empty(C, d_out))
            self._V = nn.Parameter(torch.empty(C, d_in))
            nn.init.normal_(self._U, std=1 / math.sqrt(C))
            nn.init.normal_(self._V, std=1 / math.sqrt(d_in))

    def retie_(self) -> None:
        """Point a separately stepped tied matrix at its source's storage again (``.to(device)`` copies)."""
        if self.separate_steps:
            self._U.data = self._source._V.data
            self._V.data = self._source._U.data

    @property
    def tied(self) -> bool:
        return self._source is not None

    @property
    def U(self) -> Tensor:  # [C, o]
        return self._source.V if self._source is not None and not self.separate_steps else self._U

    @property
    def V(self) -> Tensor:  # [C, i]
        return self._source.U if self._source is not None and not self.separate_steps else self._V

    def weight(self) -> Tensor:
        """Σ_c U_c V_cᵀ, [o, i]."""
        return torch.einsum("co,ci->oi", self.U, self.V)

    def inner(self, x: Tensor) -> Tensor:
        """h = x Vᵀ: x [..., i] -> [..., C]."""
        return torch.einsum("...i,ci->...c", x, self.V)

    def apply(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """((x Vᵀ) ⊙ m) U: x [..., i], mask [..., C] (or None: all ones) -> [..., o] (no bias)."""
        h = self.inner(x)
        if mask is not None:
            h = h * mask
        return torch.einsum("...c,co->...o", h, self.U)

    def norms(self) -> Tensor:
        """Frobenius norm of each subcomponent, ‖U_c‖‖V_c‖, [C]."""
        return self.U.norm(dim=1) * self.V.norm(dim=1)

    @torch.no_grad()
    def init_from(self, W: Tensor, generator: torch.Generator) -> None:
        """The SPD paper code's initialisation: U and V random with unit-norm rows, each U_c scaled by its overlap
        ⟨U_c V_cᵀ, W⟩ with the target, so the sum starts roughly aligned with W."""
        if self.tied:
            return
        U = torch.randn(self.C, self.d_out, generator=generator)
        V = torch.randn(self.C, self.d_in, generator=generator)
        U /= U.norm(dim=1, keepdim=True)
        V /= V.norm(dim=1, keepdim=True)
        overlap = torch.einsum("co,ci,oi->c", U, V, W.float().cpu())
        self._U.copy_(U * overlap[:, None])
        self._V.copy_(V)


class CIFunction(nn.Module):
    """Causal-importance functions of C subcomponents: one independent scalar MLP each (SPD paper §2.3),
    ``raw_c = w_out,c · GELU(w_in,c h_c + b_in,c) + b_out,c``; apply a leaky hard sigmoid to the result.

    Init as the paper's code: w_in ~ N(0, 2) (Kaiming, fan 1, ReLU gain), w_out ~ N(0, 1/d_gate), biases 0.
    """

    def __init__(self, C: int, d_gate: int = 16) -> None:
        super().__init__()
        if d_gate < 1:
            raise ValueError(f"d_gate={d_gate} must be >= 1")
        self.C, self.d_gate = C, d_gate
        self.w_in = nn.Parameter(torch.randn(C, d_gate) * math.sqrt(2.0))
        self.b_in = nn.Parameter(torch.zeros(C, d_gate))
        self.w_out = nn.Parameter(torch.randn(C, d_gate) / math.sqrt(d_gate))
        self.b_out = nn.Parameter(torch.zeros(C))

    def forward(self, h: Tensor) -> Tensor:
        """h [..., C] (inner activations) -> raw importances [..., C] (before the hard sigmoid)."""
        hidden = F.gelu(torch.addcmul(self.b_in, h[..., None], self.w_in))  # (..., C, d_gate)
        # multiply-and-sum, not einsum: einsum lowers this to a batched matmul of width 1, 2x slower on CPU
        return (hidden * self.w_out).sum(-1) + self.b_out

    @torch.no_grad()
    def reinit(self, generator: torch.Generator) -> None:
        self.w_in.copy_(torch.randn(self.C, self.d_gate, generator=generator) * math.sqrt(2.0))
        self.b_in.zero_()
        self.w_out.copy_(torch.randn(self.C, self.d_gate, generator=generator) / math.sqrt(self.d_gate))
        self.b_out.zero_()


class MaskedLinear(nn.Module):
    """Stands in for the target's ``nn.Linear`` ``name`` while a decomposition is installed.

    Modes (set by the owner before each forward):

    * ``components is None`` / ``use_components = False``: the target's own weight and bias (the target model);
    * ``use_components = True``: ``components.apply(x, mask) + bias`` with ``mask`` [..., C] or None (all ones);
    * ``route`` [...] bool (with ``use_components``): per token, the components where True and the target weight
      elsewhere (subset routing);
    * ``probes`` (a dict): a zero tensor that requires grad, shaped like the output, is added to the output and
      stored under ``name``; the gradient of any later quantity with respect to it is the gradient with respect to
      this matrix's output (APD's attributions).

    ``record`` (a dict): the input of every call is stored under ``name`` (the causal-importance functions read the
    target's inputs to each matrix).
    """

    def __init__(self, name: str, target: nn.Linear, components: Components) -> None:
        super().__init__()
        if (components.d_in, components.d_out) != (target.in_features, target.out_features):
            raise ValueError(
                f"{name}: components are {components.d_out}x{components.d_in} but the Linear is "
                f"{target.out_features}x{target.in_features}"
            )
        self.name = name
        object.__setattr__(self, "target", target)  # kept out of the module tree: nothing here is trained
        object.__setattr__(self, "components", components)
        self.use_components = False
        self.mask: Tensor | None = None
        self.route: Tensor | None = None
        self.probes: dict[str, Tensor] | None = None
        self.record: dict[str, Tensor] | None = None

    @property
    def bias(self) -> Tensor | None:
        return self.target.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.record is not None:
            self.record[self.name] = x
        if not self.use_components:
            out = F.linear(x, self.target.weight, self.target.bias)
        else:
            out = self.components.apply(x, self.mask)
            if self.target.bias is not None:
                out = out + self.target.bias
            if self.route is not None:
                out = torch.where(self.route[..., None], out, F.linear(x, self.target.weight, self.target.bias))
        if self.probes is not None:
            probe = torch.zeros_like(out, requires_grad=True)
            self.probes[self.name] = probe
            out = out + probe
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in={self.target.in_features}, out={self.target.out_features}"


def resolve_linear(root: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` at ``name`` in ``root``, or a one-line error naming what is there instead."""
    try:
        module = root.get_submodule(name)
    except AttributeError:
        raise ValueError(f"module {name!r} does not exist in {type(root).__name__}; name an nn.Linear") from None
    if isinstance(module, MaskedLinear):
        raise RuntimeError(f"{name!r} is already replaced by a decomposition; install one decomposition at a time")
    if not isinstance(module, nn.Linear):
        raise ValueError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear; only Linears decompose")
    return module


@contextlib.contextmanager
def stand_in(root: nn.Module, components: Mapping[str, Components]) -> Iterator[dict[str, MaskedLinear]]:
    """Replace each named ``nn.Linear`` of ``root`` by a :class:`MaskedLinear` over its components for the duration
    of the ``with`` block; the original modules are put back in ``finally`` (also after an exception)."""
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    masked: dict[str, MaskedLinear] = {}
    try:
        for name, comps in components.items():
            linear = resolve_linear(root, name)
            parent_name, _, attr = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            stand = MaskedLinear(name, linear, comps)
            setattr(parent, attr, stand)
            replaced.append((parent, attr, linear))
            masked[name] = stand
        yield masked
    finally:
        for parent, attr, linear in reversed(replaced):
            setattr(parent, attr, linear)
