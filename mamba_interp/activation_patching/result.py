"""The result of a patching sweep or an attribution: normalised effects per hook, position (and channel)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mamba_interp.activation_patching.sites import hook_layer, short_name


def normalise(values: Tensor, clean: Tensor, corrupt: Tensor, direction: str) -> Tensor:
    """Per-example effects with the batch-mean denominator (TransformerLens' normalisation): denoise
    (m − mean m_corrupt) / (mean m_clean − mean m_corrupt), noise (mean m_clean − m) / (same); 0 = the run patched
    into, 1 = full recovery (denoise) or full damage (noise). Their mean is the normalised effect of the means."""
    mc, mk = float(clean.double().mean()), float(corrupt.double().mean())
    den = mc - mk
    if abs(den) <= 1e-6 * max(1.0, abs(mc), abs(mk)):  # equal up to float rounding (different scan paths)
        raise ValueError("the metric is the same on the clean and the corrupted run; the effect is undefined "
                         "(check that the corrupted inputs change the answer)")
    if direction == "denoise":
        return (values.double() - corrupt.double().mean()) / den
    return (clean.double().mean() - values.double()) / den


@dataclass
class PatchResult:
    """Effects of patching (or their attribution estimate), normalised as in :func:`normalise`.

    ``effect[hook]``: [P] (P positions or position classes), or [P, C] per channel; ``per_example[hook]``:
    [b, P] / [b, P, C] (their mean over examples is ``effect``); ``positions``: the P labels;
    ``clean_metric``/``corrupt_metric``: batch means of the metric on the two runs; ``meta``: what was run
    (forward passes, cache sizes).
    """

    effect: dict[str, Tensor]
    per_example: dict[str, Tensor]
    positions: list
    direction: str
    method: str
    state_mode: str
    clean_metric: float
    corrupt_metric: float
    n_layer: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def hooks(self) -> list[str]:
        return list(self.effect)

    def ci(self, hook: str, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0
           ) -> tuple[Tensor, Tensor]:
        """Bootstrap CI over examples (``scipy.stats.bootstrap`` via ``mamba_interp.stats``) of every entry of
        ``effect[hook]``: (low, high), each shaped like the effect."""
        from mamba_interp.stats import bootstrap_ci

        per = self.per_example[hook]
        flat = per.reshape(per.shape[0], -1).numpy()
        bounds = np.array([bootstrap_ci(flat[:, j], "mean", confidence, n_resamples, seed) for j in range(flat.shape[1])])
        shape = self.effect[hook].shape
        return torch.from_numpy(bounds[:, 0]).reshape(shape), torch.from_numpy(bounds[:, 1]).reshape(shape)

    def top(self, k: int = 10, by_abs: bool = True) -> list[dict[str, Any]]:
        """The ``k`` largest effects (by absolute value unless ``by_abs=False``) over every hook, position and
        channel, as records ``{hook, position, channel, effect}``."""
        rows = []
        for hook, eff in self.effect.items():
            e = eff.reshape(len(self.positions), -1)
            for p in range(e.shape[0]):
                for c in range(e.shape[1]):
                    rows.append({"hook": hook, "position": self.positions[p],
                                 "channel": c if eff.dim() == 2 else None, "effect": float(e[p, c])})
        rows.sort(key=lambda r: -abs(r["effect"]) if by_abs else -r["effect"])
        return rows[:k]

    def to_dict(self, ci: bool = False, **ci_kw: Any) -> dict[str, Any]:
        """JSON-able: the effects (lists), labels, baselines and meta; with ``ci`` the bootstrap bounds too."""
        out: dict[str, Any] = {
            "direction": self.direction, "method": self.method, "state_mode": self.state_mode,
            "positions": [p if isinstance(p, (int, str)) else str(p) for p in self.positions],
            "clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric,
            "n_examples": int(next(iter(self.per_example.values())).shape[0]) if self.per_example else 0,
            "effect": {h: e.tolist() for h, e in self.effect.items()}, "meta": dict(self.meta),
        }
        if ci:
            out["ci"] = {h: [t.tolist() for t in self.ci(h, **ci_kw)] for h in self.effect}
        return out

    def grid(self, short: str) -> tuple[Tensor, list[int]]:
        """[layers, P] effects of every layer's hook ``short`` (e.g. ``"y"``), and the layers."""
        rows = [(hook_layer(h, self.n_layer), e) for h, e in self.effect.items() if short_name(h) == short]
        rows.sort(key=lambda r: r[0])
        if not rows:
            raise KeyError(f"no hook {short!r} in this result; it has {sorted({short_name(h) for h in self.effect})}")
        return torch.stack([e if e.dim() == 1 else e.sum(-1) for _, e in rows]), [r[0] for r in rows]

    def plot(self, shorts: list[str] | None = None, title: str | None = None):
        """A heatmap layer × position per hook type (per-channel results: summed over channels). Returns the
        matplotlib figure."""
        import matplotlib.pyplot as plt

        shorts = shorts or list(dict.fromkeys(short_name(h) for h in self.effect))
        cols = min(4, len(shorts))
        rows = -(-len(shorts) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 1.0 + 0.6 * rows * max(2, self.n_layer) ** 0.5 + 1),
                                 squeeze=False, layout="constrained")
        vmax = max(float(e.abs().max()) for e in self.effect.values()) or 1.0
        im = None
        for ax, s in zip(axes.flat, shorts):
            g, layers = self.grid(s)
            im = ax.imshow(g.numpy(), aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_yticks(range(len(layers)), [str(i) for i in layers])
            labels = [str(p) for p in self.positions]
            step = max(1, len(labels) // 12)
            ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=45 if isinstance(self.positions[0], str)
                          else 0, fontsize=7)
            ax.set(title=s, xlabel="position", ylabel="layer")
        for ax in list(axes.flat)[len(shorts):]:
            ax.axis("off")
        if im is not None:
            fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, label=f"normalised effect ({self.direction})")
        fig.suptitle(title or f"{self.method} {self.direction} patching")
        return fig
