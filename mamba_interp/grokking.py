"""Grokking progress measures for modular addition (Nanda et al. 2023, "Progress measures for grokking via
mechanistic interpretability", arXiv 2301.05217, §4–5 and their ``progress-measures-paper`` helpers).

The measures need only the model's logits on all p² inputs (a, b, =), so they apply to a Mamba unchanged:

* :func:`fourier_basis`: the orthonormal Fourier basis over Z_p (row 0 constant, rows 2k−1 / 2k cos / sin of
  frequency k = 1..p//2; for even p the last frequency has only its cosine).
* :func:`frequency_energy`: per-frequency squared norm of a function of one token (an embedding [p, d], or an
  SSM input at the token's position), mean-centred over tokens so the constant carries nothing; its
  :func:`gini` coefficient measures the sparsity over frequencies; :func:`key_frequencies` is the smallest set of
  top frequencies holding a given fraction of it.
* :func:`sum_directions`: the unit vectors ∝ cos(w_k(a + b)) and sin(w_k(a + b)) over the p² inputs (their
  ``get_component_cos_xpy`` / ``sin_xpy``); :func:`project_frequencies` projects the logits (per output class) on
  them; :func:`excluded_loss` = CE on the train pairs of Λ − Π_K(Λ) (key frequencies removed) and
  :func:`restricted_loss` = CE on all pairs of Π_K(Λ) + mean_inputs(Λ − Π_K(Λ)) (only key frequencies kept,
  with their bias correction). Excluded loss rises while the circuit forms; restricted loss falls before the
  test loss does.
* :func:`progress_measures`: all of these for one model; :func:`locate_phases`: memorisation, circuit formation
  and cleanup located on a training log's curves.

Logits keep every real output class (the p numbers and ``=``), as the training loss does, so the measures with
nothing removed reproduce the model's own loss. Index letters: a, b the operands, c the output class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


# ---- Fourier basis over Z_p -------------------------------------------------------------------------
def n_frequencies(p: int) -> int:
    """Non-constant frequencies over Z_p: p // 2."""
    return p // 2


def fourier_basis(p: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """[p, p] orthonormal rows: constant, then cos k, sin k for k = 1..p//2 (even p: only cos p/2)."""
    if not isinstance(p, int) or p < 2:
        raise ValueError(f"p={p!r} must be an integer >= 2")
    x = torch.arange(p, dtype=torch.float64)
    rows = [torch.ones(p, dtype=torch.float64)]
    for k in range(1, p // 2 + 1):
        rows.append(torch.cos(2 * math.pi * k * x / p))
        if 2 * k != p:  # sin(π x) vanishes on Z_p
            rows.append(torch.sin(2 * math.pi * k * x / p))
    basis = torch.stack(rows)
    return (basis / basis.norm(dim=1, keepdim=True)).to(dtype)


def frequency_of_row(p: int) -> Tensor:
    """[p] the frequency (0..p//2) of each row of :func:`fourier_basis`."""
    return torch.tensor([0] + [k for k in range(1, p // 2 + 1) for _ in range(1 if 2 * k == p else 2)])


def frequency_energy(values: Tensor, center: bool = True) -> Tensor:
    """Squared norm per frequency of a function of one token, ``values`` [p, ...] (row = token value).

    Returns [p//2 + 1] (index = frequency; index 0 the constant, zero when ``center``). The entries sum to the
    squared norm of the (centred) values (Parseval).
    """
    p = values.shape[0]
    x = values.reshape(p, -1).double()
    if center:
        x = x - x.mean(0, keepdim=True)
    coef = fourier_basis(p) @ x  # (p, k)
    energy = torch.zeros(p // 2 + 1, dtype=torch.float64)
    return energy.index_add_(0, frequency_of_row(p), coef.pow(2).sum(-1))


def top_fraction(energy: Tensor, k: int) -> float:
    """Fraction of the non-constant energy held by the ``k`` largest frequencies."""
    e = energy[1:]
    total = float(e.sum())
    return float(e.sort(descending=True).values[:k].sum()) / total if total > 0 else float("nan")


def key_frequencies(energy: Tensor, threshold: float = 0.85, max_k: int | None = None) -> list[int]:
    """The fewest largest frequencies (1..p//2) whose energy reaches ``threshold`` of the non-constant total,
    at most ``max_k`` of them; sorted by decreasing energy."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold} must be in (0, 1]")
    e = energy[1:]
    order = torch.argsort(e, descending=True, stable=True)
    cum = torch.cumsum(e[order], 0) / e.sum().clamp(min=1e-300)
    n = int((cum < threshold - 1e-12).sum()) + 1
    n = min(n, len(order) if max_k is None else max_k)
    return [int(i) + 1 for i in order[:n]]


def gini(values: Tensor | Sequence[float]) -> float:
    """Gini coefficient of non-negative values (0 = all equal, → 1 = all mass on one); Hurley & Rickard 2009's
    sparsity measure, as Nanda et al. use for the Fourier coefficients."""
    x = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    n, total = x.size, x.sum()
    if n == 0 or total <= 0:
        return float("nan")
    return float(1 - 2 * np.sum(np.cumsum(x) / total) / n + 1 / n)


# ---- logits over all inputs and the (a + b) directions ------------------------------------------------
def sum_directions(p: int, k: int) -> Tensor:
    """[2, p²] unit vectors over the inputs a·p + b: ∝ cos(w_k(a + b)) and sin(w_k(a + b)) (one for k = p/2)."""
    a = torch.arange(p, dtype=torch.float64)
    phase = 2 * math.pi * k * (a[:, None] + a[None, :]) / p  # (a, b)
    dirs = [torch.cos(phase).reshape(-1)]
    if 2 * k != p:
        dirs.append(torch.sin(phase).reshape(-1))
    d = torch.stack(dirs)
    return d / d.norm(dim=1, keepdim=True)


def project_frequencies(logits: Tensor, p: int, freqs: Sequence[int]) -> Tensor:
    """Π_K(Λ): the logits [p², c] projected, column by column, on the (a + b) directions of ``freqs``."""
    lg = logits.double()
    out = torch.zeros_like(lg)
    for k in sorted(set(int(f) for f in freqs)):
        if not 1 <= k <= p // 2:
            raise ValueError(f"frequency {k} is outside 1..{p // 2}")
        d = sum_directions(p, k).to(lg.device)  # (2, p²)
        out += d.T @ (d @ lg)
    return out


def _ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example cross-entropy in float64 (float32 log-softmax underflows on confident logits)."""
    return -torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None].long())[:, 0]


def excluded_loss(logits: Tensor, labels: Tensor, p: int, freqs: Sequence[int], where: Tensor | None = None,
                  per_example: bool = False) -> Tensor:
    """CE of Λ − Π_K(Λ) (key frequencies removed) over the inputs ``where`` [p²] (Nanda et al.: the train set)."""
    ce = _ce(logits.double() - project_frequencies(logits, p, freqs), labels)
    ce = ce if where is None else ce[where]
    return ce if per_example else ce.mean()


def restricted_loss(logits: Tensor, labels: Tensor, p: int, freqs: Sequence[int], where: Tensor | None = None,
                    per_example: bool = False) -> Tensor:
    """CE of Π_K(Λ) + mean over inputs of (Λ − Π_K(Λ)) (only key frequencies kept; the mean term restores the
    input-independent bias) over ``where`` (Nanda et al.: all inputs).

    With every frequency kept the restricted logits are Λ's projection on functions of (a + b) mod p: they equal
    Λ, and the loss the model's, exactly when the model's logits depend on a and b only through a + b.
    """
    lg = logits.double()
    kept = project_frequencies(lg, p, freqs)
    ce = _ce(kept + (lg - kept).mean(0, keepdim=True), labels)
    ce = ce if where is None else ce[where]
    return ce if per_example else ce.mean()


def logit_frequency_energy(logits: Tensor, p: int) -> Tensor:
    """[p//2 + 1] energy of the input-centred logits [p², c] along each frequency's (a + b) directions."""
    lg = logits.double() - logits.double().mean(0, keepdim=True)
    energy = torch.zeros(p // 2 + 1, dtype=torch.float64)
    for k in range(1, p // 2 + 1):
        energy[k] = (sum_directions(p, k) @ lg).pow(2).sum()
    return energy


@torch.no_grad()
def all_pairs(model: Any, p: int, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
    """Logits at the ``=`` position of every input (a, b, =), in the order a·p + b: ([p², v_real], labels [p²])."""
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    ids = torch.stack([a, b, torch.full_like(a, p)], 1)
    device = next(model.parameters()).device
    v = model.cfg.vocab_size
    out = [model(ids[s:s + batch_size].to(device))[:, -1, :v].float().cpu() for s in range(0, p * p, batch_size)]
    return torch.cat(out), (a + b) % p


# ---- one snapshot -----------------------------------------------------------------------------------
SSM_INPUTS = ("x", "B", "C")


@dataclass
class ProgressMeasures:
    """The progress measures of one model (one training snapshot). Losses are mean cross-entropies in nats;
    ``embed_energy`` / ``ssm_energy[name]`` are per-frequency energies [p//2 + 1] (lists)."""

    step: int | None
    train_loss: float
    test_loss: float
    train_accuracy: float
    test_accuracy: float
    excluded_loss: float
    restricted_loss: float
    weight_norm_sq: float
    embed_energy: list[float]
    embed_gini: float
    embed_top_fraction: float  # fraction held by the top ``top_k`` frequencies
    logit_energy: list[float]
    ssm_energy: dict[str, list[float]] = field(default_factory=dict)
    ssm_gini: dict[str, float] = field(default_factory=dict)
    per_example: dict[str, Tensor] = field(default_factory=dict, repr=False)  # "train_ce", "test_ce", "excluded"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "per_example"}


@torch.no_grad()
def ssm_input_energy(model: Any, p: int, layer: int = 0) -> dict[str, Tensor]:
    """Per-frequency energy of the SSM inputs (x, B, C of ``layer``) at position 0 of (a, b, =): the causal conv
    sees only a there, so each is a function of a alone ([p, k] over a)."""
    ids = torch.stack([torch.arange(p), torch.zeros(p, dtype=torch.long), torch.full((p,), p)], 1)
    names = [f"blocks.{layer}.mixer.hook_{s}" for s in SSM_INPUTS]
    _, cache = model.run_with_cache(ids.to(next(model.parameters()).device), names_filter=names)
    return {s: frequency_energy(cache[n][:, 0].reshape(p, -1).cpu()) for s, n in zip(SSM_INPUTS, names)}


@torch.no_grad()
def progress_measures(model: Any, p: int, is_train: Tensor, key_freqs: Sequence[int], step: int | None = None,
                      top_k: int = 8) -> ProgressMeasures:
    """All measures of ``model`` on modular addition mod ``p``: ``is_train`` [p²] bool marks the train pairs
    (order a·p + b, as ``ModularAdditionTask.split_indices``); ``key_freqs`` the frequencies the excluded and
    restricted losses use (Nanda et al. take the final model's for every snapshot)."""
    from mamba_interp.tasks.training import weight_norm_sq

    is_train = torch.as_tensor(is_train, dtype=torch.bool)
    logits, labels = all_pairs(model, p)
    ce = _ce(logits, labels)
    right = logits.argmax(-1) == labels
    embed = frequency_energy(model.embed.weight.detach()[:p].cpu())
    ssm = ssm_input_energy(model, p)
    excl = excluded_loss(logits, labels, p, key_freqs, is_train, per_example=True)
    return ProgressMeasures(
        step=step,
        train_loss=float(ce[is_train].mean()), test_loss=float(ce[~is_train].mean()),
        train_accuracy=float(right[is_train].double().mean()), test_accuracy=float(right[~is_train].double().mean()),
        excluded_loss=float(excl.mean()),
        restricted_loss=float(restricted_loss(logits, labels, p, key_freqs)),
        weight_norm_sq=weight_norm_sq(model),
        embed_energy=embed.tolist(), embed_gini=gini(embed[1:]), embed_top_fraction=top_fraction(embed, top_k),
        logit_energy=logit_frequency_energy(logits, p).tolist(),
        ssm_energy={k: v.tolist() for k, v in ssm.items()}, ssm_gini={k: gini(v[1:]) for k, v in ssm.items()},
        per_example={"train_ce": ce[is_train], "test_ce": ce[~is_train], "excluded": excl},
    )


# ---- phases -----------------------------------------------------------------------------------------
def _first(steps: np.ndarray, cond: np.ndarray) -> int | None:
    hit = np.flatnonzero(cond)
    return int(steps[hit[0]]) if hit.size else None


def knee(x: np.ndarray, y: np.ndarray) -> int:
    """Index of the knee of a decreasing curve: the point farthest above the chord joining its ends, after
    scaling both axes to [0, 1] (Satopää et al. 2011, "Kneedle"). For a curve that falls slowly and then fast,
    that is where the fast fall begins."""
    if len(x) < 3:
        return 0
    xs = (x - x[0]) / max(x[-1] - x[0], 1e-12)
    ys = (y - y[-1]) / max(y[0] - y[-1], 1e-12)
    return int(np.argmax(ys - (1 - xs)))


def locate_phases(evals: Sequence[dict[str, Any]], accuracy: float = 0.99) -> dict[str, Any]:
    """Memorisation, circuit formation and cleanup on a training log's ``evals`` (``step``, ``train_acc``,
    ``test_acc``, ``test_loss``): memorisation ends when train accuracy first reaches ``accuracy``; cleanup ends
    when test accuracy first does; it begins at the knee of log(test loss) between the two (where the test loss
    starts its fast fall); circuit formation lies in between. Returns ``phases`` ({name: [start, end]}, empty
    when the run never memorises or never generalises) and the boundary steps."""
    steps = np.array([e["step"] for e in evals], dtype=np.int64)
    train_acc = np.array([e["train_acc"] for e in evals], dtype=np.float64)
    test_acc = np.array([e["test_acc"] for e in evals], dtype=np.float64)
    test_loss = np.array([e["test_loss"] for e in evals], dtype=np.float64)
    memorised = _first(steps, train_acc >= accuracy)
    generalised = _first(steps, test_acc >= accuracy)
    out: dict[str, Any] = {"memorised_at": memorised, "generalised_at": generalised, "cleanup_from": None,
                           "phases": {}}
    if memorised is None or generalised is None or generalised <= memorised:
        return out
    sel = (steps >= memorised) & (steps <= generalised)
    cleanup = int(steps[sel][knee(steps[sel].astype(float), np.log(np.maximum(test_loss[sel], 1e-12)))])
    out["cleanup_from"] = cleanup
    out["phases"] = {"memorisation": [0, memorised], "circuit_formation": [memorised, cleanup],
                     "cleanup": [cleanup, generalised]}
    return out


# ---- a whole training run ---------------------------------------------------------------------------
@dataclass
class GrokkingRun:
    """Progress measures over a run's snapshots (``measures``, in step order), the final snapshot's key
    frequencies, the phases from the log's curves, and the excluded-loss check."""

    p: int
    key_frequencies: list[int]
    measures: list[ProgressMeasures]
    phases: dict[str, Any]
    excluded_rise: dict[str, Any] | None

    @property
    def steps(self) -> list[int]:
        return [int(m.step) for m in self.measures]


def _excluded_rise(measures: Sequence[ProgressMeasures], phases: dict[str, Any], n_resamples: int,
                   seed: int) -> dict[str, Any] | None:
    """Does the excluded loss rise during circuit formation, before the cleanup's fast test-loss fall? The
    rise is from its lowest snapshot after memorisation to the last snapshot before the cleanup starts, with a
    paired bootstrap CI over the train pairs."""
    from mamba_interp.stats import paired_diff_ci

    start, stop = phases.get("memorised_at"), phases.get("cleanup_from")
    if start is None or stop is None:
        return None
    window = [m for m in measures if start <= m.step <= stop]
    if len(window) < 2:
        return {"rises": None, "reason": f"fewer than two snapshots between steps {start} and {stop}"}
    low = min(window[:-1], key=lambda m: m.excluded_loss)
    last = window[-1]
    if last.step == low.step:
        return {"rises": False, "from_step": low.step, "to_step": last.step}
    delta = paired_diff_ci(last.per_example["excluded"].numpy(), low.per_example["excluded"].numpy(),
                           n_resamples=n_resamples, seed=seed)
    return {"rises": bool(delta.ci_low > 0), "from_step": low.step, "to_step": last.step,
            "from": low.excluded_loss, "to": last.excluded_loss, "delta": delta.to_dict(),
            "train_loss_at_to": last.train_loss}


def analyse_run(final_model: Any, final_step: int, snapshots: dict[int, Any], p: int, is_train: Tensor,
                evals: Sequence[dict[str, Any]], threshold: float = 0.85, max_key: int = 8, top_k: int = 8,
                accuracy: float = 0.99, n_resamples: int = 2000, seed: int = 0) -> GrokkingRun:
    """Progress measures at every snapshot (``{step: snapshot_stepNNNNNN.safetensors path}``) and at the final
    model (step ``final_step``). The key frequencies are the final model's embedding's (:func:`key_frequencies`
    with ``threshold`` and ``max_key``), used for every snapshot's excluded and restricted loss, as Nanda et al.
    do. ``evals`` are the training log's evaluations (for :func:`locate_phases`)."""
    import copy

    from mamba_interp.tasks.training import load_snapshot

    key = key_frequencies(frequency_energy(final_model.embed.weight.detach()[:p].cpu()), threshold, max_key)
    measures = []
    for step, path in snapshots.items():
        if step == final_step:
            continue
        model = load_snapshot(copy.deepcopy(final_model), path)
        measures.append(progress_measures(model, p, is_train, key, step=step, top_k=top_k))
    measures.append(progress_measures(final_model, p, is_train, key, step=final_step, top_k=top_k))
    measures.sort(key=lambda m: m.step)
    phases = locate_phases(evals, accuracy)
    return GrokkingRun(p, key, measures, phases, _excluded_rise(measures, phases, n_resamples, seed))
