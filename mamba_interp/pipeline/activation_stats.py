"""Collect activations at chosen layers/hooks and compute their baseline statistics (pipeline step 2).

Index letters as in ``models/config.py``; in addition N = number of scored tokens (valid positions of all
sequences) and k = the flattened feature width of one hook (e.g. e for ``hook_x`` of Mamba-1, h·p = e for
Mamba-2, g·n for ``hook_B`` of Mamba-2).

Statistics per (layer, hook), over the N valid tokens:

* mean, std, RMS of all entries; excess kurtosis (Fisher, ``scipy.stats.kurtosis``) of all entries pooled and
  the median of the per-dimension kurtoses. Heavy-tailed activations ("massive activations", outlier features)
  show up as a large pooled kurtosis (Bondarenko et al. 2023; Sun et al. 2024);
* per-dimension RMS; a dimension is *near-dead* when its RMS is below ``dead_threshold`` x the median
  dimension's RMS, and an *outlier* when above ``outlier_ratio`` x it (Dettmers et al. 2022 flag features of
  magnitude >= 6 in transformers);
* for Δ (``hook_dt``): per channel (Mamba-1) or head (Mamba-2) quantiles, the coefficient of variation over
  tokens (how input-dependent, i.e. selective, Δ is; Gu & Dao 2023 §3.5.2) and the e-folding memory timescale
  1 / (median Δ · min_n |A|) in tokens of the slowest state mode (Mamba-2: 1 / (median Δ_h · |A_h|));
* ``state_norm``: the L2 norm of the SSM state after each token, per channel (Mamba-1, over n) or per head
  (Mamba-2, over p and n). It is computed inside the forward from ``hook_ssm_state`` and reduced at once, so the
  [b, l, e, n] states of one layer exist only while that layer runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamba_interp.models.cache import get_act_name
from mamba_interp.sparse_autoencoder.training import ActivationChunks

STATE_NORM = "state_norm"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
CHUNK_BYTES = 16 << 20
"""float32 bytes per chunk when statistics and SAE training stream over a hook (both stores chunk alike, by whole
sequences, so their numbers are identical)."""
QUANTILE_TOKENS = 1 << 17
"""Δ quantiles use at most this many tokens per hook (evenly spaced; all of them in runs up to this size)."""


def hook_name(short: str, layer: int) -> str:
    """Full name of a short hook at a layer; ``state_norm`` becomes ``blocks.i.mixer.ssm_state_norm``."""
    if short == STATE_NORM:
        return f"blocks.{layer}.mixer.ssm_state_norm"
    return get_act_name(short, layer)


def available_hooks(arch: str) -> tuple[str, ...]:
    from mamba_interp.pipeline.config import HOOK_CHOICES

    return tuple(h for h in HOOK_CHOICES if not (arch == "mamba2" and h == "dt_low"))


# ---- collection --------------------------------------------------------------------------------
@dataclass
class ActivationSet:
    """Activations of one dataset: ``acts[(short, layer)]`` is a float32 CPU tensor [b, l, k].

    ``shapes[(short, layer)]`` keeps the hook's own trailing shape (e.g. ``(h, p)`` for Mamba-2's ``x``) so
    ``acts[...].reshape(b, l, *shape)`` restores it. ``mask`` [b, l] bool marks real (non-padding) positions.
    """

    acts: dict[tuple[str, int], torch.Tensor]
    shapes: dict[tuple[str, int], tuple[int, ...]]
    mask: torch.Tensor
    layers: tuple[int, ...]
    hooks: tuple[str, ...]

    def __getitem__(self, key: tuple[str, int]) -> torch.Tensor:
        return self.acts[key]

    def tokens(self, short: str, layer: int) -> torch.Tensor:
        """[N, k]: the activation at every valid position (row-major: sequence, then position)."""
        return self.acts[(short, layer)][self.mask]

    # ---- chunked access: what streaming consumers use (the disk store reads one chunk at a time) ----------
    def chunk_sequences(self, key: tuple[str, int]) -> int:
        """Sequences per chunk of :meth:`iter_sequences`: about ``CHUNK_BYTES`` of float32 (at least one)."""
        _, l, k = self.acts[key].shape
        return max(1, CHUNK_BYTES // max(1, 4 * l * k))

    def rows(self, key: tuple[str, int], start: int, stop: int) -> torch.Tensor:
        """[stop - start, l, k]: sequences ``start:stop`` of one hook (the disk store reads them from its file)."""
        return self.acts[key][start:stop]

    def width(self, short: str, layer: int) -> int:
        return int(self.acts[(short, layer)].shape[-1])

    def only(self, short: str, layer: int) -> ActivationSet:
        """This set restricted to one (hook, layer) (views; what a unit of work ships to a worker)."""
        key = (short, layer)
        return ActivationSet({key: self.acts[key]}, {key: self.shapes[key]}, self.mask, (layer,), (short,))

    def subset(self, rows: slice) -> ActivationSet:
        """The same hooks over a contiguous slice of the sequences (views, no copy)."""
        return ActivationSet({k: v[rows] for k, v in self.acts.items()}, dict(self.shapes), self.mask[rows],
                             self.layers, self.hooks)

    def iter_sequences(self, short: str, layer: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks ``(values [s, l, k], mask [s, l])`` over the sequences, in order."""
        b, step = self.mask.shape[0], self.chunk_sequences((short, layer))
        for start in range(0, b, step):
            yield self.rows((short, layer), start, start + step), self.mask[start:start + step]

    def token_source(self, short: str, layer: int) -> ActivationChunks:
        """The valid tokens of one hook as :class:`ActivationChunks` of whole sequences (SAE training, statistics)."""
        key, step = (short, layer), self.chunk_sequences((short, layer))
        b = self.mask.shape[0]

        def read(i: int) -> torch.Tensor:
            s = i * step
            return self.rows(key, s, s + step)[self.mask[s:s + step]]

        return ActivationChunks(read, -(-b // step), int(self.mask.sum()), int(self.acts[key].shape[-1]))

    def coords(self) -> torch.Tensor:
        """[N, 2] long: (sequence, position) of each row of :meth:`tokens`, to join with per-example metadata."""
        return self.mask.nonzero()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.acts.values())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {hook_name(s, i): t for (s, i), t in self.acts.items()}
        out["mask"] = self.mask.to(torch.uint8)
        return out

    def save(self, path: str | Path, save: Callable[..., Any] | None = None) -> None:
        """Write to a safetensors file (``save(name, tensors, metadata)`` lets a step context record it)."""
        import json

        meta = {"layers": json.dumps(list(self.layers)), "hooks": json.dumps(list(self.hooks)),
                "shapes": json.dumps({hook_name(s, i): list(v) for (s, i), v in self.shapes.items()})}
        if save is not None:
            save(Path(path).name, self.to_tensors(), meta)
            return
        from safetensors.torch import save_file

        from mamba_interp.utils.io import atomic_path

        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.to_tensors().items()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> ActivationSet:
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            layers, hooks = tuple(json.loads(meta["layers"])), tuple(json.loads(meta["hooks"]))
            shapes_by_name = json.loads(meta["shapes"])
            acts, shapes = {}, {}
            for i in layers:
                for s in hooks:
                    acts[(s, i)] = f.get_tensor(hook_name(s, i))
                    shapes[(s, i)] = tuple(shapes_by_name[hook_name(s, i)])
            mask = f.get_tensor("mask").bool()
        return cls(acts, shapes, mask, layers, hooks)


def _state_norm(state: torch.Tensor) -> torch.Tensor:
    """[b, l, e, n] -> [b, l, e] (Mamba-1); [b, l, h, p, n] -> [b, l, h] (Mamba-2)."""
    dims = (-1,) if state.dim() == 4 else (-2, -1)
    return torch.linalg.vector_norm(state.float(), dim=dims)


@torch.no_grad()
def collect_activations(
    model: Any,
    tokens: torch.Tensor,
    layers: Sequence[int],
    hooks: Sequence[str],
    batch_size: int,
    attention_mask: torch.Tensor | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
    writer: Any = None,
    extra_hooks: Sequence[tuple[str, Callable]] = (),
) -> ActivationSet:
    """Run ``tokens`` [b, l] through ``model`` in batches and keep the chosen hooks at the chosen layers.

    Each batch is reduced to float32 CPU tensors as soon as a hook fires; ``state_norm`` hooks
    ``hook_ssm_state`` and keeps only the norm. With a ``writer``
    (:class:`~mamba_interp.pipeline.activation_store.ActivationWriter`) every batch goes to disk at once and the
    result is a :class:`~mamba_interp.pipeline.activation_store.DiskActivationSet`; the values are the same.
    ``extra_hooks``: more ``(hook name, fn)`` pairs that read the same passes (at layers up to the last collected
    one; they must not change the activation).
    """
    device = next(model.parameters()).device
    b_total, l_total = tokens.shape
    # preallocated [b, l, k] outputs, filled batch by batch (no list of chunks + cat: half the peak memory)
    store: dict[tuple[str, int], torch.Tensor] = {}
    shapes: dict[tuple[str, int], tuple[int, ...]] = {}
    offset = [0]

    def saver(key: tuple[str, int]) -> Callable:
        def fn(t: torch.Tensor, hook: Any) -> None:
            raw = _state_norm(t) if key[0] == STATE_NORM else t.detach()
            v = raw.reshape(raw.shape[0], raw.shape[1], -1)  # (b, l, k)
            if writer is not None:
                writer.write(key, offset[0], v, tuple(raw.shape[2:]))
                return
            if key not in store:
                shapes[key] = tuple(raw.shape[2:])
                store[key] = torch.empty(b_total, l_total, v.shape[-1], dtype=torch.float32)
            store[key][offset[0]:offset[0] + v.shape[0]] = v.float().cpu()
        return fn

    fwd_hooks = []
    for i in layers:
        for s in hooks:
            name = f"blocks.{i}.mixer.hook_ssm_state" if s == STATE_NORM else get_act_name(s, i)
            fwd_hooks.append((name, saver((s, i))))
    fwd_hooks += list(extra_hooks)
    starts = range(0, tokens.shape[0], batch_size)
    try:
        for start in (progress(starts) if progress is not None else starts):
            offset[0] = start
            ids = tokens[start:start + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[start:start + batch_size].to(device)
            # stop after the last analysed layer: nothing later is needed
            stop = max(layers) + 1
            stop_at = None if stop >= model.cfg.n_layer else stop
            model.run_with_hooks(ids, attention_mask=mask, stop_at_layer=stop_at, fwd_hooks=fwd_hooks)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    valid = torch.ones(tokens.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    if writer is not None:
        return writer.finish(valid, tuple(layers), tuple(hooks))
    acts = {(s, i): store[(s, i)] for i in layers for s in hooks}
    return ActivationSet(acts, shapes, valid, tuple(layers), tuple(hooks))


# ---- statistics ----------------------------------------------------------------------------------
@dataclass
class HookStats:
    """Statistics of one hook at one layer. Scalars go to ``result.json``; per-dimension arrays to files."""

    summary: dict[str, Any]
    per_dim: dict[str, np.ndarray] = field(default_factory=dict)
    extent: tuple[float, float] = (0.0, 0.0)
    """(min, max) over every entry (histogram ranges)."""


def _as_chunks(x: torch.Tensor | ActivationChunks) -> ActivationChunks:
    if isinstance(x, ActivationChunks):
        return x
    if x.ndim != 2:
        raise ValueError(f"expected [N tokens, k dims], got {tuple(x.shape)}")
    return ActivationChunks.of(x.detach().cpu(), max(1, CHUNK_BYTES // (4 * max(1, x.shape[1]))))


@dataclass
class _Moments:
    """Two-pass float64 moments of [N, k] rows: per dimension (central 2nd–4th, raw 2nd) and pooled over all."""

    n: int
    mean: np.ndarray  # (k,)
    m2: np.ndarray  # (k,) Σ (x − μ_d)²
    m4: np.ndarray  # (k,) Σ (x − μ_d)⁴
    sq: np.ndarray  # (k,) Σ x²
    mean_all: float
    p2: float  # Σ (x − μ)² over every entry
    p4: float
    lo: float
    hi: float


def _moments(src: ActivationChunks) -> _Moments:
    k = src.width
    s1, lo, hi = torch.zeros(k, dtype=torch.float64), float("inf"), float("-inf")
    for c in src:
        a = c.double()
        s1 += a.sum(0)
        if a.numel():
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
    n = src.n
    mean_d, mean_all = s1 / n, float(s1.sum()) / (n * k)
    m2, m4, sq = (torch.zeros(k, dtype=torch.float64) for _ in range(3))
    p2 = p4 = 0.0
    for c in src:
        a = c.double()
        d2 = (a - mean_d).square_()
        m2 += d2.sum(0)
        m4 += d2.square_().sum(0)
        sq += a.square().sum(0)
        g2 = (a - mean_all).square_()
        p2 += float(g2.sum())
        p4 += float(g2.square_().sum())
    return _Moments(n, mean_d.numpy(), m2.numpy(), m4.numpy(), sq.numpy(), mean_all, p2, p4, lo, hi)


def _fisher_kurtosis(m2: np.ndarray | float, m4: np.ndarray | float, n: int) -> np.ndarray | float:
    """Biased excess kurtosis m4/m2² − 3 from central sums (``scipy.stats.kurtosis(fisher=True, bias=True)``); NaN
    for a constant input, as scipy gives."""
    with np.errstate(all="ignore"):
        var = np.asarray(m2, dtype=np.float64) / n
        out = np.where(var > 0, (np.asarray(m4, dtype=np.float64) / n) / var**2 - 3.0, np.nan)
    return out if out.ndim else float(out)


def baseline_stats(x: torch.Tensor | ActivationChunks, dead_threshold: float = 0.01, outlier_ratio: float = 5.0,
                   top: int = 10) -> HookStats:
    """Statistics of ``x`` [N, k] (N tokens, k dimensions; a tensor or :class:`ActivationChunks` streamed in two
    float64 passes); see the module docstring."""
    src = _as_chunks(x)
    if src.n < 2:
        raise ValueError(f"baseline_stats needs [N >= 2 tokens, k dims], got {src.n} tokens")
    mo = _moments(src)
    n, k = mo.n, src.width
    mean_d, std_d = mo.mean, np.sqrt(mo.m2 / n)  # (k,)
    rms_d = np.sqrt(mo.sq / n)  # (k,)
    kurt_d = np.asarray(_fisher_kurtosis(mo.m2, mo.m4, n), dtype=np.float64)  # (k,) nan for constant dims
    median_rms = float(np.median(rms_d))
    scale = max(median_rms, np.finfo(np.float64).tiny)
    ratio = rms_d / scale  # (k,)
    dead = ratio < dead_threshold
    outlier = ratio > outlier_ratio
    order = np.argsort(-ratio)
    outliers = [int(i) for i in order if outlier[i]][:top]
    pooled_std = float(np.sqrt(mo.p2 / (n * k)))
    pooled_kurt = float(_fisher_kurtosis(mo.p2, mo.p4, n * k)) if pooled_std > 0 else float("nan")
    summary = {
        "dims": int(k),
        "tokens": int(n),
        "mean": mo.mean_all,
        "std": pooled_std,
        "rms": float(np.sqrt(mo.sq.sum() / (n * k))),
        "abs_max": max(abs(mo.lo), abs(mo.hi)),
        "kurtosis": pooled_kurt,
        "kurtosis_dim_median": float(np.nanmedian(kurt_d)) if np.isfinite(kurt_d).any() else float("nan"),
        "median_dim_rms": median_rms,
        "max_rms_ratio": float(ratio.max()),
        "dead_fraction": float(dead.mean()),
        "n_dead": int(dead.sum()),
        "n_outlier": int(outlier.sum()),
        "outlier_dims": outliers,
    }
    per_dim = {"mean": mean_d, "std": std_d, "rms": rms_d, "kurtosis": kurt_d}
    return HookStats(summary, per_dim, (mo.lo, mo.hi))


def quantile_sample(src: ActivationChunks, limit: int = QUANTILE_TOKENS) -> torch.Tensor:
    """[min(N, limit), k]: every row when N <= limit, else ``limit`` evenly spaced rows (deterministic)."""
    if src.n <= limit:
        return src.read_all()
    return src.gather(torch.from_numpy(np.linspace(0, src.n - 1, limit).round().astype(np.int64)))


def delta_stats(dt: torch.Tensor | ActivationChunks, A: torch.Tensor, seq_len: int) -> HookStats:
    """Δ distribution per channel/head: dt [N, k] (k = e for Mamba-1, h for Mamba-2; a tensor or chunks), A the
    (negative) decay rates: [e, n] (Mamba-1) or [h] (Mamba-2). Quantiles over at most ``QUANTILE_TOKENS`` tokens."""
    src = _as_chunks(dt)
    a = A.detach().double().cpu().abs().numpy()
    slowest = a.min(axis=1) if a.ndim == 2 else a  # (k,) slowest decay rate |A| per channel / head
    if slowest.shape[0] != src.width:
        raise ValueError(f"delta_stats: dt has {src.width} channels but A has {slowest.shape[0]}")
    mo = _moments(src)
    sample = quantile_sample(src).double().numpy()  # (≤ QUANTILE_TOKENS, k)
    q = np.quantile(sample, QUANTILES, axis=0)  # (5, k)
    med = q[2]
    mean = mo.mean
    cv = np.sqrt(mo.m2 / mo.n) / np.maximum(mean, 1e-12)  # (k,) coefficient of variation over tokens
    with np.errstate(divide="ignore"):
        tau = 1.0 / np.maximum(med * slowest, 1e-30)  # (k,) e-folding time in tokens of the slowest mode
    summary = {
        "channels": int(src.width),
        "median": float(np.median(sample)),
        "mean": mo.mean_all,
        "channel_median_min": float(med.min()),
        "channel_median_max": float(med.max()),
        "cv_median": float(np.median(cv)),
        "cv_max": float(cv.max()),
        "most_selective": [int(i) for i in np.argsort(-cv)[:5]],
        "timescale_median": float(np.median(tau)),
        "timescale_max": float(tau.max()),
        "long_memory_fraction": float((tau > seq_len).mean()),
    }
    per_dim = {"quantiles": q, "cv": cv, "timescale": tau}
    return HookStats(summary, per_dim, (mo.lo, mo.hi))


def per_head_rms(rms: np.ndarray, heads: int) -> np.ndarray:
    """RMS per head from the per-dimension RMS [h·p] of Mamba-2's x, y: -> [h]."""
    k = rms.shape[0]
    if k % heads:
        raise ValueError(f"per_head: width {k} is not a multiple of {heads} heads")
    return np.sqrt((np.asarray(rms, dtype=np.float64) ** 2).reshape(heads, k // heads).mean(axis=1))


def per_head(x: torch.Tensor, heads: int) -> np.ndarray:
    """RMS per head of ``x`` [N, h·p] (Mamba-2's x, y): -> [h]."""
    a = x.detach().double().cpu().numpy()
    return per_head_rms(np.sqrt((a * a).mean(0)), heads)


def norm_by_position(norm: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
                     mask: torch.Tensor | None = None) -> np.ndarray:
    """Mean over batch and channels of a [b, l, k] norm at each position (masked positions excluded) -> [l].
    ``norm`` may instead be chunks ``(values [s, l, k], mask [s, l])`` over the sequences (``iter_sequences``)."""
    chunks = [(norm, mask)] if isinstance(norm, torch.Tensor) else norm
    total = count = None
    for values, m in chunks:
        mf = m.float()[..., None]  # (s, l, 1)
        t = (values.double() * mf).sum(dim=(0, 2))
        c = mf.expand_as(values).double().sum(dim=(0, 2))
        total, count = (t, c) if total is None else (total + t, count + c)
    return (total / count.clamp(min=1)).numpy()
