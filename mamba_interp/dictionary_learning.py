"""Classical sparse dictionary learning next to the SAE (Mairal et al. 2009 via scikit-learn; docs/architecture.md).

* ``fit_dictionary``: scikit-learn's ``MiniBatchDictionaryLearning`` (Mairal et al. 2009), which solves
  min_{D,C} ½‖X − C D‖²_F + α‖C‖₁ subject to ‖D_k‖₂ ≤ 1 with iterative (non-amortised) inference per sample.
* ``compare_with_sae``: the learned dictionary against an SAE's decoder (MMCS both ways), and FVU, L0, fit and encode
  time of both on the same evaluation activations.
* ``amortisation_gap``: the SAE's decoder used as a fixed dictionary for sparse coding (OMP or LARS through
  ``SparseCoder``) at the *same L0 per token* as the SAE encoder, plus a least-squares refit on the SAE's own
  support. FVU(SAE) − FVU(sparse coding) is the amortisation gap (O'Neill et al. 2024, arXiv 2411.13117); the
  refit splits it into a support-selection part and a magnitude (shrinkage) part.

Index letters: t tokens, d activation width, m atoms (= SAE latents).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
import torch
from sklearn.decomposition import MiniBatchDictionaryLearning, SparseCoder
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from mamba_interp.sparse_autoencoder import SparseAutoencoder, cosine_matrix, dictionary_recovery, fvu
from mamba_interp.sparse_autoencoder.plots import new_figure, save_figure


@dataclass(frozen=True)
class DictionaryLearningConfig:
    """Settings of ``MiniBatchDictionaryLearning``; the defaults are the measured planted-feature recipe (§3.4)."""

    n_components: int
    alpha: float = 0.1
    """L1 weight α of the fit (in the units of the activations after ``normalize``)."""
    batch_size: int = 256
    max_iter: int = 10
    """Epochs over the samples (sklearn stops earlier when the cost stops improving)."""
    max_samples: int | None = 50_000
    """Fit on at most this many rows (a seeded subset): inference per sample makes the fit O(t)."""
    fit_algorithm: Literal["cd", "lars"] = "cd"
    transform_algorithm: Literal["lasso_lars", "lasso_cd", "omp", "lars", "threshold"] = "lasso_lars"
    transform_alpha: float | None = None
    """α used to encode; None: ``alpha``."""
    positive_code: bool = True
    """Non-negative codes, like SAE latents (needs fit_algorithm='cd' and a lasso transform)."""
    center: bool = False
    """Subtract the mean before fitting (an offset like the SAE's b_dec). Leave off for non-negative planted data."""
    normalize: bool = False
    """Scale the activations to E‖x‖ = 1 so α transfers across layers; the scale is undone in encode/decode."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_components <= 0 or self.batch_size <= 0 or self.max_iter <= 0:
            raise ValueError("DictionaryLearningConfig: n_components, batch_size and max_iter must be positive")
        if self.alpha <= 0:
            raise ValueError(f"DictionaryLearningConfig.alpha={self.alpha!r} must be > 0")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError("DictionaryLearningConfig.max_samples must be positive or None")
        if self.positive_code and (
            self.fit_algorithm != "cd" or self.transform_algorithm not in ("lasso_lars", "lasso_cd", "threshold")
        ):
            raise ValueError(
                "positive_code=True needs fit_algorithm='cd' and transform_algorithm in "
                "{lasso_lars, lasso_cd, threshold} "
                "(scikit-learn has no positive LARS/OMP); set positive_code=False for the others"
            )


@dataclass
class DictionaryResult:
    """A fitted dictionary: x ≈ codes @ components + offset, codes = ``encode(x)``."""

    components: Tensor
    """[m, d] atoms (unit norm in the normalised space)."""
    offset: Tensor
    """[d] subtracted before coding (the mean, or zeros)."""
    scale: float
    """Activations were multiplied by this before fitting."""
    fit_seconds: float
    n_fit_samples: int
    n_iter: int
    estimator: MiniBatchDictionaryLearning
    config: DictionaryLearningConfig

    def encode(self, x: Tensor) -> Tensor:
        """Codes [t, m] of x [t, d] with the configured transform (raw units: x ≈ codes @ components + offset)."""
        X = ((x.reshape(-1, x.shape[-1]).double() - self.offset) * self.scale).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            codes = torch.from_numpy(self.estimator.transform(X))
        if self.config.positive_code:
            codes = codes.clamp_min(0.0)  # LARS leaves round-off negatives of ~1e-18
        return codes / self.scale

    def decode(self, codes: Tensor) -> Tensor:
        return codes.double() @ self.components.double() + self.offset


def _subset(x: Tensor, max_samples: int | None, seed: int) -> Tensor:
    if max_samples is None or x.shape[0] <= max_samples:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
    return x[idx]


def fit_dictionary(activations: Tensor, config: DictionaryLearningConfig) -> DictionaryResult:
    """Fit ``MiniBatchDictionaryLearning`` on the rows of ``activations`` [t, d]; deterministic per ``config.seed``."""
    cfg = config
    if activations.ndim != 2:
        raise ValueError(f"activations must be [tokens, d]; got {tuple(activations.shape)}")
    x = _subset(activations, cfg.max_samples, cfg.seed).double()
    offset = x.mean(0) if cfg.center else torch.zeros(x.shape[1], dtype=torch.float64)
    xc = x - offset
    scale = 1.0 / float(xc.norm(dim=1).mean()) if cfg.normalize else 1.0
    est = MiniBatchDictionaryLearning(
        n_components=cfg.n_components,
        alpha=cfg.alpha,
        batch_size=cfg.batch_size,
        max_iter=cfg.max_iter,
        fit_algorithm=cfg.fit_algorithm,
        transform_algorithm=cfg.transform_algorithm,
        transform_alpha=cfg.transform_alpha if cfg.transform_alpha is not None else cfg.alpha,
        positive_code=cfg.positive_code,
        random_state=cfg.seed,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        # coordinate descent on near-degenerate mini-batches warns about duality gaps of ~1e-5; the fit is still fine
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit((xc * scale).numpy())
    seconds = time.perf_counter() - start
    return DictionaryResult(
        components=torch.from_numpy(est.components_.copy()),
        offset=offset,
        scale=scale,
        fit_seconds=seconds,
        n_fit_samples=x.shape[0],
        n_iter=int(est.n_iter_),
        estimator=est,
        config=cfg,
    )


@dataclass
class DictionaryComparison:
    mmcs_sae_to_dictionary: float
    """Mean over alive SAE atoms of the best cosine with a dictionary atom."""
    mmcs_dictionary_to_sae: float
    """Mean over dictionary atoms of the best cosine with an alive SAE atom."""
    weighted_mmcs_sae_to_dictionary: float
    """As mmcs_sae_to_dictionary, each SAE atom weighted by how often it fires (rare stragglers count little)."""
    weighted_mmcs_dictionary_to_sae: float
    """Each dictionary atom weighted by how often its code is non-zero."""
    fvu_sae: float
    fvu_dictionary: float
    l0_sae: float
    l0_dictionary: float
    fit_seconds_sae: float | None
    fit_seconds_dictionary: float
    encode_seconds_sae: float
    encode_seconds_dictionary: float
    n_tokens: int
    recovery_sae: dict[str, float] | None = None
    """MMCS etc. of the SAE against a known true dictionary, when one was given."""
    recovery_dictionary: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _recovery_dict(true: Tensor, learned: Tensor) -> dict[str, float]:
    r = dictionary_recovery(true, learned)
    return {"mmcs": r.mmcs, "mcc": r.mcc, "frac_above_0_9": r.frac_above_0_9, "frac_above_0_99": r.frac_above_0_99}


@torch.no_grad()
def compare_with_sae(
    sae: SparseAutoencoder, dictionary: DictionaryResult, x_eval: Tensor, true_dictionary: Tensor | None = None
) -> DictionaryComparison:
    """SAE vs dictionary learning on the same evaluation activations x_eval [t, d]."""
    x = x_eval.reshape(-1, x_eval.shape[-1])
    start = time.perf_counter()
    f = sae.encode(x.to(sae.device, torch.float32))
    sae_seconds = time.perf_counter() - start
    x_hat_sae = sae.decode(f).cpu()
    start = time.perf_counter()
    codes = dictionary.encode(x)
    dict_seconds = time.perf_counter() - start
    x_hat_dict = dictionary.decode(codes)
    sae_usage = (f != 0).double().mean(0).cpu()  # [m]
    dict_usage = (codes != 0).double().mean(0)  # [m']
    alive = sae_usage > 0
    sae_atoms = sae.W_dec.detach().cpu()[alive] if bool(alive.any()) else sae.W_dec.detach().cpu()
    cos = cosine_matrix(sae_atoms, dictionary.components)  # [m_alive, m']
    best_sae, best_dict = cos.max(1).values, cos.max(0).values
    u_sae, u_dict = sae_usage[alive], dict_usage
    history = getattr(sae, "training_history", None)
    return DictionaryComparison(
        mmcs_sae_to_dictionary=best_sae.mean().item(),
        mmcs_dictionary_to_sae=best_dict.mean().item(),
        weighted_mmcs_sae_to_dictionary=((best_sae * u_sae).sum() / u_sae.sum().clamp_min(1e-300)).item(),
        weighted_mmcs_dictionary_to_sae=((best_dict * u_dict).sum() / u_dict.sum().clamp_min(1e-300)).item(),
        fvu_sae=fvu(x, x_hat_sae),
        fvu_dictionary=fvu(x, x_hat_dict),
        l0_sae=(f != 0).sum(-1).double().mean().item(),
        l0_dictionary=(codes != 0).sum(-1).double().mean().item(),
        fit_seconds_sae=getattr(history, "seconds", None),
        fit_seconds_dictionary=dictionary.fit_seconds,
        encode_seconds_sae=sae_seconds,
        encode_seconds_dictionary=dict_seconds,
        n_tokens=x.shape[0],
        recovery_sae=None if true_dictionary is None else _recovery_dict(true_dictionary, sae.W_dec.detach().cpu()),
        recovery_dictionary=None if true_dictionary is None else _recovery_dict(true_dictionary, dictionary.components),
    )


@dataclass
class AmortisationGap:
    """FVU of the SAE encoder vs sparse codes on the SAE's own dictionary, at the same L0 per token."""

    algorithm: str
    fvu_sae: float
    fvu_sparse_coding: float
    """FVU of ``algorithm`` codes with exactly the SAE's L0 on each token."""
    fvu_support_refit: float
    """FVU of least-squares codes on the SAE's chosen latents (≤ fvu_sae: same support, optimal magnitudes)."""
    gap: float
    """fvu_sae − fvu_sparse_coding (> 0: the amortised encoder leaves reconstruction on the table)."""
    l0_sae: float
    l0_sparse_coding: float
    """Mean non-zeros of the sparse codes: at most the SAE's L0 on every token (fewer when x is matched exactly)."""
    seconds_sae: float
    seconds_sparse_coding: float
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _effective_decoder(sae: SparseAutoencoder) -> tuple[Tensor, Tensor]:
    """(W_dec, b_dec) in raw units: x̂ = f W + b."""
    s = sae.activation_scale
    return sae.W_dec.detach().double().cpu() / s, sae.b_dec.detach().double().cpu() / s


def _support_refit(target: Tensor, atoms: Tensor, f: Tensor) -> Tensor:
    """Least-squares reconstruction of target [t, d] from each token's active atoms (grouped by L0)."""
    recon = torch.zeros_like(target)
    l0 = (f != 0).sum(-1)
    for level in l0.unique().tolist():
        if level == 0:
            continue
        rows = (l0 == level).nonzero().flatten()
        support = (f[rows] != 0).nonzero()[:, 1].view(len(rows), level)  # [r, l]
        A = atoms[support].transpose(1, 2)  # [r, d, l]
        coef = torch.linalg.lstsq(A, target[rows].unsqueeze(-1)).solution  # [r, l, 1]
        recon[rows] = (A @ coef).squeeze(-1)
    return recon


@torch.no_grad()
def amortisation_gap(
    sae: SparseAutoencoder,
    x: Tensor,
    algorithm: Literal["omp", "lars"] = "omp",
    max_tokens: int | None = 20_000,
    seed: int = 0,
) -> AmortisationGap:
    """Compare the SAE encoder with ``SparseCoder`` (OMP or LARS) on the SAE decoder at equal L0 per token.

    "Equal L0" is a budget: each token may use at most as many atoms as the SAE used on it.

    Tokens are grouped by their SAE L0 ℓ and each group is coded with ``transform_n_nonzero_coefs = ℓ`` against
    x − b_dec, over unit-normalised decoder rows (OMP's selection assumes unit atoms; codes are signed, so the coder
    solves a relaxation of the SAE's non-negative problem). OMP's codes are least squares on their support; LARS
    stops on the lasso path with shrunk coefficients, so its support is refit by least squares too (the gap then
    compares supports and optimal magnitudes for both).
    """
    if algorithm not in ("omp", "lars"):
        raise ValueError(f"algorithm={algorithm!r}: use 'omp' or 'lars' (the coders with a fixed number of non-zeros)")
    x = _subset(x.reshape(-1, x.shape[-1]), max_tokens, seed)
    start = time.perf_counter()
    f = sae.encode(x.to(sae.device, torch.float32)).cpu()
    seconds_sae = time.perf_counter() - start
    x_hat_sae = sae.decode(f.to(sae.device)).cpu()
    W, b = _effective_decoder(sae)
    target = x.double() - b
    atoms = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    l0 = (f != 0).sum(-1)
    recon = torch.zeros_like(target)
    n_coded = torch.zeros(x.shape[0])
    start = time.perf_counter()
    for level in l0.unique().tolist():
        if level == 0:
            continue
        rows = (l0 == level).nonzero().flatten()
        coder = SparseCoder(
            dictionary=atoms.numpy(), transform_algorithm=algorithm, transform_n_nonzero_coefs=int(level)
        )
        with warnings.catch_warnings():
            # OMP stops early (and warns) once the residual is exactly zero: fewer atoms than allowed were needed
            warnings.simplefilter("ignore", RuntimeWarning)
            codes = torch.from_numpy(coder.transform(target[rows].numpy()))
        if algorithm == "lars":
            recon[rows] = _support_refit(target[rows], atoms, codes)
        else:
            recon[rows] = codes @ atoms
        n_coded[rows] = (codes != 0).sum(-1).float()
    seconds_coding = time.perf_counter() - start
    refit = _support_refit(target, W, f.double())
    fvu_sae, fvu_coding = fvu(x, x_hat_sae), fvu(x, recon + b)
    return AmortisationGap(
        algorithm=algorithm,
        fvu_sae=fvu_sae,
        fvu_sparse_coding=fvu_coding,
        fvu_support_refit=fvu(x, refit + b),
        gap=fvu_sae - fvu_coding,
        l0_sae=l0.double().mean().item(),
        l0_sparse_coding=n_coded.double().mean().item(),
        seconds_sae=seconds_sae,
        seconds_sparse_coding=seconds_coding,
        n_tokens=x.shape[0],
    )


def plot_comparison(comparison: DictionaryComparison, gap: AmortisationGap | None, path: str | Path) -> Path:
    """Bars of FVU and L0 for the SAE, dictionary learning and (if given) sparse coding on the SAE decoder."""
    labels = ["SAE encoder", "dictionary learning"]
    fvus = [comparison.fvu_sae, comparison.fvu_dictionary]
    l0s = [comparison.l0_sae, comparison.l0_dictionary]
    if gap is not None:
        labels += [f"{gap.algorithm.upper()} on SAE decoder", "refit on SAE support"]
        fvus += [gap.fvu_sparse_coding, gap.fvu_support_refit]
        l0s += [gap.l0_sparse_coding, gap.l0_sae]
    fig, axes = new_figure(1, 2, figsize=(10, 3.4))
    colours = matplotlib.colormaps["tab10"](np.arange(len(labels)))
    axes[0].bar(range(len(labels)), fvus, color=colours)
    axes[0].set_ylabel("FVU")
    axes[1].bar(range(len(labels)), l0s, color=colours)
    axes[1].set_ylabel("L0")
    for ax in axes:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    axes[0].set_title(
        f"MMCS SAE→dict {comparison.mmcs_sae_to_dictionary:.3f}, dict→SAE {comparison.mmcs_dictionary_to_sae:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    return save_figure(fig, path)
