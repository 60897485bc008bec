"""Configuration of a sparse autoencoder and of its training run (one frozen dataclass for both).

Index letters used across ``mamba_interp.sparse_autoencoder``:

    t  tokens (rows of an activation matrix)     d  d_in, the width of the hooked activation
    m  d_sae, the number of latents               k  active latents per token (TopK) or mean per token (BatchTopK)
    v  ground-truth variables (feature–variable correlation)

Architectures (as in SAELens; Bricken et al. 2023, Rajamanoharan et al. 2024, Gao et al. 2024):

* ``relu``      f = ReLU(h); loss ‖x − x̂‖² + λ Σ_i f_i‖W_dec,i‖ with an unconstrained decoder
                (Anthropic April-2024 update, SAELens ``standard``).
* ``topk``      f = TopK_k(ReLU(h)); unit-norm decoder with the parallel gradient removed; AuxK on dead
                latents (Gao et al. 2024).
* ``batchtopk`` the top k·B activations over a batch of B tokens; an inference threshold θ (EMA of the smallest
                kept activation) is exported, so the saved SAE is a JumpReLU (Bussmann et al. 2024).
* ``jumprelu``  f = h·H(h − θ_i); L0 penalty λ Σ_i H(h_i − θ_i); straight-through estimator with a rectangle
                kernel of width ε for the gradients w.r.t. θ (Rajamanoharan et al. 2024b).

with h = (x − b_dec) W_enc + b_enc.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
NORMALIZATIONS = ("none", "expected_average_only_in")


def _fail(msg: str) -> None:
    raise ValueError(msg)


@dataclass(frozen=True)
class SAEConfig:
    """Shape, architecture and training recipe of one SAE. Validated on construction."""

    d_in: int
    d_sae: int
    architecture: Literal["relu", "topk", "batchtopk", "jumprelu"] = "topk"
    k: int | None = None
    """Active latents per token (``topk``) or on average per token (``batchtopk``); unused otherwise."""
    l1_coefficient: float = 0.0
    """Sparsity coefficient λ: weight of the decoder-norm-weighted L1 (``relu``) or of the L0 (``jumprelu``)."""
    lr: float = 1e-3
    steps: int = 3000
    batch_size: int = 512
    seed: int = 0
    # ---- optimisation schedule (fractions of ``steps``, so a recipe transfers across run lengths) ----
    lr_warmup_frac: float = 0.1
    """Linear LR warm-up from 0 over this fraction of the steps."""
    lr_decay_frac: float = 0.2
    """Linear LR decay to 0 over this final fraction of the steps."""
    l1_warmup_frac: float = 0.1
    """Linear warm-up of the sparsity coefficient λ (``relu``, ``jumprelu``)."""
    grad_clip: float = 1.0  # SAELens hard-codes 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # ---- initialisation and normalisation ----
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    b_dec_init_samples: int = 8192
    """Tokens used for the geometric median / mean of b_dec (the first ones of a seeded shuffle)."""
    decoder_init_norm: float | None = None
    """Row norm of W_dec at init; None: 1 for unit-norm decoders, 0.1 for ``relu`` (SAELens default)."""
    unit_norm_decoder: bool | None = None
    """Keep decoder rows at unit norm; None: True for topk/batchtopk/jumprelu, False for relu (April update)."""
    normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in"
    """Scale the input by s = √d / E‖x‖ during training; s is folded into the weights when saved (SAELens name)."""
    # ---- AuxK (topk, batchtopk) ----
    aux_k: int | None = None
    """Dead latents used by AuxK; None: d_in // 2 (Gao et al.)."""
    aux_coefficient: float = 1 / 32
    dead_window_tokens: int = 200_000
    """A latent is dead once it has not fired for this many training tokens (counted in tokens, not steps)."""
    # ---- JumpReLU / BatchTopK thresholds ----
    jumprelu_init_threshold: float = 0.5
    """Initial θ, in normalised units where pre-activations are O(1) (Rajamanoharan et al. use 0.001 with
    E‖x‖² = 1 and ~100k steps; a larger start reaches a sparse code in a few thousand steps)."""
    jumprelu_bandwidth: float = 0.5
    """Width ε of the rectangle kernel of the straight-through estimator (Rajamanoharan et al. 2024b),
    in the same normalised units."""
    threshold_ema: float = 0.01
    """BatchTopK: θ ← (1 − r)θ + r·min(kept activation) with this rate r (SAELens ``topk_threshold_lr``)."""
    log_every: int = 50
    device: str | None = None
    """Training device; None: the device of the activations."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "steps", "batch_size", "b_dec_init_samples", "dead_window_tokens", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(f"SAEConfig.{name}={value!r} must be a positive integer")
        if self.architecture not in ARCHITECTURES:
            _fail(f"SAEConfig.architecture={self.architecture!r} is unknown; use one of {ARCHITECTURES}")
        if self.architecture in ("topk", "batchtopk"):
            if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 < self.k <= self.d_sae:
                _fail(
                    f"architecture={self.architecture!r} needs an integer k in [1, d_sae={self.d_sae}]; "
                    f"got k={self.k!r}"
                )
        if self.architecture in ("relu", "jumprelu") and not self.l1_coefficient > 0:
            _fail(
                f"architecture={self.architecture!r} needs l1_coefficient > 0 (the sparsity penalty); "
                f"got {self.l1_coefficient!r}"
            )
        if self.l1_coefficient < 0:
            _fail(f"SAEConfig.l1_coefficient={self.l1_coefficient!r} must be >= 0")
        if not self.lr > 0:
            _fail(f"SAEConfig.lr={self.lr!r} must be > 0")
        for name in ("lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(f"SAEConfig.{name}={getattr(self, name)!r} must be in [0, 1]")
        if self.lr_warmup_frac + self.lr_decay_frac > 1.0:
            _fail("SAEConfig.lr_warmup_frac + lr_decay_frac must be <= 1 (warm-up and decay would overlap)")
        if not self.grad_clip > 0:
            _fail(f"SAEConfig.grad_clip={self.grad_clip!r} must be > 0")
        b1, b2 = self.adam_betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            _fail(f"SAEConfig.adam_betas={self.adam_betas!r} must lie in [0, 1)")
        object.__setattr__(self, "adam_betas", (float(b1), float(b2)))
        if self.b_dec_init not in B_DEC_INITS:
            _fail(f"SAEConfig.b_dec_init={self.b_dec_init!r} is unknown; use one of {B_DEC_INITS}")
        if self.normalize_activations not in NORMALIZATIONS:
            _fail(
                f"SAEConfig.normalize_activations={self.normalize_activations!r} is unknown; "
                f"use one of {NORMALIZATIONS}"
            )
        if self.decoder_init_norm is not None and not self.decoder_init_norm > 0:
            _fail(f"SAEConfig.decoder_init_norm={self.decoder_init_norm!r} must be > 0 or None")
        if self.aux_k is not None and not 0 < self.aux_k <= self.d_sae:
            _fail(f"SAEConfig.aux_k={self.aux_k!r} must be in [1, d_sae] or None")
        if self.aux_coefficient < 0:
            _fail(f"SAEConfig.aux_coefficient={self.aux_coefficient!r} must be >= 0")
        if not (self.jumprelu_init_threshold > 0 and self.jumprelu_bandwidth > 0):
            _fail("SAEConfig.jumprelu_init_threshold and jumprelu_bandwidth must be > 0")
        if not 0.0 < self.threshold_ema <= 1.0:
            _fail(f"SAEConfig.threshold_ema={self.threshold_ema!r} must be in (0, 1]")

    # ---- derived settings ----------------------------------------------------------------------
    @property
    def uses_unit_norm_decoder(self) -> bool:
        if self.unit_norm_decoder is not None:
            return self.unit_norm_decoder
        return self.architecture != "relu"

    @property
    def decoder_init_norm_value(self) -> float:
        if self.decoder_init_norm is not None:
            return self.decoder_init_norm
        return 1.0 if self.uses_unit_norm_decoder else 0.1

    @property
    def aux_k_value(self) -> int:
        return self.aux_k if self.aux_k is not None else min(max(self.d_in // 2, 1), self.d_sae)

    @property
    def uses_auxk(self) -> bool:
        return self.architecture in ("topk", "batchtopk") and self.aux_coefficient > 0

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAEConfig fields {unknown}; known fields are {sorted(known)}")
        data = dict(data)
        if "adam_betas" in data:
            data["adam_betas"] = tuple(data["adam_betas"])
        return cls(**data)

    def replace(self, **changes: Any) -> SAEConfig:
        return dataclasses.replace(self, **changes)
