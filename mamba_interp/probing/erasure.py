"""Concept erasure (LEACE) and the amnesic test: does the model use what a probe reads?

* :func:`erase_concept` — LEACE (Belrose et al. 2023, arXiv 2306.03819) from the ``concept-erasure`` package: the
  least-squares affine edit after which no linear classifier beats a constant one (class-conditional means equal).
* :func:`amnesic_effect` — amnesic probing (Elazar et al. 2021, arXiv 2006.00995, §3): the change of the model's
  accuracy and loss when a hook's activation is replaced by its erased version during the forward pass (the edited
  activation propagates to every later computation). Erasing a variable the model uses must hurt; erasing one it
  does not use must not.
* :func:`amnesic_test` — both for one (layer, hook): the variable, and the same labels permuted across tokens, an
  eraser of the same rank for a concept the model cannot use (the random-direction control of Elazar et al.).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mamba_interp.probing.probes import _as_numpy, _labels
from mamba_interp.probing.scores import REGRESSION
from mamba_interp.stats import Estimate


def _concept_matrix(y: np.ndarray, task: str) -> torch.Tensor:
    """[N, K] one-hot classes (classification) or [N, 1] values (regression), float64."""
    if task == REGRESSION:
        return torch.as_tensor(y, dtype=torch.float64)[:, None]
    classes, inv = np.unique(y, return_inverse=True)
    return torch.nn.functional.one_hot(torch.as_tensor(inv), classes.size).double()


def erase_concept(X: Any, y: Any, task: str | None = None, **leace: Any) -> tuple[Any, Any]:
    """LEACE-erase ``y`` from ``X`` [N, d]: ``(X_erased, eraser)``; ``eraser(x)`` applies the same affine edit to new
    rows (a ``concept_erasure.LeaceEraser``, float64). ``leace``: options of ``LeaceFitter`` (e.g. ``shrinkage``).
    X_erased has X's type (tensor or array) and dtype."""
    from concept_erasure import LeaceEraser

    yy, task = _labels(y, task)
    x = torch.as_tensor(_as_numpy(X))
    if x.ndim != 2 or x.shape[0] != yy.shape[0]:
        raise ValueError(f"X must be [N, d] with one row per label, got {tuple(x.shape)} and {yy.shape[0]} labels")
    eraser = LeaceEraser.fit(x, _concept_matrix(yy, task), **leace)
    erased = eraser(x)
    if isinstance(X, torch.Tensor):
        return erased.to(X.dtype), eraser
    return erased.numpy().astype(np.asarray(X).dtype, copy=False), eraser


@dataclass
class AmnesicEffect:
    """The model with and without a hook's activation erased: accuracy over the batch's scored positions and loss
    over its targets; ``example_accuracy_change`` (the fraction of examples with every scored position right) and
    ``p_correct_change`` (an example's mean probability of the correct token), erased − clean, with paired
    bootstrap CIs over examples. With one scored position per example (induction, IOI, factual recall) the example
    accuracy is the accuracy."""

    hook_name: str
    clean_accuracy: float
    erased_accuracy: float
    clean_loss: float
    erased_loss: float
    example_accuracy_change: Estimate
    p_correct_change: Estimate
    erased_positions: int

    @property
    def loss_change(self) -> float:
        return self.erased_loss - self.clean_loss

    def to_dict(self) -> dict[str, Any]:
        return {"hook": self.hook_name, "clean_accuracy": self.clean_accuracy, "erased_accuracy": self.erased_accuracy,
                "clean_loss": self.clean_loss, "erased_loss": self.erased_loss, "loss_change": self.loss_change,
                "accuracy_change": self.erased_accuracy - self.clean_accuracy,
                "example_accuracy_change": self.example_accuracy_change.to_dict(),
                "p_correct_change": self.p_correct_change.to_dict(), "erased_positions": self.erased_positions}


def erasing_hook(eraser: Any, positions: torch.Tensor | None = None) -> Any:
    """A hook function replacing the activation [b, l, ...] (flattened per token to the eraser's width) by
    ``eraser(activation)`` at ``positions`` [b, l] (all positions when None)."""

    def fn(t: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = t.reshape(*t.shape[:2], -1)  # (b, l, k)
        # the eraser lives on the CPU in float64 (where it was fitted); the activation may be on a GPU
        erased = eraser(flat.cpu().double()).to(t.device, t.dtype)
        if positions is not None:
            erased = torch.where(positions.to(t.device)[..., None], erased, flat)
        return erased.reshape(t.shape)

    return fn


@dataclass
class ModelRun:
    """The model on a batch: accuracy over the scored positions, loss over the targets, and per example whether
    every scored position is right and the mean p(correct token)."""

    accuracy: float
    loss: float
    example_correct: np.ndarray
    p_correct: np.ndarray


def run_model(model: Any, batch: Any, batch_size: int = 64, hook_name: str | None = None, eraser: Any = None,
              positions: torch.Tensor | None = None, start: tuple[int, torch.Tensor] | None = None) -> ModelRun:
    """:class:`ModelRun` of ``batch`` (``pipeline.datasets.evaluate``, one batch of ``batch_size`` sequences at a
    time), with ``hook_name``'s activation erased by ``eraser`` at ``positions`` [b, l] when given.
    ``start=(layer, resid)``: begin at block ``layer`` from the cached residual stream entering it [b, l, d] of the
    whole batch (``pipeline.logits.layer_input``); the erased hook must be at that layer or later."""
    from mamba_interp.pipeline.datasets import evaluate
    from mamba_interp.tasks.base import IGNORE

    correct = scored = loss = targets = 0.0
    examples, p = [], []
    for s in range(0, len(batch), batch_size):
        part = batch.select(slice(s, s + batch_size))
        resid = None if start is None else (start[0], start[1][s:s + batch_size])
        if hook_name is None:
            ev = evaluate(model, part, len(part), start=resid)
        else:
            pos = None if positions is None else positions[s:s + batch_size]
            with model.hooks([(hook_name, erasing_hook(eraser, pos))]):
                ev = evaluate(model, part, len(part), start=resid)
        n_targets = int((part.targets != IGNORE).sum())
        correct += ev["accuracy"] * ev["scored_positions"]
        scored += ev["scored_positions"]
        loss += ev["loss"] * n_targets
        targets += n_targets
        examples.append(ev["example_correct"].double())
        p.append(ev["p_correct"])
    return ModelRun(correct / max(scored, 1), loss / max(targets, 1), torch.cat(examples).numpy(),
                    torch.cat(p).numpy())


def amnesic_effect(model: Any, batch: Any, hook_name: str, eraser: Any, positions: torch.Tensor | None = None,
                   batch_size: int = 64, n_resamples: int = 1000, seed: int = 0, clean: ModelRun | None = None,
                   start: tuple[int, torch.Tensor] | None = None) -> AmnesicEffect:
    """Run ``batch`` (a ``TaskBatch``) clean and with ``hook_name``'s activation erased at ``positions`` [b, l]
    (bool; None: every position), and compare the model's accuracy, p(correct) and loss. ``clean``: the clean
    :func:`run_model` of the same batch, when several erasures share it; ``start``: as in :func:`run_model`."""
    from mamba_interp.stats import paired_diff_ci

    if hook_name not in model.hook_dict:
        raise ValueError(f"hook {hook_name!r} does not exist in this model; e.g. {next(iter(model.hook_dict))}")
    if positions is not None and tuple(positions.shape) != tuple(batch.tokens.shape):
        raise ValueError(f"positions must be [b, l] = {tuple(batch.tokens.shape)}, got {tuple(positions.shape)}")
    clean = clean if clean is not None else run_model(model, batch, batch_size, start=start)
    erased = run_model(model, batch, batch_size, hook_name, eraser, positions, start=start)
    kw = dict(n_resamples=n_resamples, seed=seed)
    return AmnesicEffect(
        hook_name=hook_name, clean_accuracy=clean.accuracy, erased_accuracy=erased.accuracy, clean_loss=clean.loss,
        erased_loss=erased.loss,
        example_accuracy_change=paired_diff_ci(erased.example_correct, clean.example_correct, **kw),
        p_correct_change=paired_diff_ci(erased.p_correct, clean.p_correct, **kw),
        erased_positions=int(batch.tokens.numel() if positions is None else positions.sum()),
    )


# ---- the amnesic test of a probe ------------------------------------------------------------------------
@dataclass
class AmnesicTest:
    """LEACE erasure of a variable at one hook, and of the same variable's labels permuted across the probed
    tokens (a concept of the same rank the model cannot use), applied at the variable's positions."""

    variable: str
    layer: int
    hook: str
    rank: int
    erased: AmnesicEffect
    control: AmnesicEffect
    relative_change: float
    """‖X − X_erased‖ / ‖X − mean(X)‖ on the fitted tokens: how much of the activation the erasure moves."""
    control_relative_change: float

    def to_dict(self) -> dict[str, Any]:
        return {"variable": self.variable, "layer": self.layer, "hook": self.hook, "rank": self.rank,
                "erased": self.erased.to_dict(), "control": self.control.to_dict(),
                "relative_change": self.relative_change, "control_relative_change": self.control_relative_change}


def amnesic_test(model: Any, x: torch.Tensor, y: Any, layer: int, hook: str, eval_batch: Any,
                 eval_positions: torch.Tensor | None, task: str | None = None, variable: str = "",
                 batch_size: int = 64, seed: int = 0, n_resamples: int = 1000, clean: ModelRun | None = None,
                 start: tuple[int, torch.Tensor] | None = None) -> AmnesicTest:
    """Fit LEACE on ``x`` [M, k] (the hook's activation at the tokens labelled ``y`` [M]) for ``y`` and for ``y``
    permuted, then run ``eval_batch`` with each eraser applied at ``eval_positions`` [b, l] (:func:`amnesic_effect`;
    ``clean``: the clean :func:`run_model` of ``eval_batch``, shared by several tests; ``start``: the residual
    stream entering ``layer`` of ``eval_batch``, as in :func:`run_model`, so the passes skip the blocks before)."""
    from mamba_interp.pipeline.activation_stats import hook_name

    xx = torch.as_tensor(x).double()
    centred = torch.linalg.norm(xx - xx.mean(0)).clamp(min=1e-12)
    erased_x, eraser = erase_concept(xx, y, task=task)
    perm = np.random.default_rng(seed).permutation(np.asarray(y))
    ctrl_x, ctrl = erase_concept(xx, perm, task=task)
    name = hook_name(hook, layer)
    clean = clean if clean is not None else run_model(model, eval_batch, batch_size, start=start)
    kw = dict(batch_size=batch_size, n_resamples=n_resamples, seed=seed, clean=clean, start=start)
    rank = int(torch.linalg.matrix_rank(eraser.proj_left).item())
    return AmnesicTest(variable, layer, hook, rank,
                       amnesic_effect(model, eval_batch, name, eraser, eval_positions, **kw),
                       amnesic_effect(model, eval_batch, name, ctrl, eval_positions, **kw),
                       float(torch.linalg.norm(xx - erased_x) / centred),
                       float(torch.linalg.norm(xx - ctrl_x) / centred))
