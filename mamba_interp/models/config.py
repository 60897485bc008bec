"""Configuration of a hooked Mamba-1 / Mamba-2 language model.

Index letters used across ``mamba_interp.models`` (one glossary for the whole package):

    b  batch                      l  position / sequence length
    d  d_model                    e  d_inner = expand * d_model         (Mamba paper "ED")
    n  d_state                    r  dt_rank                           (Mamba-1 only)
    h  heads (Mamba-2)            p  head_dim, e = h * p                (Mamba-2 only)
    g  groups of B/C (Mamba-2)    k  conv width (d_conv)
    c  chunk index                s  position inside a chunk
    v  vocabulary (padded)

Field names follow ``mamba_ssm`` (``d_model``, ``n_layer``, ``ssm_cfg`` keys); the loaders translate
transformers' names (``hidden_size``, ``state_size``, ...) into these.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

ARCHS = ("mamba1", "mamba2")


def _fail(msg: str) -> None:
    raise ValueError(msg)


@dataclass(frozen=True)
class MambaConfig:
    """Architecture of a Mamba-1 or Mamba-2 LM. Derived sizes are properties (``d_inner``, ``nheads``, ...)."""

    arch: Literal["mamba1", "mamba2"] = "mamba1"
    d_model: int = 64
    n_layer: int = 2
    vocab_size: int = 16
    """Number of real tokens; the embedding is padded up to ``pad_vocab_size_multiple``."""
    pad_vocab_size_multiple: int = 1
    d_state: int = 16  # N in the papers
    d_conv: int = 4
    expand: int = 2  # E in the Mamba paper
    dt_rank: int | str = "auto"  # Mamba-1: R = ceil(d_model / 16) when "auto"
    headdim: int = 64  # Mamba-2: P
    ngroups: int = 1  # Mamba-2: groups sharing B and C
    chunk_size: int = 256  # Mamba-2: chunk of the SSD algorithm used by the checkpoint (numerics only)
    dt_limit: tuple[float, float] = (0.0, math.inf)
    """Mamba-2 clamp of Δ after softplus (transformers' ``time_step_limit``)."""
    D_has_hdim: bool = False  # Mamba-2: D per channel instead of per head
    conv_bias: bool = True
    bias: bool = False  # in_proj / out_proj bias
    norm_eps: float = 1e-5  # block RMSNorms, norm_f and (Mamba-2) the gated norm
    bcdt_rms_eps: float | None = None
    """Falcon-Mamba: weightless RMSNorm on δ, B and C with this epsilon; None for plain Mamba."""
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    # initialisation (used only by a random init; loading overwrites every parameter)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)  # Mamba-2
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Free-form provenance (e.g. the source ``config.json``); not used by the model."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            _fail(f"MambaConfig.arch={self.arch!r} is unknown; use one of {ARCHS}")
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(f"MambaConfig.{name}={value!r} must be a positive integer")
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank <= 0):
            _fail(f"MambaConfig.dt_rank={self.dt_rank!r} must be a positive integer or 'auto'")
        if self.norm_eps <= 0:
            _fail(f"MambaConfig.norm_eps={self.norm_eps!r} must be > 0")
        lo, hi = self.dt_limit
        if not 0.0 <= lo < hi:
            _fail(f"MambaConfig.dt_limit={self.dt_limit!r} must satisfy 0 <= low < high")
        object.__setattr__(self, "dt_limit", (float(lo), float(hi)))
        object.__setattr__(self, "A_init_range", tuple(float(a) for a in self.A_init_range))
        if self.arch == "mamba2":
            if self.headdim <= 0 or self.d_inner % self.headdim:
                _fail(
                    f"Mamba-2 needs d_inner = expand*d_model = {self.d_inner} divisible by headdim={self.headdim}; "
                    "choose headdim dividing it"
                )
            if self.ngroups <= 0 or self.nheads % self.ngroups:
                _fail(f"Mamba-2 needs nheads={self.nheads} divisible by ngroups={self.ngroups}")
            if self.chunk_size <= 0:
                _fail(f"MambaConfig.chunk_size={self.chunk_size!r} must be > 0")
            if self.bcdt_rms_eps is not None:
                _fail("bcdt_rms_eps (Falcon-Mamba) applies to Mamba-1 only")

    # ---- derived sizes ------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:  # e
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:  # r (Mamba-1)
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def nheads(self) -> int:  # h (Mamba-2)
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:  # channels the depthwise conv sees
        return self.d_inner if self.arch == "mamba1" else self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def padded_vocab_size(self) -> int:  # v
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        out["dt_limit"] = list(self.dt_limit)
        out["A_init_range"] = list(self.A_init_range)
        if math.isinf(self.dt_limit[1]):
            out["dt_limit"][1] = "inf"
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MambaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MambaConfig fields {unknown}; known fields are {sorted(known)}")
        data = dict(data)
        if "dt_limit" in data:
            data["dt_limit"] = tuple(float(x) for x in data["dt_limit"])
        if "A_init_range" in data:
            data["A_init_range"] = tuple(float(x) for x in data["A_init_range"])
        return cls(**data)

    def replace(self, **changes: Any) -> MambaConfig:
        return dataclasses.replace(self, **changes)
