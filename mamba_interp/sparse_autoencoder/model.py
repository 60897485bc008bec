"""The SAE module: one class for every architecture (see ``config.py`` for the forward rules).

Parameter names and shapes follow SAELens (``sae_lens`` ``SAE`` state dicts) so weights load there unchanged:
``W_enc`` [d, m], ``W_dec`` [m, d] (rows are dictionary atoms), ``b_enc`` [m], ``b_dec`` [d], and for JumpReLU a
per-latent ``threshold`` [m] (a parameter for ``jumprelu``; for ``batchtopk`` a buffer holding the exported θ in
every entry). The threshold is trained directly, not as a log: inputs are normalised (E‖x‖ = √d), so pre-activations
are O(1) and an additive step size suits them, and the saved tensor is then exactly the trained one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from mamba_interp.sparse_autoencoder.config import SAEConfig


class JumpReLUFn(torch.autograd.Function):
    """f = h·H(h − θ) with the straight-through estimator of Rajamanoharan et al. 2024b (arXiv 2407.14435).

    ∂f/∂h = H(h − θ); ∂f/∂θ = −(θ/ε)·K((h − θ)/ε) with the rectangle kernel K(z) = 1[|z| < ½].
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return h * (h > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_h = grad * (h > threshold)
        near = ((h - threshold).abs() < eps / 2).to(h.dtype)
        grad_theta = (-(threshold / eps) * near * grad).reshape(-1, threshold.shape[-1]).sum(0)
        return grad_h, grad_theta, None


class StepFn(torch.autograd.Function):
    """H(h − θ) (counts active latents, the L0) with ∂/∂θ = −(1/ε)·K((h − θ)/ε) and no gradient to h."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return (h > threshold).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((h - threshold).abs() < eps / 2).to(h.dtype)
        grad_theta = (-(1.0 / eps) * near * grad).reshape(-1, threshold.shape[-1]).sum(0)
        return torch.zeros_like(h), grad_theta, None


EVAL_BATCH = 2048
"""Tokens per batch when evaluating or encoding without gradients (``sae_metrics``, ``encode_activations``): the
[batch, d_sae] latents and their top-k buffers are the transient peak (at d_sae 6144, ~50 MB per copy)."""


def topk_per_token(acts: Tensor, k: int) -> Tensor:
    """Keep the k largest entries of each row of non-negative ``acts`` [t, m]; zero the rest."""
    values, idx = acts.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(acts).scatter_(-1, idx, values)


def relu_topk_per_token(h: Tensor, k: int) -> Tensor:
    """``topk_per_token(relu(h), k)`` for pre-activations h [t, m], equal in values and gradients, without the
    [t, m] copy relu(h): the k largest of h are the k largest of relu(h) (ties at 0 aside, which are 0 either way),
    so the ReLU is applied to the k kept values only."""
    values, idx = h.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(h).scatter_(-1, idx, torch.relu(values))


def topk_per_batch(acts: Tensor, k: int) -> Tensor:
    """BatchTopK: keep the k·t largest entries of non-negative ``acts`` [t, m] over the whole batch."""
    flat = acts.reshape(-1)
    values, idx = flat.topk(min(k * acts.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, values).view_as(acts)


class SparseAutoencoder(nn.Module):
    """x̂ = f(x) W_dec + b_dec with f(x) = σ((x·s − b_dec) W_enc + b_enc), and outputs divided by s.

    ``activation_scale`` s is the scalar input normalisation used in training (1 after folding it into the
    weights, which ``save_sae`` does on a copy). ``encode`` and ``decode`` always take and return raw activations.
    ``encode`` is the inference encoder; BatchTopK encodes with its exported threshold (a JumpReLU).
    """

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d, m = cfg.d_in, cfg.d_sae
        if generator is None:
            generator = torch.Generator().manual_seed(cfg.seed)
        # kaiming-uniform rows (SAELens), rescaled to the configured norm; W_enc = W_decᵀ (tied init)
        bound = math.sqrt(6.0 / d)
        w_dec = (torch.rand(m, d, generator=generator) * 2 - 1) * bound  # [m, d]
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * cfg.decoder_init_norm_value
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone().contiguous())  # [d, m]
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.threshold: Tensor | None
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((m,), cfg.jumprelu_init_threshold))
        elif cfg.architecture == "batchtopk":
            self.register_buffer("threshold", torch.zeros(m))  # θ, updated as an EMA during training
        else:
            self.register_buffer("threshold", None)
        self.activation_scale: float = 1.0
        self.training_history: Any = None  # a TrainHistory once trained (training.py)

    # ---- forward pieces ----------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """h = (x·s − b_dec) W_enc + b_enc for raw activations x [..., d]; returns [..., m]."""
        x = x.to(self.W_enc.dtype) * self.activation_scale
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, h: Tensor) -> Tensor:
        """Inference activation σ(h) [..., m]."""
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(h)
        if arch == "topk":
            return relu_topk_per_token(h.reshape(-1, h.shape[-1]), self.cfg.k).view_as(h)
        threshold = self.threshold
        assert threshold is not None
        return torch.relu(h) * (h > threshold)

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations f [..., m] of raw activations x [..., d]."""
        return self.activation(self.pre_acts(x))

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction x̂ [..., d] (raw units) of latents f [..., m]."""
        return (f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.activation_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # ---- weight surgery ----------------------------------------------------------------------
    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Fold s into the weights (SAELens ``fold_activation_norm_scaling_factor``); latents are unchanged.

        h = (x·s − b)W + c = (x − b/s)(sW) + c, and x̂ = (fW_dec + b)/s = f(W_dec/s) + b/s.
        """
        s = self.activation_scale
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.activation_scale = 1.0

    @torch.no_grad()
    def clamp_threshold(self, minimum: float = 1e-6) -> None:
        """Keep a trained JumpReLU threshold positive (θ ≤ 0 would pass negative pre-activations)."""
        if self.cfg.architecture == "jumprelu":
            self.threshold.clamp_(min=minimum)

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each (unit) decoder row, g ← g − (g·ŵ)ŵ (Bricken et al. 2023)."""
        if self.W_dec.grad is None:
            return
        # g ← g − (g·w / |w|²) w: the same projection without [m, d] temporaries (a per-step cost at d_sae · d)
        w, g = self.W_dec.detach(), self.W_dec.grad
        coef = torch.einsum("md,md->m", g, w) / torch.einsum("md,md->m", w, w).clamp_min(1e-24)  # (m,)
        g.addcmul_(w, coef[:, None], value=-1.0)

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        scale = f"activation_scale={self.activation_scale:.4g}"
        return f"architecture={c.architecture!r}, d_in={c.d_in}, d_sae={c.d_sae}{k}, {scale}"
