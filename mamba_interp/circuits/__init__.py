"""Candidate circuits on the coarse graph (layer, hook, position class, channel/head), and their causal tests.

    >>> from mamba_interp.circuits import PatchPair, find_circuit, evaluate_circuit, random_circuits
    >>> pair = PatchPair.build(model, clean_batch, task.corrupt(clean_batch, seed=1))   # caches both runs once
    >>> circuit = find_circuit(pair, threshold=0.9)          # AtP-ranked growth, pruned by real patching
    >>> test = evaluate_circuit(PatchPair.build(model, heldout, task.corrupt(heldout, 2)), circuit, n_random=100)
    >>> test.to_dict()["sufficiency"], test.p_value
    >>> Circuit.from_dict(circuit.to_dict())                # serialisable: units (layer, hook, class, channels)

``find_circuit`` / ``evaluate_circuit`` also take ``(model, clean, corrupt, metric=None)`` directly. Modules:
``units`` (:class:`Unit`, :class:`Circuit`, :func:`random_circuits`), ``pair`` (:class:`PatchPair`: sufficiency,
necessity), ``search`` (:func:`find_circuit`), ``evaluate`` (:func:`evaluate_circuit`, :func:`size_curve`,
:func:`atp_agreement`), ``evidence`` (circuits from SAE latents, probes, hidden attention, temporal influence).
"""

from mamba_interp.circuits.evaluate import CircuitTest, atp_agreement, evaluate_circuit, size_curve
from mamba_interp.circuits.evidence import (
    attention_units,
    influence_units,
    place,
    probe_units,
    sae_units,
    state_probe_units,
)
from mamba_interp.circuits.pair import PatchPair
from mamba_interp.circuits.search import as_pair, find_circuit, unit_scores
from mamba_interp.circuits.units import Circuit, Unit, merge_units, random_circuits

__all__ = [
    "Circuit", "CircuitTest", "PatchPair", "Unit", "as_pair", "atp_agreement", "attention_units",
    "evaluate_circuit", "find_circuit", "influence_units", "merge_units", "place", "probe_units",
    "random_circuits", "sae_units", "size_curve", "state_probe_units", "unit_scores",
]
