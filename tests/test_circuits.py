"""circuits: units and serialisation, matched random controls, sufficiency / necessity against hand-written patches,
the attribution search on the trained default model, evaluation statistics, evidence placement."""

from __future__ import annotations

import json

import pytest
import torch

from mamba_interp import zoo
from mamba_interp.activation_patching import ablate, position_classes
from mamba_interp.circuits import (
    Circuit,
    PatchPair,
    Unit,
    attention_units,
    evaluate_circuit,
    find_circuit,
    influence_units,
    merge_units,
    place,
    probe_units,
    random_circuits,
    sae_units,
    state_probe_units,
)


@pytest.fixture(scope="module")
def default_pair():
    """32 induction examples of the default zoo model and their corrupted partners (X after the trigger changed)."""
    model, task = zoo.load(), zoo.load_task()
    clean = task.sample(32, seed=0, split="test")
    return PatchPair.build(model, clean, task.corrupt(clean, seed=1))


def test_units_and_circuits_round_trip():
    units = (Unit(0, "y", "final", (5, 2, 5)), Unit(0, "y", "final", (7,)), Unit(1, "x", "answer"),
             Unit(1, "resid_post", "final", basis=((1.0, 0.0, 0.0, 0.0),)), Unit(0, "x", "answer", (3, 9), flat=True))
    c = Circuit("demo", units, "test", {"note": 1})
    assert [u.channels for u in c.units if u.hook == "y"] == [(2, 5, 7)]  # merged per site
    back = Circuit.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back.units == c.units and back.name == "demo" and back.info == {"note": 1}
    assert merge_units([Unit(0, "y", "final", (1,)), Unit(0, "y", "final")]) == (Unit(0, "y", "final"),)
    assert Unit(0, "y", "final").hook_name == "blocks.0.mixer.hook_y"
    with pytest.raises(ValueError, match="empty"):
        Unit(0, "y", "final", ())


def test_random_circuits_match_the_layout(default_pair):
    shapes = default_pair.shapes
    c = Circuit("c", (Unit(0, "y", "final", (1, 2, 3)), Unit(1, "x", "answer", (4,)), Unit(0, "out", "final"),
                      Unit(0, "x", "answer", basis=tuple(tuple(float(i == j) for i in range(128)) for j in range(2)))))
    controls = random_circuits(c, 20, shapes, seed=4)
    again = random_circuits(c, 20, shapes, seed=4)
    assert [r.units for r in controls] == [r.units for r in again]  # seeded
    for r in controls:
        assert r.layout(shapes) == c.layout(shapes) and r.size(shapes) == c.size(shapes)
        basis = next(u for u in r.units if u.basis is not None).basis_tensor()
        assert torch.allclose(basis.T @ basis, torch.eye(2), atol=1e-5)
    assert len({r.units for r in controls}) == 20
    assert controls[0].info["fixed_units"] == 1  # the all-channel unit cannot vary


def test_sufficiency_and_necessity_equal_hand_written_patches(default_pair):
    pair = default_pair
    model, clean, corrupt = pair.model, pair.clean, pair.corrupt
    circuit = Circuit("c", (Unit(0, "y", "final", (3, 8, 40)), Unit(0, "conv", "answer", (1, 2))))
    m = pair.main_metric
    with torch.no_grad():
        lc, cc = model.run_with_cache(clean.tokens)
        lk, ck = model.run_with_cache(corrupt.tokens)
    mc, mk = m(lc).double(), m(lk).double()

    def hooks(src):
        out = []
        for u in circuit.units:
            mask = pair.classes[u.position_class][..., None] & torch.zeros(128, dtype=torch.bool).index_fill_(
                0, torch.tensor(u.channels), True)
            out.append((u.hook_name, lambda x, h, mask=mask, n=u.hook_name: torch.where(mask, src[n], x)))
        return out

    with torch.no_grad():
        ref_suff = (m(model.run_with_hooks(corrupt.tokens, fwd_hooks=hooks(cc))).double() - mk.mean()) / (
            mc.mean() - mk.mean())
        ref_nec = (mc.mean() - m(model.run_with_hooks(clean.tokens, fwd_hooks=hooks(ck))).double()) / (
            mc.mean() - mk.mean())
    assert torch.allclose(pair.sufficiency(circuit).double(), ref_suff, atol=2e-5)
    lost, ok = pair.necessity(circuit, "resample")
    assert torch.allclose(lost.double(), ref_nec, atol=2e-5)
    # mean ablation = ablate(kind="mean") of each unit over its class
    sites = [(u.hook_name, pair.classes[u.position_class], list(u.channels)) for u in circuit.units]
    ref = m(ablate(model, clean.tokens, sites, kind="mean")).double()
    lost_mean, _ = pair.necessity(circuit, "mean")
    assert torch.allclose(lost_mean.double(), (mc.mean() - ref) / (mc.mean() - mk.mean()), atol=2e-5)
    assert set(pair.classes) == {"trigger", "answer", "final", "other"}


def test_find_circuit_on_the_default_model(default_pair):
    circuit = find_circuit(default_pair, hooks=["resid_pre", "x", "ssm_state", "y"], threshold=0.9, max_evals=40)
    info = circuit.info
    assert info["reached"] and info["sufficiency"] >= 0.9
    assert float(default_pair.sufficiency(circuit).mean()) >= 0.9
    assert info["evaluations"] <= 40 and len(info["ranking"]) == 256
    # smaller than the whole state readout of layer 0 at the final token, which restores everything
    assert circuit.size(default_pair.shapes) < 128
    assert Circuit.from_dict(circuit.to_dict()).units == circuit.units


def test_evaluate_circuit_statistics(default_pair):
    circuit = Circuit("y_final", (Unit(0, "y", "final", tuple(range(0, 128, 2))),))
    test = evaluate_circuit(default_pair, circuit, n_random=12, seed=1, n_permutations=999)
    d = test.to_dict()
    for key in ("sufficiency", "sufficiency_ci", "necessity", "necessity_ci", "units", "p_value",
                "random_sufficiency_mean", "random_necessity_mean"):
        assert key in d
    assert d["units"] == 64 and d["n_examples"] == 32 and len(test.random["sufficiency"]) == 12
    assert d["sufficiency_ci"][0] <= d["sufficiency"] <= d["sufficiency_ci"][1]
    # an all-channel circuit is its own control: flagged, and the test cannot reject
    whole = evaluate_circuit(default_pair, Circuit("whole", (Unit(0, "y", "final"),)), n_random=3, n_permutations=99)
    assert whole.degenerate_null and whole.p_value > 0.4 and whole.to_dict()["sufficiency"] > 0.99
    with pytest.raises(ValueError, match="null kind"):
        evaluate_circuit(default_pair, circuit, n_random=1, null_kinds=("bogus",))


def test_evidence_units_and_placement(default_pair):
    pair = default_pair
    d = pair.shapes["blocks.0.mixer.hook_y"][0]
    units = (sae_units([(0, "y", torch.randn(d)), (0, "y", torch.randn(d))])
             + probe_units({"v": {"layer": 0, "hook": "x", "support": [1, 5, 9]}, "empty": {"layer": 0, "hook": "x"}})
             + state_probe_units({"v": {0: {"top": [4, 1, 2]}}}, k=2)
             + attention_units({1: [3, 2, 1]}, k=2))
    assert [u.hook for u in units] == ["y", "x", "ssm_state", "y"]
    assert len(units[0].basis) == 2 and units[1].flat and units[2].channels == (1, 4)
    c = place(pair, [Unit(0, "y", "*")], "ev", "test")
    assert [u.position_class for u in c.units] == ["final"]  # layer 0's readout acts at the final token
    assert c.info["placement_effects"]["L0 y"]["final"] > 0.9
    cells = influence_units({0: {"answer": 3.0, "final": 1.0, "trigger": 0.1, "bogus": 9.0}}, list(pair.classes))
    assert [(u.layer, u.position_class) for u in cells] == [(0, "answer"), (0, "final")]
    renamed = influence_units({1: {"source": 2.0, "query": 1.0, "recent": 0.3, "other": 0.3}}, list(pair.classes),
                              share=0.99, rename={"source": "answer", "query": "final", "recent": "other"})
    assert [(u.hook, u.position_class) for u in renamed] == [("resid_pre", "answer"), ("resid_pre", "final"),
                                                             ("resid_pre", "other")]
    assert position_classes(pair.clean)["final"].sum() == len(pair)
