"""What the latents mean: correlation with ground-truth variables, and top-activating examples.

Both take latent activations F [..., m] (e.g. ``encode_activations(sae, cache[name])`` of shape [b, l, m]) and work
on the flattened tokens t, so the pipeline can map results back to (sequence, position) with ``TopExamples.coords``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mamba_interp.sparse_autoencoder.model import EVAL_BATCH, SparseAutoencoder


@torch.no_grad()
def encode_activations(sae: SparseAutoencoder, x: Tensor, batch_size: int = EVAL_BATCH) -> Tensor:
    """Latents f [..., m] of raw activations x [..., d], encoded in batches of tokens (float32, on CPU)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], sae.cfg.d_sae)
    for start in range(0, flat.shape[0], batch_size):
        out[start : start + batch_size] = sae.encode(flat[start : start + batch_size].to(sae.device)).float().cpu()
    return out.view(*x.shape[:-1], sae.cfg.d_sae)


@dataclass
class FeatureCorrelation:
    """Pearson r between every latent and every variable, the best latent per variable, and a null baseline."""

    names: list[str]
    r: Tensor
    """[v, m] Pearson r (0 for latents that are constant on the variable's valid tokens, e.g. dead ones)."""
    best_latent: Tensor
    """[v] latent with the largest |r|."""
    best_r: Tensor
    """[v] signed r of that latent."""
    shuffled_best_abs_r: Tensor
    """[v] max over latents of |r| after shuffling the variable across tokens, averaged over the shuffles
    (what the best |r| would be by chance with this many latents and tokens)."""
    shuffled_best_abs_r_max: Tensor
    """[v] the largest such value over the shuffles."""
    n_tokens: Tensor
    """[v] tokens where the variable is defined (finite)."""

    def matches(self) -> list[dict[str, float | int | str]]:
        """One JSON-able record per variable, best match first in the order of ``names``."""
        return [
            {
                "variable": name,
                "latent": int(self.best_latent[j]),
                "r": float(self.best_r[j]),
                "abs_r": abs(float(self.best_r[j])),
                "shuffled_best_abs_r": float(self.shuffled_best_abs_r[j]),
                "shuffled_best_abs_r_max": float(self.shuffled_best_abs_r_max[j]),
                "n_tokens": int(self.n_tokens[j]),
            }
            for j, name in enumerate(self.names)
        ]


def _pearson_columns(f: Tensor, v: Tensor, columns: Tensor, rows: Tensor | None = None, chunk: int = 512) -> Tensor:
    """r between each column ``columns`` [c] of f [t, m] (restricted to the tokens ``rows``, a [t] mask; None: all)
    and each column of v [rows, u]; [u, c], float64.

    The latents are gathered a chunk of columns at a time, so no [rows, c] copy of f is ever made (at 130M scale f
    is ~400 MB)."""
    v = v.double()
    v = v - v.mean(0)
    v_norm = v.norm(dim=0)  # [u]
    out = torch.zeros(v.shape[1], columns.numel(), dtype=torch.float64)
    for start in range(0, columns.numel(), chunk):
        block = f.index_select(1, columns[start : start + chunk])
        block = (block if rows is None else block[rows]).double()
        block = block - block.mean(0)
        denom = v_norm[:, None] * block.norm(dim=0)[None, :]  # [u, c]
        num = v.T @ block
        out[:, start : start + chunk] = torch.where(denom > 1e-12, num / denom.clamp_min(1e-300), torch.zeros_like(num))
    return out


def feature_variable_correlation(
    features: Tensor, variables: Mapping[str, Tensor], n_shuffles: int = 5, seed: int = 0,
    latents: Tensor | None = None,
) -> FeatureCorrelation:
    """Correlate each latent of ``features`` [..., m] with each variable [...] (same leading shape).

    Tokens where a variable is NaN are left out for that variable (a variable defined only at some positions).
    Categorical variables: pass one indicator per class (``one_hot_variables``). ``latents`` [c]: correlate only
    these latents (e.g. the live ones); the result is then over them, as if ``features[..., latents]`` were passed,
    without that copy.
    """
    if not variables:
        raise ValueError("variables is empty; pass a dict name -> tensor of the features' leading shape")
    m = features.shape[-1]
    f = features.reshape(-1, m)
    columns = torch.arange(m) if latents is None else torch.as_tensor(latents, dtype=torch.long).reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    names, values, shuffles, masks = [], [], [], []
    for name, var in variables.items():
        v = torch.as_tensor(var).reshape(-1).double()
        if v.shape[0] != f.shape[0]:
            raise ValueError(f"variable {name!r} has {v.shape[0]} values but features have {f.shape[0]} tokens")
        valid = torch.isfinite(v)
        vv = v if bool(valid.all()) else v[valid]
        if vv.numel() < 3:
            raise ValueError(f"variable {name!r} has fewer than 3 finite values")
        names.append(name)
        values.append(vv)
        shuffles.append([vv[torch.randperm(vv.shape[0], generator=gen)] for _ in range(n_shuffles)])
        masks.append(valid)
    # variables defined on the same tokens share one centred pass over the features (one matmul per group)
    groups: dict[bytes, list[int]] = {}
    for j, valid in enumerate(masks):
        groups.setdefault(valid.numpy().tobytes(), []).append(j)
    r_rows: list[Tensor] = [torch.empty(0)] * len(names)
    null_mean, null_max = [0.0] * len(names), [0.0] * len(names)
    for members in groups.values():
        valid = masks[members[0]]
        cols = [values[j] for j in members] + [s for j in members for s in shuffles[j]]
        r = _pearson_columns(f, torch.stack(cols, 1), columns, None if bool(valid.all()) else valid)  # [u + u·n, c]
        u = len(members)
        null = r[u:].abs().max(dim=1).values.view(u, n_shuffles) if n_shuffles else torch.zeros(u, 1)
        for row, j in enumerate(members):
            r_rows[j] = r[row]
            null_mean[j], null_max[j] = float(null[row].mean()), float(null[row].max())
    best_l = [int(r.abs().argmax()) for r in r_rows]
    best_r = [float(r[j]) for r, j in zip(r_rows, best_l)]
    counts = [int(v.numel()) for v in values]
    return FeatureCorrelation(
        names=names,
        r=torch.stack(r_rows).float(),
        best_latent=torch.tensor(best_l),
        best_r=torch.tensor(best_r),
        shuffled_best_abs_r=torch.tensor(null_mean),
        shuffled_best_abs_r_max=torch.tensor(null_max),
        n_tokens=torch.tensor(counts),
    )


def one_hot_variables(name: str, labels: Tensor, classes: Sequence[int] | None = None) -> dict[str, Tensor]:
    """Indicator variables ``{f"{name}={c}": 1[labels == c]}`` for a categorical label tensor (NaN stays NaN)."""
    labels = torch.as_tensor(labels)
    valid = torch.isfinite(labels.double())
    values = classes if classes is not None else sorted(int(c) for c in labels[valid].unique().tolist())
    out = {}
    for c in values:
        ind = (labels == c).double()
        out[f"{name}={c}"] = torch.where(valid, ind, torch.full_like(ind, float("nan")))
    return out


@dataclass
class TopExamples:
    """The k tokens on which each listed latent is largest."""

    latents: Tensor
    """[L] latent ids."""
    indices: Tensor
    """[L, k] flat token indices into ``features.reshape(-1, m)``; −1 where the latent fired on fewer than k tokens."""
    values: Tensor
    """[L, k] activations at those tokens (0 where the index is −1)."""
    token_shape: tuple[int, ...]
    """Leading shape of the features (e.g. (b, l)), for ``coords``."""

    def coords(self) -> np.ndarray:
        """[L, k, len(token_shape)] multi-indices (e.g. (sequence, position)); −1 rows where indices are −1."""
        idx = self.indices.numpy()
        out = np.full((*idx.shape, len(self.token_shape)), -1, dtype=np.int64)
        ok = idx >= 0
        out[ok] = np.stack(np.unravel_index(idx[ok], self.token_shape), axis=-1)
        return out


def top_activating_examples(
    features: Tensor, latents: Sequence[int] | Tensor | None = None, k: int = 10, chunk: int = 256
) -> TopExamples:
    """Top-k tokens of each latent in ``latents`` (default: all) from features [..., m] (latents in chunks)."""
    m = features.shape[-1]
    token_shape = tuple(features.shape[:-1])
    f = features.reshape(-1, m)
    lat = torch.arange(m) if latents is None else torch.as_tensor(latents, dtype=torch.long).reshape(-1)
    k_eff = min(k, f.shape[0])
    indices = torch.full((len(lat), k), -1, dtype=torch.long)
    values = torch.zeros(len(lat), k)
    for start in range(0, len(lat), chunk):
        cols = f[:, lat[start : start + chunk]].T.float()  # [c, t]
        top = cols.topk(k_eff, dim=1)
        fired = top.values > 0
        indices[start : start + chunk, :k_eff] = torch.where(fired, top.indices, torch.full_like(top.indices, -1))
        values[start : start + chunk, :k_eff] = torch.where(fired, top.values, torch.zeros_like(top.values))
    return TopExamples(latents=lat, indices=indices, values=values, token_shape=token_shape)
