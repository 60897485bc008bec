"""State probes: where in a layer's SSM state h_t a variable is held (pipeline step 4).

h_t is read through ``hook_ssm_state`` one layer at a time and kept only at the probed tokens, so the [b, l, e, n]
states exist only for one batch of one layer at a time. A unit is a channel of Mamba-1 (its [n] state) or a head of
Mamba-2 (its [p, n] state, flattened).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mamba_interp.probing.probes import Probe, fit_probe
from mamba_interp.probing.scores import split_indices, splits_both_ways
from mamba_interp.probing.search import UNIT_ALPHA, _est, _unest, unit_scores
from mamba_interp.probing.variables import VariableData
from mamba_interp.stats import Estimate


@dataclass
class StateProbe:
    """Where in layer ``layer``'s SSM state h_t a variable is held. The sequences are split in halves: on half A
    each unit (channel of Mamba-1, [n] features; head of Mamba-2, [p·n]) gets its own ridge probe, whose held-out
    score is its ``importance``; on half B a probe on the ``top`` units together is scored (``top_score``) against
    probes on random sets of as many units (``random_scores``), so the claim "these units hold it" is tested on
    sequences that did not choose them."""

    variable: str
    layer: int
    unit: str
    importance: list[float]
    top: list[int]
    top_score: Estimate
    random_scores: list[float]
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"variable": self.variable, "layer": self.layer, "unit": self.unit,
                "channel_importance": self.importance, "top": self.top, "top_score": _est(self.top_score),
                "random_scores": self.random_scores, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StateProbe:
        return cls(d["variable"], int(d["layer"]), d["unit"], list(d["channel_importance"]), list(d["top"]),
                   _unest(d["top_score"]), list(d["random_scores"]), int(d["tokens"]))


@torch.no_grad()
def collect_states(model: Any, batch: Any, layer: int, coords: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The SSM state after each token at ``coords`` [M, 2] (sequence, position) of one layer: [M, e, n] (Mamba-1)
    or [M, h, p, n] (Mamba-2), float32. The forward stops after ``layer``; only the chosen tokens are kept, so
    the [b, l, e, n] states exist only for one batch of one layer at a time."""
    device = next(model.parameters()).device
    out: torch.Tensor | None = None
    order = torch.argsort(coords[:, 0], stable=True)
    seqs = coords[order, 0]
    name = f"blocks.{layer}.mixer.hook_ssm_state"
    for start in range(0, len(batch), batch_size):
        sel = (seqs >= start) & (seqs < start + batch_size)
        if not bool(sel.any()):
            continue
        rows = order[sel]

        def keep(t: torch.Tensor, hook: Any, rows: torch.Tensor = rows, start: int = start) -> None:
            nonlocal out
            picked = t[coords[rows, 0] - start, coords[rows, 1]].float().cpu()  # (m, ...)
            if out is None:
                out = torch.empty(coords.shape[0], *picked.shape[1:])
            out[rows] = picked

        ids = batch.tokens[start:start + batch_size].to(device)
        mask = None if batch.attention_mask is None else batch.attention_mask[start:start + batch_size].to(device)
        stop = layer + 1 if layer + 1 < model.cfg.n_layer else None
        model.run_with_hooks(ids, attention_mask=mask, stop_at_layer=stop, fwd_hooks=[(name, keep)])
    if out is None:
        raise ValueError("no tokens to collect states at")
    return out


def probe_states(model: Any, batch: Any, layers: Sequence[int], variables: dict[str, VariableData],
                 top: int = 8, n_random: int = 5, seed: int = 0, batch_size: int = 64,
                 mask: torch.Tensor | None = None, progress: Callable[[Iterable], Iterable] | None = None
                 ) -> dict[str, dict[int, StateProbe]]:
    """:class:`StateProbe` for every variable and layer, reading ``hook_ssm_state`` one layer at a time at the
    variables' rows (``VariableData.rows`` over the valid tokens of ``mask``)."""
    if mask is None:
        mask = (torch.ones(batch.tokens.shape, dtype=torch.bool) if batch.attention_mask is None
                else batch.attention_mask.bool())
    coords_all = mask.nonzero()
    union = np.unique(np.concatenate([v.rows for v in variables.values()])) if variables else np.array([], int)
    out: dict[str, dict[int, StateProbe]] = {name: {} for name in variables}
    if union.size == 0:
        return out
    where = {int(r): i for i, r in enumerate(union)}
    unit = "head" if model.cfg.arch == "mamba2" else "channel"
    for layer in (progress(list(layers)) if progress is not None else layers):
        states = collect_states(model, batch, layer, coords_all[torch.as_tensor(union)], batch_size)  # (U, e, n)
        n_units = states.shape[1]
        width = int(np.prod(states.shape[2:]))
        # (U, units · width), unit-major; float32 (fit_probe takes each unit's columns to float64, the same numbers):
        # Mamba-2's states are h·p·n = 196k values per token at 130M, so a float64 copy of all would double them
        flat = states.reshape(states.shape[0], -1).numpy()
        units = [np.arange(u * width, (u + 1) * width) for u in range(n_units)]
        for i, var in enumerate(variables.values()):
            idx = np.fromiter((where[int(r)] for r in var.rows), dtype=np.int64, count=len(var.rows))
            x = flat if np.array_equal(idx, np.arange(len(flat))) else flat[idx]  # no copy for the union itself
            half_a, half_b = split_indices(len(var.y), var.groups, 0.5, seed + 1)
            usable = True
            for half in (half_a, half_b):  # each half is split again into train and test
                g = var.groups[half]
                usable &= np.unique(g).size > 1 and splits_both_ways(var.y[half], split_indices(len(g), g, 0.25, seed))
            if not usable:
                continue
            imp = unit_scores(x, var.y[half_a], units, var.groups[half_a], seed, rows=half_a)
            m = min(top, n_units)
            ranked = np.lexsort((np.arange(n_units), -imp))[:m]  # by importance, ties by index
            yb, gb = var.y[half_b], var.groups[half_b]

            def score(chosen: np.ndarray) -> Probe:
                cols = np.concatenate([units[u] for u in chosen])
                return fit_probe(x[np.ix_(half_b, cols)], yb, "ridge", groups=gb, seed=seed, task=var.task,
                                 alphas=(UNIT_ALPHA,))

            rng = np.random.default_rng([seed, layer, i])
            randoms = [score(np.sort(rng.choice(n_units, m, replace=False))).score for _ in range(n_random)]
            out[var.name][layer] = StateProbe(var.name, layer, unit, imp.tolist(), ranked.tolist(),
                                              score(np.sort(ranked)).score_estimate(seed=seed), randoms,
                                              int(var.rows.size))
        del states, flat
    return out

