"""Parameter decomposition of a :class:`~mamba_interp.models.HookedMamba` (SPD paper §2 applied per token).

Decomposed: the mixers' Linears — Mamba-1 ``in_proj`` (d → 2e), ``x_proj`` (e → r + 2n), ``dt_proj`` (r → e),
``out_proj`` (e → d); Mamba-2 ``in_proj`` and ``out_proj``. Frozen at the target's values: the conv, A_log, D, every
bias (dt_proj's Δ bias included), the norms, the embedding and the LM head. The mixers call these Linears as
modules, so the masked stand-ins of ``components.stand_in`` replace them on every code path (the tests check each
matrix is masked; HF's ``MambaMixer`` computes ``dt_proj.weight @ ...`` directly, which is why this works on our
own mixers and not through hooks on transformers').

Causal importances and masks are per token, [b, l, C]: a^l is the matrix's input at that position. A mask at
position t changes the state at every later position, so each masked forward runs the whole sequence, and the
output loss is KL(target ‖ masked) on the logits, summed over the vocabulary and averaged over all real positions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_interp.parameter_decomposition.decomposition import Decomposition, Target, decompose
from mamba_interp.tasks.base import IGNORE, TaskBatch

MATRICES = {"mamba1": ("in_proj", "x_proj", "dt_proj", "out_proj"), "mamba2": ("in_proj", "out_proj")}


def mamba_modules(model: Any, layers: Sequence[int] | None = None, matrices: Sequence[str] | None = None
                  ) -> tuple[str, ...]:
    """Module names ``blocks.{i}.mixer.{matrix}`` of the chosen layers (default all) and matrices (default all
    of the architecture)."""
    arch, n_layer = model.cfg.arch, model.cfg.n_layer
    layers = tuple(range(n_layer)) if layers is None else tuple(layers)
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"layer {bad[0]} does not exist; the model has layers 0..{n_layer - 1}")
    matrices = MATRICES[arch] if matrices is None else tuple(matrices)
    unknown = [m for m in matrices if m not in MATRICES[arch]]
    if unknown:
        raise ValueError(f"matrix {unknown[0]!r} is not a Linear of a {arch} mixer; choose from {MATRICES[arch]}")
    return tuple(f"blocks.{i}.mixer.{m}" for i in layers for m in matrices)


def valid_tokens(batch: TaskBatch) -> Tensor | None:
    return None if batch.attention_mask is None else batch.attention_mask.bool()


def token_kl(logits: Tensor, target_logits: Tensor) -> Tensor:
    """[b, l]: KL(target ‖ model) at each position, summed over the vocabulary."""
    logp = F.log_softmax(logits.float(), -1)
    logq = F.log_softmax(target_logits.float(), -1)
    return (logq.exp() * (logq - logp)).sum(-1)


def kl_loss(logits: Tensor, target_logits: Tensor, batch: TaskBatch) -> Tensor:
    """KL(target ‖ model) per position, summed over the vocabulary, averaged over the real positions."""
    kl = token_kl(logits, target_logits)  # (b, l)
    valid = valid_tokens(batch)
    if valid is None:
        return kl.mean()
    valid = valid.to(kl.device)
    return (kl * valid).sum() / valid.sum().clamp(min=1)


def forward_tokens(model: Any, batch: TaskBatch) -> Tensor:
    device = next(model.parameters()).device
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    return model(batch.tokens.to(device), attention_mask=mask)


def task_sampler(task: Any, seq_len: int | None = None, split: str = "train") -> Callable[[int, torch.Generator],
                                                                                          TaskBatch]:
    """Fresh task batches for training: each call draws a seed from the decomposition's generator."""

    def sample(batch_size: int, generator: torch.Generator) -> TaskBatch:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return task.sample(batch_size, seed=seed, seq_len=seq_len, split=split)

    return sample


def repeated_token_sampler(vocab_size: int, seq_len: int) -> Callable[[int, torch.Generator], TaskBatch]:
    """Repeated random tokens (for a model without a task): the pipeline's language-model dataset."""
    from mamba_interp.pipeline.datasets import repeated_tokens

    def sample(batch_size: int, generator: torch.Generator) -> TaskBatch:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return repeated_tokens(vocab_size, batch_size, seq_len, seed)

    return sample


def mamba_target(model: Any, sample: Callable[[int, torch.Generator], TaskBatch],
                 layers: Sequence[int] | None = None, matrices: Sequence[str] | None = None) -> Target:
    """The decomposition target: the chosen Linears of ``model``, KL over all positions as the output loss."""
    return modules_target(model, sample, mamba_modules(model, layers, matrices))


def modules_target(model: Any, sample: Callable[[int, torch.Generator], TaskBatch], names: Sequence[str]) -> Target:
    """The decomposition target of the named Linears (from :func:`mamba_modules`)."""
    return Target(model, tuple(names), sample, forward_tokens, kl_loss, token_mask=valid_tokens)


def decompose_mamba(model: Any, sample: Callable[[int, torch.Generator], TaskBatch], method: str = "spd",
                    layers: Sequence[int] | None = None, matrices: Sequence[str] | None = None, seed: int = 0,
                    **config: Any) -> Decomposition:
    """Decompose the mixers' Linears of ``model`` (SPD or APD); ``config`` overrides ``SPDConfig``/``APDConfig``.

    >>> dec = decompose_mamba(model, task_sampler(task), layers=[1], C=32, steps=500, batch_size=16)
    """
    return decompose(mamba_target(model, sample, layers, matrices), method, seed, config)


# ---- evaluation with masks ---------------------------------------------------------------------------------
MODES = ("target", "ones", "importance")


@torch.no_grad()
def masked_logits(dec: Decomposition, batch: TaskBatch, mode: str = "importance",
                  ablate: Mapping[str, Tensor] | None = None, positions: Tensor | None = None) -> Tensor:
    """Logits [b, l, v] of the target (``"target"``), of the decomposed layers with every mask 1 (``"ones"``) or
    with the deterministic importance masks (``"importance"``: SPD's m = g, APD's top-k).

    ``ablate`` module -> subcomponent indices whose masks are set to 0 (only at ``positions`` [b, l] bool, if
    given); the other subcomponents keep the mode's masks.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {MODES}")
    target, model = dec.target, dec.model
    if mode == "target" and not ablate:
        return model.forward_with(target.forward, batch)
    b, l = batch.tokens.shape
    device = next(iter(target.weights().values())).device
    if mode == "importance":
        masks = dict(model.eval_masks(target, batch))
    else:
        masks = {n: torch.ones(b, l, model.n_components(n), device=device) for n in target.modules}
    for name, idx in (ablate or {}).items():
        m = masks[name].clone()
        idx = torch.as_tensor(idx, dtype=torch.long, device=m.device)
        where = (torch.ones(b, l, dtype=torch.bool, device=m.device) if positions is None
                 else positions.to(m.device))
        sub = m[..., idx]
        m[..., idx] = torch.where(where[..., None], torch.zeros_like(sub), sub)
        masks[name] = m
    return model.forward_with(target.forward, batch, masks)


def answer_scores(logits: Tensor, batch: TaskBatch) -> dict[str, Tensor]:
    """Per example [b]: ``correct`` (fraction of its scored positions predicted right; induction has one) and
    ``loss`` (mean cross-entropy over them)."""
    targets = batch.targets.to(logits.device)
    scored = batch.eval_mask.to(logits.device) & (targets != IGNORE)
    hit = (logits.argmax(-1) == targets) & scored
    logp = F.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    n = scored.sum(-1).clamp(min=1)
    return {"correct": (hit.sum(-1) / n).float().cpu(), "loss": (-(logp * scored).sum(-1) / n).cpu()}


def evaluate_modes(dec: Decomposition, batch: TaskBatch, batch_size: int,
                   modes: Sequence[str] = MODES) -> dict[str, dict[str, Tensor]]:
    """Per mode: per-example ``correct`` and ``loss`` (see :func:`answer_scores`) and ``kl`` to the target (mean over
    the example's positions)."""
    out: dict[str, dict[str, list[Tensor]]] = {m: {"correct": [], "loss": [], "kl": []} for m in modes}
    for start in range(0, len(batch), batch_size):
        sub = batch.select(slice(start, start + batch_size))
        ref = masked_logits(dec, sub, "target")
        for mode in modes:
            logits = ref if mode == "target" else masked_logits(dec, sub, mode)
            s = answer_scores(logits, sub)
            out[mode]["correct"].append(s["correct"])
            out[mode]["loss"].append(s["loss"])
            out[mode]["kl"].append(per_example_kl(logits, ref, sub))
    return {m: {k: torch.cat(v) for k, v in d.items()} for m, d in out.items()}


def ablation_scores(dec: Decomposition, batch: TaskBatch, batch_size: int, ablate: Mapping[str, Tensor],
                    positions: Tensor | None = None, mode: str = "ones") -> dict[str, Tensor]:
    """Per example ``correct`` and ``loss`` with the subcomponents ``ablate`` masked to 0 (at ``positions``
    [b, l], if given) and the rest at the ``mode``'s masks."""
    parts: dict[str, list[Tensor]] = {"correct": [], "loss": []}
    for start in range(0, len(batch), batch_size):
        sl = slice(start, start + batch_size)
        sub = batch.select(sl)
        pos = None if positions is None else positions[sl]
        s = answer_scores(masked_logits(dec, sub, mode, ablate=ablate, positions=pos), sub)
        parts["correct"].append(s["correct"])
        parts["loss"].append(s["loss"])
    return {k: torch.cat(v) for k, v in parts.items()}


def per_example_kl(logits: Tensor, target_logits: Tensor, batch: TaskBatch) -> Tensor:
    """[b]: KL(target ‖ model) averaged over each example's real positions."""
    kl = token_kl(logits, target_logits)  # (b, l)
    valid = valid_tokens(batch)
    if valid is None:
        return kl.mean(-1).cpu()
    valid = valid.to(kl.device)
    return ((kl * valid).sum(-1) / valid.sum(-1).clamp(min=1)).cpu()


def position_classes(batch: TaskBatch) -> dict[str, Tensor]:
    """Named [b, l] bool masks of the task's special positions, from its metadata's ``*_pos`` entries
    (induction: trigger, value, query/answer), plus ``other`` for the remaining real positions. Positions listed
    under several names (induction's query and answer) become one class named by all of them."""
    b, l = batch.tokens.shape
    classes: dict[str, Tensor] = {}
    for name, pos in batch.metadata.items():
        if not (name.endswith("_pos") and isinstance(pos, Tensor) and pos.shape[:1] == (b,)):
            continue
        m = torch.zeros(b, l, dtype=torch.bool)
        m.scatter_(1, pos.reshape(b, -1).long().clamp(0, l - 1), True)
        label = name[: -len("_pos")]
        same = next((k for k, v in classes.items() if torch.equal(v, m)), None)
        if same is not None:
            classes[f"{same}/{label}"] = classes.pop(same)
        else:
            classes[label] = m
    valid = torch.ones(b, l, dtype=torch.bool) if batch.attention_mask is None else batch.attention_mask.bool()
    special = torch.zeros(b, l, dtype=torch.bool)
    for m in classes.values():
        special |= m
    classes["other" if classes else "all"] = valid & ~special
    return classes
