"""Circuits as sets of units ``(layer, hook, position_class, channels)``, and matched random controls.

A unit addresses one hook of one layer at the positions of one position class (``activation_patching.sites``):
all its channels (``channels=None``), some channels (dim 2 of the activation: channels, heads, groups or
d_model dims), some flattened feature dims (``flat=True``: a probe's support), or a subspace (``basis``: k
directions of the flattened feature axis, e.g. SAE decoder directions). A circuit's *size* is its number of
channels, dims or directions.

Random controls (component sets matched in size, layer and type): the same number of
channels (dims, directions) at every (layer, hook, position class) of the circuit, drawn uniformly — random
orthonormal bases (QR of a Gaussian) for subspace units.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mamba_interp.activation_patching.sites import MODEL_LEVEL, n_channels
from mamba_interp.models.cache import get_act_name


@dataclass(frozen=True)
class Unit:
    """One (layer, hook, position class) site and the channels, dims or directions patched there."""

    layer: int
    hook: str
    """Short hook name (``"y"``, ``"ssm_state"``, ``"resid_post"``, ...); ``layer`` is ignored for ``embed``."""
    position_class: str
    channels: tuple[int, ...] | None = None
    flat: bool = False
    """``channels`` index the flattened feature axis (prod of the dims after b, l) instead of dim 2."""
    basis: tuple[tuple[float, ...], ...] | None = None
    """k directions of the flattened feature axis; the unit patches their span."""

    def __post_init__(self) -> None:
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(sorted({int(c) for c in self.channels})))
            if not self.channels:
                raise ValueError(f"unit {self.site}: channels is empty (use None for all channels)")
        if self.basis is not None and self.channels is not None:
            raise ValueError(f"unit {self.site}: give channels or a basis, not both")

    @property
    def site(self) -> tuple[int, str, str]:
        return (self.layer, self.hook, self.position_class)

    @property
    def hook_name(self) -> str:
        return get_act_name(self.hook) if self.hook in MODEL_LEVEL else get_act_name(self.hook, self.layer)

    def size(self, feature_shape: Sequence[int]) -> int:
        if self.basis is not None:
            return len(self.basis)
        if self.channels is not None:
            return len(self.channels)
        total = 1
        for s in feature_shape:
            total *= int(s)
        return total if self.flat else n_channels(feature_shape)

    def basis_tensor(self) -> Tensor | None:
        """[F, k] orthonormal columns spanning ``basis`` (QR)."""
        if self.basis is None:
            return None
        q, _ = torch.linalg.qr(torch.tensor(self.basis, dtype=torch.float64).T)
        return q.float()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "hook": self.hook, "position_class": self.position_class,
                               "channels": None if self.channels is None else list(self.channels)}
        if self.flat:
            out["flat"] = True
        if self.basis is not None:
            out["basis"] = [list(v) for v in self.basis]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Unit:
        basis = d.get("basis")
        return cls(int(d["layer"]), str(d["hook"]), str(d["position_class"]),
                   None if d.get("channels") is None else tuple(d["channels"]), bool(d.get("flat", False)),
                   None if basis is None else tuple(tuple(float(x) for x in v) for v in basis))


@dataclass
class Circuit:
    """A named set of units, with where it came from (``source``: "atp", "sae", ...) and free-form ``info``."""

    name: str
    units: tuple[Unit, ...]
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.units = merge_units(self.units)

    def size(self, shapes: Mapping[str, Sequence[int]]) -> int:
        return sum(u.size(shapes[u.hook_name]) for u in self.units)

    def layout(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """Size per site, ``"L<layer> <hook> @<class>"`` -> channels."""
        out: dict[str, int] = defaultdict(int)
        for u in self.units:
            out[f"L{u.layer} {u.hook} @{u.position_class}"] += u.size(shapes[u.hook_name])
        return dict(out)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "units": [u.to_dict() for u in self.units],
                "info": self.info}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Circuit:
        return cls(str(d["name"]), tuple(Unit.from_dict(u) for u in d["units"]), str(d.get("source", "")),
                   dict(d.get("info", {})))


def merge_units(units: Iterable[Unit]) -> tuple[Unit, ...]:
    """One unit per site and kind: channel sets united (all channels wins), bases kept as given."""
    channel_sets: dict[tuple, set[int] | None] = {}
    others: list[Unit] = []
    for u in units:
        if u.basis is not None:
            others.append(u)
            continue
        key = (*u.site, u.flat)
        if key in channel_sets and channel_sets[key] is None:
            continue
        channel_sets[key] = None if u.channels is None else channel_sets.get(key, set()) | set(u.channels)
    merged = [Unit(l, h, c, None if ch is None else tuple(ch), flat) for (l, h, c, flat), ch in channel_sets.items()]
    return tuple(sorted(merged + others, key=lambda u: (u.layer, u.hook, u.position_class, u.flat)))


def random_circuits(circuit: Circuit, n: int, shapes: Mapping[str, Sequence[int]], seed: int = 0) -> list[Circuit]:
    """``n`` random controls of ``circuit``: per unit, as many channels (dims, directions) at the same site,
    drawn uniformly. Units with all channels cannot vary; ``info["fixed_units"]`` counts them."""
    g = torch.Generator().manual_seed(int(seed))
    fixed = sum(1 for u in circuit.units if u.channels is None and u.basis is None)
    out = []
    for r in range(n):
        units = []
        for u in circuit.units:
            shape = shapes[u.hook_name]
            total = 1
            for s in shape:
                total *= int(s)
            if u.basis is not None:
                q, _ = torch.linalg.qr(torch.randn(total, len(u.basis), generator=g, dtype=torch.float64))
                units.append(Unit(u.layer, u.hook, u.position_class, basis=tuple(map(tuple, q.T.tolist()))))
            elif u.channels is None:
                units.append(u)
            else:
                pool = total if u.flat else n_channels(shape)
                pick = torch.randperm(pool, generator=g)[: len(u.channels)]
                units.append(Unit(u.layer, u.hook, u.position_class, tuple(pick.tolist()), u.flat))
        out.append(Circuit(f"{circuit.name}/random{r}", tuple(units), "random",
                           {"control_of": circuit.name, "fixed_units": fixed}))
    return out
