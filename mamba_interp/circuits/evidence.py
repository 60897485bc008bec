"""Circuits from other analyses' evidence, put on the same footing as the attribution circuit.

Each evidence source names *what* might carry the behaviour; real patching decides *where* (which position
classes): every evidence unit is denoised alone at each position class of the pair, and kept at the classes
where it restores at least ``min_share`` of its best class's effect (:func:`place`). The resulting circuits are
then tested like any other (``evaluate``), with random controls of the same layout.

* SAE latents (step 3): the decoder directions of the latents that best track the task variables, patched as a
  subspace of their hook (:func:`sae_units`).
* Probes (step 4): the support of the best sparse probe per variable (flattened dims of its hook;
  :func:`probe_units`), and the top state channels (Mamba-1) / heads (Mamba-2) of the state probes
  (:func:`state_probe_units`).
* Hidden attention (step 7): the channels (heads) whose hidden attention from the answer position to the final
  position is largest (Ali et al. 2024, arXiv 2403.01590), at their readout ``y`` (:func:`attention_units`).
* Temporal influence (step 8): the (layer, source position class) cells with most influence on the answer, as
  whole-site units of the residual stream entering that layer (:func:`influence_units`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mamba_interp.circuits.pair import PatchPair
from mamba_interp.circuits.units import Circuit, Unit

ANY_CLASS = "*"


def place(pair: PatchPair, units: Sequence[Unit], name: str, source: str, min_share: float = 0.1,
          info: dict[str, Any] | None = None) -> Circuit:
    """A circuit of ``units`` (position class ``"*"`` = to be placed) at the position classes where each restores
    ≥ ``min_share`` of its best class's denoising effect (at least its best class)."""
    placed: list[Unit] = []
    effects: dict[str, dict[str, float]] = {}
    for u in units:
        if u.position_class != ANY_CLASS:
            placed.append(u)
            continue
        per_class = {}
        for label in pair.classes:
            trial = Unit(u.layer, u.hook, label, u.channels, u.flat, u.basis)
            per_class[label] = float(pair.sufficiency(Circuit("probe", (trial,))).mean())
        best = max(per_class.values())
        keep = [c for c, v in per_class.items() if best > 0 and v >= min_share * best] or [max(per_class,
                                                                                               key=per_class.get)]
        placed.extend(Unit(u.layer, u.hook, c, u.channels, u.flat, u.basis) for c in keep)
        effects[f"L{u.layer} {u.hook}"] = per_class
    return Circuit(name, tuple(placed), source, {**(info or {}), "placement_effects": effects,
                                                 "min_share": min_share})


def sae_units(latents: Sequence[tuple[int, str, torch.Tensor]]) -> list[Unit]:
    """One subspace unit per (layer, hook) spanned by the given decoder directions ([F] each)."""
    groups: dict[tuple[int, str], list[torch.Tensor]] = {}
    for layer, hook, direction in latents:
        groups.setdefault((int(layer), hook), []).append(torch.as_tensor(direction, dtype=torch.float64).flatten())
    out = []
    for (layer, hook), dirs in groups.items():
        basis = torch.stack(dirs)
        rank = int(torch.linalg.matrix_rank(basis))
        q, _ = torch.linalg.qr(basis.T)
        out.append(Unit(layer, hook, ANY_CLASS, basis=tuple(map(tuple, q[:, :rank].T.tolist()))))
    return out


def probe_units(best: Mapping[str, Mapping[str, Any]], max_dims: int | None = None) -> list[Unit]:
    """The support of each variable's best probe: ``{variable: {"layer", "hook", "support": [flat dims]}}``.
    Probes whose support exceeds ``max_dims`` (dense probes) localise nothing and are left out."""
    out = []
    for rec in best.values():
        support = list(rec.get("support") or [])
        if not support or (max_dims is not None and len(support) > max_dims):
            continue
        out.append(Unit(int(rec["layer"]), str(rec["hook"]), ANY_CLASS, tuple(support), flat=True))
    return out


def state_probe_units(state_probes: Mapping[str, Mapping[Any, Mapping[str, Any]]], k: int | None = None
                      ) -> list[Unit]:
    """``{variable: {layer: {"top": [channel/head indices]}}}`` -> state units (first ``k`` of each)."""
    out = []
    for per_layer in state_probes.values():
        for layer, rec in per_layer.items():
            top = list(rec.get("top") or [])[:k]
            if top:
                out.append(Unit(int(layer), "ssm_state", ANY_CLASS, tuple(top)))
    return out


def attention_units(top_channels: Mapping[Any, Sequence[int]], k: int) -> list[Unit]:
    """``{layer: [channels ranked by hidden attention]}`` -> the readout ``y`` of the top ``k`` per layer."""
    return [Unit(int(layer), "y", ANY_CLASS, tuple(list(ch)[:k])) for layer, ch in top_channels.items() if len(ch)]


def influence_units(influence: Mapping[Any, Mapping[str, float]], classes: Sequence[str], share: float = 0.9,
                    hook: str = "resid_pre", rename: Mapping[str, str] | None = None) -> list[Unit]:
    """``{layer: {source position class: influence}}`` -> whole-site units of ``hook`` at the largest cells that
    together hold ≥ ``share`` of the total influence. ``rename`` maps the evidence's class names onto ``classes``
    (cells of other classes are ignored; renamed cells of one class add up)."""
    rename = dict(rename or {})
    summed: dict[tuple[int, str], float] = {}
    for layer, row in influence.items():
        for c, v in row.items():
            c = rename.get(c, c)
            if c in classes and float(v) > 0:
                key = (int(layer), c)
                summed[key] = summed.get(key, 0.0) + float(v)
    cells = sorted(((v, layer, c) for (layer, c), v in summed.items()), reverse=True)
    total = sum(v for v, _, _ in cells)
    out, acc = [], 0.0
    for v, layer, c in cells:
        if total and acc >= share * total:
            break
        out.append(Unit(layer, hook, c))
        acc += v
    return out
