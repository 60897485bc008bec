"""A clean / corrupted pair of batches, cached once, on which circuits are patched and ablated.

Faithfulness tests (Miller, Chughtai & Saunders 2024, arXiv 2407.08734; Wang et al. 2022): **sufficiency** —
run the corrupted input and patch only the circuit's clean activations in (fraction of the metric gap restored);
**necessity** — run the clean input and ablate only the circuit, with its mean (over the clean examples and the
unit's positions) or resampled from the corrupted partner (fraction of the gap lost, and the accuracy drop).
All values are normalised by the batch-mean gap m_clean − m_corrupt (``activation_patching.normalise``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mamba_interp.activation_patching import (
    Patch,
    Stacked,
    base_run,
    class_mean,
    correct,
    normalise,
    patched_metric,
    position_classes,
    task_metric,
)
from mamba_interp.activation_patching.engine import DEFAULT_MAX_CACHE_BYTES, BaseRun, hook_shapes
from mamba_interp.activation_patching.metrics import Metric
from mamba_interp.activation_patching.sites import DEFAULT_HOOKS, flat_features, resolve_hooks
from mamba_interp.circuits.units import Circuit

NECESSITY_KINDS = ("mean", "resample")


@dataclass
class PatchPair:
    """A model with a clean and a corrupted ``TaskBatch`` (aligned position by position), the metric, the
    position classes, and both runs cached (``hooks``: default the sweep's default hooks at every layer;
    ``ensure`` adds others on demand).

    >>> pair = PatchPair.build(model, clean_batch, task.corrupt(clean_batch, seed=1))
    >>> pair.sufficiency(circuit).mean()     # fraction of the logit difference the circuit restores
    """

    model: Any
    clean: Any
    corrupt: Any
    metric: Metric
    classes: dict[str, Tensor]
    clean_run: BaseRun
    corrupt_run: BaseRun
    batch_size: int | None = None
    window: bool = True
    state_mode: str = "propagate"
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES
    evaluations: int = 0
    _means: dict[tuple, Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model: Any, clean: Any, corrupt: Any, metric: Metric | None = None,
              classes: Mapping[str, Tensor] | None = None, hooks: Sequence[str] | None = None,
              batch_size: int | None = None,
              window: bool = True, state_mode: str = "propagate",
              max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES) -> PatchPair:
        if clean.tokens.shape != corrupt.tokens.shape:
            raise ValueError(f"clean and corrupted batches must have the same shape, got {tuple(clean.tokens.shape)} "
                             f"and {tuple(corrupt.tokens.shape)}")
        metric = metric if metric is not None else task_metric(clean, corrupt)
        if not isinstance(metric, Metric):
            raise TypeError("PatchPair needs an activation_patching Metric (e.g. logit_diff(...)); wrap a function "
                            "with custom_metric")
        both = Stacked(metric, correct(clean.metadata["answer"], metric.position))
        classes = dict(position_classes(clean) if classes is None else classes)
        hooks = resolve_hooks(model, DEFAULT_HOOKS) if hooks is None else list(hooks)
        kw = dict(attention_mask=clean.attention_mask, batch_size=batch_size, max_cache_bytes=max_cache_bytes)
        clean_run = base_run(model, clean.tokens, both, list(hooks), window=window, **kw)
        corrupt_run = base_run(model, corrupt.tokens, both, list(hooks), window=window,
                               **{**kw, "attention_mask": corrupt.attention_mask})
        return cls(model, clean, corrupt, both, classes, clean_run, corrupt_run, batch_size, window, state_mode,
                   max_cache_bytes)

    # ---- baselines -------------------------------------------------------------------------------
    @property
    def main_metric(self) -> Metric:
        """The metric the effects are measured in (``metric`` also carries the accuracy readout)."""
        return self.metric.metrics[0]

    @property
    def clean_values(self) -> Tensor:
        return self.clean_run.metric_values[:, 0]

    @property
    def corrupt_values(self) -> Tensor:
        return self.corrupt_run.metric_values[:, 0]

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_run.metric_values[:, 1].mean())

    @property
    def shapes(self) -> dict[str, tuple]:
        return hook_shapes(self.model)

    def __len__(self) -> int:
        return len(self.clean_run)

    def select(self, index: Tensor | slice) -> PatchPair:
        """The pair restricted to some examples (its caches sliced; metrics and classes follow). Effects on it are
        normalised by the subset's own gap."""
        idx = torch.arange(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index)
        return PatchPair(self.model, self.clean.select(idx), self.corrupt.select(idx), self.metric.subset(idx),
                         {k: v[idx] for k, v in self.classes.items()}, self.clean_run.select(idx),
                         self.corrupt_run.select(idx), self.batch_size, self.window, self.state_mode,
                         self.max_cache_bytes)

    def ensure(self, hooks: Sequence[str]) -> None:
        """Cache ``hooks`` (full names) in both runs if they are not there yet (with the default sweep hooks, so
        that later circuits rarely need another pass)."""
        missing = [h for h in dict.fromkeys(hooks) if h not in self.clean_run.cache]
        if not missing:
            return
        missing += [h for h in resolve_hooks(self.model, DEFAULT_HOOKS) if h not in self.clean_run.cache]
        missing = list(dict.fromkeys(missing))
        for run, batch in ((self.clean_run, self.clean), (self.corrupt_run, self.corrupt)):
            extra = base_run(self.model, batch.tokens, self.metric, missing, batch.attention_mask, self.batch_size,
                             window=False, boundary=[], max_cache_bytes=self.max_cache_bytes)
            run.cache.update(extra.cache)

    # ---- patches -----------------------------------------------------------------------------------
    def patches(self, circuit: Circuit, source: str) -> list[Patch]:
        """``source``: "clean" / "corrupt" (that run's activations) or "mean" (the clean class mean)."""
        self.ensure([u.hook_name for u in circuit.units])
        out = []
        for u in circuit.units:
            if u.position_class not in self.classes:
                raise KeyError(f"position class {u.position_class!r} is not defined here; classes: "
                               f"{sorted(self.classes)}")
            name, mask = u.hook_name, self.classes[u.position_class]
            if source == "mean":
                key = (name, u.position_class)
                if key not in self._means:
                    self._means[key] = class_mean(self.clean_run.cache[name], mask)
                src = self._means[key]
            else:
                src = (self.clean_run if source == "clean" else self.corrupt_run).cache[name]
            feats = None if u.basis is not None else flat_features(self.shapes[name], u.channels, u.flat)
            out.append(Patch(name, mask, src, feats, u.basis_tensor(), self.state_mode))
        return out

    def _run(self, base: BaseRun, patches: list[Patch]) -> Tensor:
        self.evaluations += 1
        return patched_metric(self.model, base, patches, self.metric, self.batch_size, self.window)

    # ---- the two tests ---------------------------------------------------------------------------
    def sufficiency(self, circuit: Circuit) -> Tensor:
        """[b] per-example fraction of the gap restored by denoising only the circuit (mean = the effect)."""
        vals = self._run(self.corrupt_run, self.patches(circuit, "clean"))
        return normalise(vals[:, 0], self.clean_values, self.corrupt_values, "denoise").float()

    def necessity(self, circuit: Circuit, kind: str = "resample") -> tuple[Tensor, Tensor]:
        """([b] per-example fraction of the gap lost, [b] 1.0 where the answer stays right) when the circuit is
        mean- or resample-ablated in the clean run."""
        if kind not in NECESSITY_KINDS:
            raise ValueError(f"necessity kind={kind!r} is unknown; use one of {NECESSITY_KINDS}")
        vals = self._run(self.clean_run, self.patches(circuit, "mean" if kind == "mean" else "corrupt"))
        lost = normalise(vals[:, 0], self.clean_values, self.corrupt_values, "noise").float()
        return lost, vals[:, 1]
