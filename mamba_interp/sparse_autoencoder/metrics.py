"""SAE quality metrics, one documented definition each (the variants SAELens and SAEBench report).

* L0          E_tokens #{i : f_i ≠ 0}.
* FVU         Σ‖x − x̂‖² / Σ‖x − x̄‖², streamed in float64 as E‖e‖² / (E‖x‖² − ‖E x‖²) (SAELens 6.54
              ``ExplainedVarianceCalculator``; not the per-token "legacy" ratio, not the SAELens-6.18 bug).
* density     fraction of tokens on which a latent fires; dead: density 0 over the evaluation set; dense: > 0.1.
* shrinkage   γ = E‖x̂‖² / E[x·x̂] (relative reconstruction bias, Gated-SAE paper Eq. 10; γ < 1 is shrinkage),
              l2_ratio = E[‖x̂‖/‖x‖], cossim = E[cos(x, x̂)].
* MMCS        (1/n) Σ_i max_j cos(g_i, w_j), ground truth → learned (Sharkey et al. 2022).
* MCC         mean |cos| over a one-to-one Hungarian matching (SAELens ``mean_correlation_coefficient``).
* loss recovered  (L_abl − L_SAE)/(L_abl − L_clean) against zero and mean ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from mamba_interp.sparse_autoencoder.model import EVAL_BATCH, SparseAutoencoder
from mamba_interp.sparse_autoencoder.training import ActivationChunks


def _unit_rows(w: Tensor) -> Tensor:
    w = w.detach().double()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_j) [n, m] for row sets a [n, d], b [m, d] (float64)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two [*, d] matrices with the same d; got {tuple(a.shape)} and {tuple(b.shape)}")
    return _unit_rows(a) @ _unit_rows(b).T


def mmcs(true_dictionary: Tensor, learned_dictionary: Tensor) -> float:
    """Mean over true features [n, d] of the max cosine similarity with any learned atom [m, d]."""
    return cosine_matrix(true_dictionary, learned_dictionary).max(dim=1).values.mean().item()


@dataclass
class RecoveryMetrics:
    """How well a learned dictionary recovers a true one (rows are atoms)."""

    mmcs: float
    mcc: float
    """Mean |cos| over the Hungarian one-to-one matching (≤ MMCS; penalises duplicate atoms)."""
    frac_above_0_9: float
    frac_above_0_99: float
    uniqueness: float
    """Distinct true features that are some learned atom's best match, over the number of learned atoms."""
    max_cos: Tensor
    """[n] best cosine of each true feature."""


def dictionary_recovery(true_dictionary: Tensor, learned_dictionary: Tensor) -> RecoveryMetrics:
    cos = cosine_matrix(true_dictionary, learned_dictionary)  # [n, m]
    best = cos.max(dim=1).values
    rows, cols = linear_sum_assignment(-cos.abs().numpy())
    mcc = float(cos.abs().numpy()[rows, cols].mean())
    uniqueness = cos.argmax(dim=0).unique().numel() / cos.shape[1]
    return RecoveryMetrics(
        mmcs=best.mean().item(),
        mcc=mcc,
        frac_above_0_9=(best > 0.9).double().mean().item(),
        frac_above_0_99=(best > 0.99).double().mean().item(),
        uniqueness=uniqueness,
        max_cos=best.float(),
    )


class FVUAccumulator:
    """Streaming FVU: accumulate Σ‖e‖², Σ‖x‖², Σx and N in float64; FVU = E‖e‖² / (E‖x‖² − ‖E x‖²)."""

    def __init__(self) -> None:
        self.n = 0
        self.sum_err2 = 0.0
        self.sum_x2 = 0.0
        self.sum_x: Tensor | None = None

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x, x_hat = x.detach().double().reshape(-1, x.shape[-1]), x_hat.detach().double().reshape(-1, x.shape[-1])
        self.n += x.shape[0]
        self.sum_err2 += (x - x_hat).pow(2).sum().item()
        self.sum_x2 += x.pow(2).sum().item()
        s = x.sum(0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s

    @property
    def total_variance(self) -> float:
        """E‖x − x̄‖² per token."""
        assert self.sum_x is not None, "no data"
        return self.sum_x2 / self.n - (self.sum_x / self.n).pow(2).sum().item()

    @property
    def fvu(self) -> float:
        return (self.sum_err2 / self.n) / max(self.total_variance, 1e-300)


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """FVU of a reconstruction x̂ of x (both [..., d]), float64."""
    acc = FVUAccumulator()
    acc.update(x, x_hat)
    return acc.fvu


@dataclass
class SAEMetrics:
    """Evaluation of an SAE on activations x [t, d] (raw units)."""

    l0: float
    fvu: float
    explained_variance: float
    mse: float
    """E‖x − x̂‖² per token (raw units)."""
    dead_fraction: float
    dense_fraction: float
    """Fraction of latents firing on more than ``dense_threshold`` of the tokens."""
    n_dead: int
    n_dense: int
    shrinkage: float
    """γ = E‖x̂‖² / E[x·x̂]; < 1 means the SAE shrinks its reconstructions."""
    l2_ratio: float
    cossim: float
    n_tokens: int
    density: Tensor
    """[m] firing frequency of each latent."""

    def to_dict(self) -> dict[str, float | int]:
        return {k: v for k, v in self.__dict__.items() if k != "density"}


@torch.no_grad()
def sae_metrics(sae: SparseAutoencoder, x: Tensor | ActivationChunks, batch_size: int = EVAL_BATCH,
                dense_threshold: float = 0.1) -> SAEMetrics:
    """L0, FVU, dead/dense fractions and shrinkage of ``sae`` on the rows of x [t, d] (a tensor, or chunks read one
    at a time; streamed, float64)."""
    if isinstance(x, ActivationChunks):
        width, n, chunks = x.width, x.n, iter(x)
    else:
        x = x.reshape(-1, x.shape[-1])
        width, n, chunks = x.shape[-1], x.shape[0], iter([x])
    if width != sae.cfg.d_in:
        raise ValueError(f"x has width {width} but the SAE has d_in={sae.cfg.d_in}")
    acc = FVUAccumulator()
    fires = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    l0_sum = xhat2 = x_dot_xhat = l2_ratio = cos_sum = 0.0
    batches = (c[start:start + batch_size] for c in chunks for start in range(0, c.shape[0], batch_size))
    for xb in batches:
        xb = xb.to(sae.device, torch.float32)
        f = sae.encode(xb)
        x_hat = sae.decode(f)
        acc.update(xb, x_hat)
        active = f != 0
        del f  # the [batch, m] latents are the largest buffers here: gone before the float64 sums
        fires += active.sum(0).double().cpu()
        l0_sum += active.sum().item()
        del active
        xd, xhd = xb.double(), x_hat.double()
        xhat2 += xhd.pow(2).sum().item()
        x_dot_xhat += (xd * xhd).sum().item()
        xn, xhn = xd.norm(dim=-1), xhd.norm(dim=-1)
        l2_ratio += (xhn / xn.clamp_min(1e-12)).sum().item()
        cos_sum += ((xd * xhd).sum(-1) / (xn * xhn).clamp_min(1e-12)).sum().item()
    density = fires / n
    n_dead = int((density == 0).sum())
    n_dense = int((density > dense_threshold).sum())
    m = sae.cfg.d_sae
    f_vu = acc.fvu
    return SAEMetrics(
        l0=l0_sum / n,
        fvu=f_vu,
        explained_variance=1.0 - f_vu,
        mse=acc.sum_err2 / n,
        dead_fraction=n_dead / m,
        dense_fraction=n_dense / m,
        n_dead=n_dead,
        n_dense=n_dense,
        shrinkage=xhat2 / x_dot_xhat if x_dot_xhat != 0 else float("nan"),
        l2_ratio=l2_ratio / n,
        cossim=cos_sum / n,
        n_tokens=n,
        density=density.float(),
    )


@dataclass
class LossRecovered:
    """Downstream loss with the SAE spliced in, against zero- and mean-ablation of the same activation."""

    clean_loss: float
    spliced_loss: float
    zero_ablation_loss: float
    mean_ablation_loss: float
    recovered_vs_zero: float
    """(L_zero − L_SAE)/(L_zero − L_clean); 1 = as good as clean, 0 = no better than zero ablation."""
    recovered_vs_mean: float
    """(L_mean − L_SAE)/(L_mean − L_clean); the harder baseline for Mamba's residual stream."""
    delta_loss: float
    """L_SAE − L_clean (Gao et al. 2024)."""


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    gap = ablated - clean
    return float("nan") if abs(gap) < 1e-12 else (ablated - spliced) / gap


def loss_recovered(
    clean_loss: float, spliced_loss: float, zero_ablation_loss: float, mean_ablation_loss: float
) -> LossRecovered:
    """Fractions of loss recovered (SAELens ``ce_loss_score``, dictionary_learning ``frac_recovered``).

    NaN where an ablation does not change the loss (the fraction is undefined).
    """
    values = (clean_loss, spliced_loss, zero_ablation_loss, mean_ablation_loss)
    if not all(np.isfinite(v) for v in values):
        raise ValueError(f"losses must be finite; got {values}")
    return LossRecovered(
        clean_loss=clean_loss,
        spliced_loss=spliced_loss,
        zero_ablation_loss=zero_ablation_loss,
        mean_ablation_loss=mean_ablation_loss,
        recovered_vs_zero=_recovered(zero_ablation_loss, spliced_loss, clean_loss),
        recovered_vs_mean=_recovered(mean_ablation_loss, spliced_loss, clean_loss),
        delta_loss=spliced_loss - clean_loss,
    )


def kl_score(kl_spliced: float, kl_ablation: float) -> float:
    """(KL_abl − KL_SAE)/KL_abl with KL(p_clean ‖ p_patched) (SAELens ``kl_div_score``)."""
    return float("nan") if abs(kl_ablation) < 1e-12 else (kl_ablation - kl_spliced) / kl_ablation
