"""Figures for SAEs: latent-density histogram, best feature–variable matches, training curves (PNG).

Figures are built with ``matplotlib.figure.Figure`` (no pyplot), so PNGs render through Agg without touching the
global backend of a notebook that imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from mamba_interp.sparse_autoencoder.analysis import FeatureCorrelation
from mamba_interp.sparse_autoencoder.training import TrainHistory
from mamba_interp.utils.io import atomic_path

DENSITY_FLOOR = 1e-10  # log10(density + 1e-10), as SAELens and SAEBench plot it


def new_figure(
    nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] = (6.0, 4.0), squeeze: bool = True
) -> tuple[Figure, Any]:
    """A pyplot-free figure and its axes (``Figure.subplots``)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def plot_feature_density(
    densities: Tensor | Mapping[str, Tensor], path: str | Path, dense_threshold: float = 0.1, title: str | None = None
) -> Path:
    """Histogram of log10(density + 1e-10) per latent; several SAEs (name -> density [m]) are overlaid."""
    series = {"SAE": densities} if isinstance(densities, Tensor) else dict(densities)
    fig, ax = new_figure(figsize=(6.5, 3.8))
    bins = np.linspace(np.log10(DENSITY_FLOOR), 0.0, 61)
    for name, dens in series.items():
        d = torch.as_tensor(dens).double().numpy()
        n_dead, n_dense = int((d == 0).sum()), int((d > dense_threshold).sum())
        ax.hist(
            np.log10(d + DENSITY_FLOOR),
            bins=bins,
            alpha=0.6,
            label=f"{name} (dead {n_dead}, dense {n_dense} of {d.size})",
        )
    ax.axvline(np.log10(dense_threshold), color="k", ls="--", lw=1, label=f"dense > {dense_threshold:g}")
    ax.set_xlabel("log10(latent firing frequency + 1e-10)")
    ax.set_ylabel("latents")
    ax.set_title(title or "SAE latent density")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_feature_variable_matches(
    features: Tensor,
    variables: Mapping[str, Tensor],
    correlation: FeatureCorrelation,
    path: str | Path,
    max_points: int = 4000,
    seed: int = 0,
) -> Path:
    """For each variable, its best latent's activation against the variable (a subsample of tokens)."""
    names = correlation.names
    cols = min(len(names), 4)
    rows = (len(names) + cols - 1) // cols
    fig, axes = new_figure(rows, cols, figsize=(3.4 * cols, 3.0 * rows), squeeze=False)
    f = features.reshape(-1, features.shape[-1])
    gen = np.random.default_rng(seed)
    for j, name in enumerate(names):
        ax = axes[j // cols][j % cols]
        v = torch.as_tensor(variables[name]).reshape(-1).double().numpy()
        latent = int(correlation.best_latent[j])
        a = f[:, latent].double().numpy()
        ok = np.flatnonzero(np.isfinite(v))
        if ok.size > max_points:
            ok = gen.choice(ok, max_points, replace=False)
        jitter = 0.02 * (np.nanstd(v) or 1.0) * gen.standard_normal(ok.size)
        ax.scatter(v[ok] + jitter, a[ok], s=4, alpha=0.4)
        ax.set_title(
            f"{name}\nlatent {latent}: r={float(correlation.best_r[j]):.2f} "
            f"(shuffled {float(correlation.shuffled_best_abs_r[j]):.2f})",
            fontsize=8,
        )
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel("activation", fontsize=8)
    for j in range(len(names), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_training_history(history: TrainHistory, path: str | Path, title: str | None = None) -> Path:
    """Loss, L0, batch FVU and dead fraction against the step."""
    fig, axes = new_figure(1, 4, figsize=(14, 3.0))
    for ax, (name, values) in zip(
        axes,
        (
            ("loss", history.loss),
            ("L0", history.l0),
            ("batch FVU", history.fvu),
            ("dead fraction", history.dead_fraction),
        ),
    ):
        ax.plot(history.step, values)
        ax.set_xlabel("step")
        ax.set_title(name)
        if name in ("loss", "batch FVU") and min(values, default=1.0) > 0:
            ax.set_yscale("log")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
