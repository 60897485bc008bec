"""What a decomposition of a Mamba model says, as JSON-able figures with confidence intervals (steps 17–19).

* :func:`mode_report` — accuracy, answer loss and KL to the target of the target, the decomposed layers with every
  mask 1 ("ones": is Σ_c U_c V_cᵀ faithful?) and with the importance masks ("importance": do the subcomponents the
  decomposition calls important suffice?), per evaluation length, with bootstrap CIs over sequences and paired CIs
  of the difference to the target.
* :func:`importance_report` — per matrix: alive subcomponents, CI-L0 per token, large subcomponents, faithfulness.
* :func:`position_report` — per position class (trigger, value, query/answer, other for induction) the
  subcomponents with the largest mean importance there, their importance elsewhere, and the ground-truth variable
  (``pipeline.task_variables``, the variables steps 3 and 4 read) their importance correlates with best.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mamba_interp.parameter_decomposition.decomposition import Decomposition
from mamba_interp.parameter_decomposition.mamba import (
    evaluate_modes,
    position_classes,
    repeated_token_sampler,
    task_sampler,
)
from mamba_interp.parameter_decomposition.metrics import alive, n_large
from mamba_interp.stats import estimate, paired_diff_ci
from mamba_interp.tasks.base import TaskBatch


def training_sampler(task: Any, vocab_size: int, seq_len: int):
    """Fresh training batches: the task's train split at ``seq_len``, or repeated random tokens without a task."""
    if task is not None:
        return task_sampler(task, seq_len=seq_len, split="train")
    return repeated_token_sampler(vocab_size, seq_len)


def length_batches(task: Any, vocab_size: int, batch: TaskBatch, n: int, multiples: tuple[int, ...], seed: int
                   ) -> tuple[dict[str, TaskBatch], list[str]]:
    """Evaluation batches by length: ``"1x"`` is the first ``n`` sequences of ``batch``; ``"{k}x"`` are ``n`` fresh
    test sequences k times as long (when the task can generate them). Returns (batches, notes)."""
    from mamba_interp.pipeline.datasets import repeated_tokens

    out = {"1x": batch.select(slice(0, n))}
    notes = []
    for k in multiples:
        if k == 1:
            continue
        length = k * batch.seq_len
        try:
            if task is not None:
                out[f"{k}x"] = task.sample(n, seed=seed + k, seq_len=length, split="test")
            else:
                out[f"{k}x"] = repeated_tokens(vocab_size, n, length, seed + k)
        except (TypeError, ValueError) as exc:
            notes.append(f"{k}x length skipped: {str(exc).splitlines()[0]}")
    return out, notes


def mode_report(dec: Decomposition, batches: dict[str, TaskBatch], batch_size: int, seed: int
                ) -> dict[str, dict[str, Any]]:
    """Per length label and mode: accuracy / answer loss / KL with CIs, and the paired difference to the target."""
    report: dict[str, dict[str, Any]] = {}
    for label, batch in batches.items():
        res = evaluate_modes(dec, batch, batch_size)
        ref = res["target"]
        entry: dict[str, Any] = {"n": len(batch), "seq_len": batch.seq_len}
        for mode, r in res.items():
            entry[mode] = {"accuracy": estimate(r["correct"], seed=seed).to_dict(),
                           "loss": estimate(r["loss"], seed=seed).to_dict(),
                           "kl": estimate(r["kl"], seed=seed).to_dict()}
            if mode != "target":
                entry[mode]["accuracy_minus_target"] = paired_diff_ci(r["correct"], ref["correct"],
                                                                      seed=seed).to_dict()
        report[label] = entry
    return report


def importances_on(dec: Decomposition, batch: TaskBatch, batch_size: int) -> dict[str, Tensor]:
    """Importances per module, [b, l, C], computed in chunks."""
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(batch), batch_size):
        for name, ci in dec.importances(batch.select(slice(start, start + batch_size))).items():
            parts.setdefault(name, []).append(ci.detach().cpu())
    return {n: torch.cat(v) for n, v in parts.items()}


def valid_mask(batch: TaskBatch) -> Tensor:
    b, l = batch.tokens.shape
    return torch.ones(b, l, dtype=torch.bool) if batch.attention_mask is None else batch.attention_mask.bool()


def importance_report(dec: Decomposition, imps: dict[str, Tensor], batch: TaskBatch, threshold: float, seed: int
                      ) -> dict[str, dict[str, Any]]:
    """Per module: C, alive (importance > threshold on some token), CI-L0 per token at 0.1 and at ``threshold``
    (mean over sequences, CI over sequences), subcomponents with norm > 0.3 × the largest, relative weight error
    ‖W − Σ_c P_c‖ / ‖W‖."""
    valid = valid_mask(batch)
    out = {}
    for name, ci in imps.items():
        W = dec.target.model.get_submodule(name).weight.detach()
        rel = float((W - dec.model.weight(name).detach()).norm() / W.norm().clamp_min(1e-12))
        per_seq = {}
        for t in (0.1, threshold):
            active = (ci > t).sum(-1).double()  # (b, l)
            per_seq[t] = (active * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        live = alive(ci[valid], threshold)
        out[name] = {"C": int(ci.shape[-1]), "alive": int(live.sum()), "n_large": n_large(dec.model.norms(name).cpu()),
                     "ci_l0_0.1": estimate(per_seq[0.1], seed=seed).to_dict(),
                     f"ci_l0_{threshold:g}": estimate(per_seq[threshold], seed=seed).to_dict(),
                     "relative_weight_error": rel}
    return out


def flat_importances(imps: dict[str, Tensor], valid: Tensor) -> tuple[Tensor, list[tuple[str, int]]]:
    """All subcomponents side by side on the valid tokens: ([N, K], the (module, index) of each column)."""
    cols, ids = [], []
    for name, ci in imps.items():
        cols.append(ci[valid])
        ids += [(name, c) for c in range(ci.shape[-1])]
    return torch.cat(cols, dim=1), ids


def position_report(imps: dict[str, Tensor], batch: TaskBatch, top_k: int, seed: int, n_shuffles: int = 3
                    ) -> dict[str, list[dict[str, Any]]]:
    """Per position class: the ``top_k`` subcomponents by mean importance in the class, with their mean importance
    on the other tokens and their best-correlated ground-truth variable (|r|, and the best |r| of shuffled
    variables as the chance level)."""
    from mamba_interp.pipeline.task_variables import expand_variables, task_variables
    from mamba_interp.sparse_autoencoder.analysis import feature_variable_correlation

    valid = valid_mask(batch)
    flat, ids = flat_importances(imps, valid)  # (N, K)
    classes = {k: v[valid] for k, v in position_classes(batch).items()}
    variables, _ = expand_variables(task_variables(batch, valid), valid)
    chosen: dict[str, list[int]] = {}
    for cls, mask in classes.items():
        if int(mask.sum()) == 0:
            continue
        inside = flat[mask].double().mean(0)
        chosen[cls] = inside.argsort(descending=True)[:top_k].tolist()
    union = sorted({j for js in chosen.values() for j in js})
    corr = None
    if union and variables:
        corr = feature_variable_correlation(flat[:, union], variables, n_shuffles=n_shuffles, seed=seed % 2**31)
    out: dict[str, list[dict[str, Any]]] = {}
    for cls, js in chosen.items():
        mask = classes[cls]
        rows = []
        for j in js:
            name, c = ids[j]
            rec: dict[str, Any] = {"module": name, "subcomponent": c,
                                   "mean_importance": float(flat[mask, j].double().mean()),
                                   "mean_importance_elsewhere": float(flat[~mask, j].double().mean())
                                   if bool((~mask).any()) else None}
            if corr is not None:
                col = union.index(j)
                r = corr.r[:, col]
                best = int(r.abs().argmax())
                rec.update({"best_variable": corr.names[best], "r": float(r[best]),
                            "shuffled_best_abs_r": float(corr.shuffled_best_abs_r[best])})
            rows.append(rec)
        out[cls] = rows
    return out
