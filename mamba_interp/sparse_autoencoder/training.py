"""Training loop: ``train_sae(activations [t, d], cfg) -> SparseAutoencoder``.

Recipe (SAELens, saprmarks/dictionary_learning): b_dec at the geometric median (Weiszfeld) or the mean; scalar
input normalisation s = √d / E‖x‖; Adam with gradient-norm clipping; linear LR warm-up, constant, linear decay to 0;
linear warm-up of the sparsity coefficient; unit-norm decoder rows with the parallel gradient removed (TopK,
BatchTopK, JumpReLU); AuxK on latents dead for ``dead_window_tokens`` tokens (Gao et al. 2024, arXiv 2406.04093,
with their variance normalisation of the auxiliary MSE).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mamba_interp.sparse_autoencoder.config import SAEConfig
from mamba_interp.sparse_autoencoder.model import JumpReLUFn, SparseAutoencoder, StepFn, topk_per_batch, topk_per_token


@dataclass
class TrainHistory:
    """Logged every ``cfg.log_every`` steps (lists share one index), plus end-of-run summaries."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    """Σ_d (x − x̂)², mean over the batch, in normalised units."""
    sparsity_loss: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    """Batch FVU (Σ‖e‖² / Σ‖x − x̄_batch‖²)."""
    dead_fraction: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    coefficient: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    activation_scale: float = 1.0
    tokens_since_fired: Tensor | None = None
    """[m] tokens since each latent last fired, at the end of training."""

    def summary(self) -> dict[str, float]:
        last = {
            name: getattr(self, name)[-1]
            for name in ("loss", "mse", "l0", "fvu", "dead_fraction")
            if getattr(self, name)
        }
        return {
            **last,
            "seconds": self.seconds,
            "tokens": float(self.tokens),
            "activation_scale": self.activation_scale,
        }


@torch.no_grad()
def geometric_median(x: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld iteration from the mean (dictionary_learning ``geometric_median``); float64; returns [d]."""
    x = x.double()
    g = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - g).norm(dim=1).clamp_min(1e-12)
        g_new = (w[:, None] * x).sum(0) / w.sum()
        done = (g_new - g).norm() < tol
        g = g_new
        if done:
            break
    return g


@torch.no_grad()
def activation_norm_scale(x: Tensor, chunk: int = 65536) -> float:
    """s = √d / E‖x‖ (SAELens ``expected_average_only_in``), so that the scaled activations have E‖x‖ = √d."""
    total, n = 0.0, 0
    for start in range(0, x.shape[0], chunk):
        block = x[start : start + chunk].double()
        total += block.norm(dim=1).sum().item()
        n += block.shape[0]
    mean_norm = total / max(n, 1)
    if mean_norm == 0.0:
        raise ValueError("activations are all zero; cannot normalise them (use normalize_activations='none')")
    return math.sqrt(x.shape[1]) / mean_norm


def lr_multiplier(step: int, cfg: SAEConfig) -> float:
    """Linear warm-up from 0, constant 1, linear decay to 0 over the final ``lr_decay_frac`` of the steps."""
    warm = int(round(cfg.lr_warmup_frac * cfg.steps))
    decay = int(round(cfg.lr_decay_frac * cfg.steps))
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if decay > 0 and step >= cfg.steps - decay:
        return max(cfg.steps - step, 0) / decay
    return 1.0


def coefficient_multiplier(step: int, cfg: SAEConfig) -> float:
    """λ_t / λ: linear warm-up over the first ``l1_warmup_frac`` of the steps (SAELens ``CoefficientScheduler``)."""
    warm = int(round(cfg.l1_warmup_frac * cfg.steps))
    return 1.0 if warm == 0 else min(1.0, (step + 1) / warm)


def _variance(x: Tensor) -> Tensor:
    """mean_b ‖x − x̄‖² over a batch [t, d] (the FVU denominator)."""
    return (x - x.mean(0)).pow(2).sum(-1).mean()


def training_loss(
    sae: SparseAutoencoder, x: Tensor, coefficient: float, dead: Tensor | None
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Loss of one batch x [t, d] of *normalised* activations.

    Returns (loss, f [t, m], parts), the parts being mse, sparsity, aux and fvu (detached except the loss).
    """
    cfg = sae.cfg
    h = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # [t, m]
    arch = cfg.architecture
    if arch == "relu":
        f = torch.relu(h)
    elif arch == "topk":
        f = topk_per_token(torch.relu(h), cfg.k)
    elif arch == "batchtopk":
        f = topk_per_batch(torch.relu(h), cfg.k)
    else:
        f = JumpReLUFn.apply(h, sae.threshold, cfg.jumprelu_bandwidth)
    x_hat = f @ sae.W_dec + sae.b_dec  # [t, d]
    err = x - x_hat
    mse = err.pow(2).sum(-1).mean()
    zero = torch.zeros((), device=x.device)
    sparsity, aux = zero, zero
    if arch == "relu":
        sparsity = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    elif arch == "jumprelu":
        sparsity = StepFn.apply(h, sae.threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
    if cfg.uses_auxk and dead is not None and bool(dead.any()):
        # AuxK (Gao et al. 2024): the top-k_aux dead latents model the residual e; the auxiliary MSE is
        # normalised by Var(e) and rescaled by Var(x) so it sits in the units of the main MSE, as in their FVU form
        n_aux = min(cfg.aux_k_value, int(dead.sum()))
        dead_acts = torch.where(dead, torch.relu(h), torch.zeros_like(h))
        e = err.detach()
        e_hat = topk_per_token(dead_acts, n_aux) @ sae.W_dec  # [t, d]
        aux_mse = (e_hat - e).pow(2).sum(-1).mean()
        aux = aux_mse / _variance(e).clamp_min(1e-12) * _variance(x).detach()
    loss = mse + coefficient * sparsity + cfg.aux_coefficient * aux
    fvu = mse.detach() / _variance(x).clamp_min(1e-12)
    return loss, f, {"mse": mse.detach(), "sparsity": sparsity.detach(), "aux": aux.detach(), "fvu": fvu}


def _check_activations(activations: Tensor, cfg: SAEConfig) -> None:
    if activations.ndim != 2 or activations.shape[1] != cfg.d_in:
        raise ValueError(f"activations must have shape [tokens, d_in={cfg.d_in}]; got {tuple(activations.shape)}")
    if activations.shape[0] < cfg.batch_size:
        raise ValueError(
            f"only {activations.shape[0]} activation rows for batch_size={cfg.batch_size}; "
            "collect more or lower batch_size"
        )
    if not activations.is_floating_point():
        raise ValueError(f"activations must be floating point; got {activations.dtype}")


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Row indices of successive batches from seeded shuffles of range(n), one epoch after another."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def train_sae(activations: Tensor, config: SAEConfig) -> SparseAutoencoder:
    """Train an SAE on the rows of ``activations`` [t, d] with ``config``; deterministic per ``config.seed``.

    The returned SAE keeps its training normalisation as ``activation_scale`` (``encode``/``decode`` take raw
    activations either way); ``save_sae`` folds it into the weights. ``sae.training_history`` holds the log.
    """
    cfg = config
    _check_activations(activations, cfg)
    device = torch.device(cfg.device) if cfg.device is not None else activations.device
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = SparseAutoencoder(cfg, generator=gen).to(device)
    start_time = time.perf_counter()

    n = activations.shape[0]
    scale = activation_norm_scale(activations) if cfg.normalize_activations == "expected_average_only_in" else 1.0
    with torch.no_grad():
        if cfg.b_dec_init != "zeros":
            idx = torch.randperm(n, generator=gen)[: cfg.b_dec_init_samples]
            sample = activations[idx].to(device).double() * scale
            centre = geometric_median(sample) if cfg.b_dec_init == "geometric_median" else sample.mean(0)
            sae.b_dec.copy_(centre.float())

    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    tokens_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
    history = TrainHistory(activation_scale=scale)
    batches = _batches(n, cfg.batch_size, gen)
    for step in range(cfg.steps):
        lr = cfg.lr * lr_multiplier(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        coefficient = cfg.l1_coefficient * coefficient_multiplier(step, cfg)
        x = activations[next(batches)].to(device=device, dtype=torch.float32) * scale  # [t, d]
        dead = tokens_since_fired >= cfg.dead_window_tokens
        loss, f, parts = training_loss(sae, x, coefficient, dead)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.uses_unit_norm_decoder:
            sae.remove_parallel_decoder_grad()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        optimizer.step()
        if cfg.uses_unit_norm_decoder:
            sae.normalize_decoder_rows()
        sae.clamp_threshold()
        with torch.no_grad():
            fired = (f != 0).any(0)
            tokens_since_fired += cfg.batch_size
            tokens_since_fired[fired] = 0
            if cfg.architecture == "batchtopk":
                kept = f[f > 0]
                if kept.numel():
                    r = cfg.threshold_ema
                    sae.threshold.mul_(1 - r).add_(r * kept.min())
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            history.step.append(step)
            history.loss.append(loss.item())
            history.mse.append(parts["mse"].item())
            history.sparsity_loss.append(parts["sparsity"].item())
            history.aux_loss.append(parts["aux"].item())
            history.l0.append((f != 0).sum(-1).float().mean().item())
            history.fvu.append(parts["fvu"].item())
            history.dead_fraction.append(dead.float().mean().item())
            history.lr.append(lr)
            history.coefficient.append(coefficient)
    history.seconds = time.perf_counter() - start_time
    history.tokens = cfg.steps * cfg.batch_size
    history.tokens_since_fired = tokens_since_fired.cpu()
    sae.activation_scale = scale
    sae.training_history = history
    sae.eval()
    return sae
