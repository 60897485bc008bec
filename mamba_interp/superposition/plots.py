"""Superposition figures: 2-D feature arrows, dimensionality against sparsity, WᵀW heatmap, decoder geometry."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.patches import Circle
from torch import Tensor

from mamba_interp.sparse_autoencoder.plots import new_figure, save_figure
from mamba_interp.superposition.geometry import (
    DecoderGeometry,
    dimensions_per_feature,
    feature_dimensionality,
)

_FRACTIONS = (1.0, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 3 / 8)


def plot_feature_arrows(
    Ws: Sequence[Tensor], path: str | Path, titles: Sequence[str] | None = None, importance: Tensor | None = None
) -> Path:
    """The paper's intro figure: each 2-D toy model's feature columns W_i as arrows, coloured by importance."""
    fig, axes = new_figure(1, len(Ws), figsize=(3.2 * len(Ws), 3.4), squeeze=False)
    for j, W in enumerate(Ws):
        if W.shape[0] != 2:
            raise ValueError(f"plot_feature_arrows needs W of shape [2, n]; got {tuple(W.shape)}")
        ax = axes[0][j]
        n = W.shape[1]
        imp = importance if importance is not None else torch.arange(n, 0, -1, dtype=torch.float64)
        colours = matplotlib.colormaps["viridis"](np.linspace(0, 1, n)[np.argsort(np.argsort(-imp.double().numpy()))])
        ax.add_patch(Circle((0, 0), 1.0, fill=False, ls=":", color="grey"))
        for i in range(n):
            x, y = W[0, i].item(), W[1, i].item()
            ax.annotate("", xy=(x, y), xytext=(0, 0), arrowprops={"arrowstyle": "->", "color": colours[i], "lw": 2})
            ax.text(1.08 * x, 1.08 * y, str(i), fontsize=7, ha="center", va="center")
        lim = max(1.3, float(W.abs().max()) * 1.2)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if titles:
            ax.set_title(titles[j], fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_dimensionality(
    feature_probabilities: Sequence[float], Ws: Sequence[Tensor], path: str | Path, title: str | None = None
) -> Path:
    """D* (line) and the per-feature D_i (dots) against 1/(1 − S), with the uniform-polytope fractions."""
    fig, ax = new_figure(figsize=(6.0, 3.8))
    inv = [1.0 / p for p in feature_probabilities]
    ax.plot(inv, [float(dimensions_per_feature(W)) for W in Ws], "k-", lw=1.5, label="D* = m/‖W‖²_F")
    for x, W in zip(inv, Ws):
        d = feature_dimensionality(W).numpy()
        ax.scatter(np.full(d.size, x), d, s=8, alpha=0.5, color="tab:blue")
    for frac in _FRACTIONS:
        ax.axhline(frac, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("1 / (1 − S)  (1 / feature probability)")
    ax.set_ylabel("dimensions per feature")
    ax.set_ylim(0, 1.1)
    ax.set_title(title or "feature dimensionality")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_interference(
    W: Tensor, path: str | Path, title: str | None = None, max_features: int = 128, normalize: bool = False
) -> Path:
    """Heatmap of Wᵀ W for W [m, n] (cosines when ``normalize``); the first ``max_features`` columns."""
    W = W[:, :max_features].double()
    if normalize:
        W = W / W.norm(dim=0).clamp_min(1e-12)
    G = (W.T @ W).numpy()
    lim = max(float(np.abs(G).max()), 1e-12)
    fig, ax = new_figure(figsize=(4.6, 4.0))
    im = ax.imshow(G, cmap="RdBu_r", vmin=-lim, vmax=lim)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or ("cos(W_i, W_j)" if normalize else "WᵀW"))
    ax.set_xlabel("feature j")
    ax.set_ylabel("feature i")
    return save_figure(fig, path)


def plot_decoder_geometry(geometries: dict[str, DecoderGeometry], path: str | Path) -> Path:
    """Histograms of D_i and of max |cos| for one or more decoders, with the polytope fractions marked."""
    fig, axes = new_figure(1, 2, figsize=(10, 3.4))
    for name, g in geometries.items():
        axes[0].hist(
            g.dimensionality.numpy(), bins=50, range=(0, 1.05), alpha=0.6, label=f"{name} (D*={g.dims_per_feature:.2f})"
        )
        axes[1].hist(g.max_abs_cos.numpy(), bins=50, range=(0, 1), alpha=0.6, label=name)
    for frac in _FRACTIONS:
        axes[0].axvline(frac, color="grey", lw=0.6, ls=":")
    axes[0].set_xlabel("feature dimensionality D_i")
    axes[1].set_xlabel("max |cos| with another direction")
    for ax in axes:
        ax.set_ylabel("features")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
