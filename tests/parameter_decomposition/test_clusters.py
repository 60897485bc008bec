"""Greedy MDL merging against a brute-force description length, on planted co-activation groups."""

from __future__ import annotations

import itertools

import pytest
import torch

from mamba_interp.parameter_decomposition.clusters import (
    description_length,
    merge_by_mdl,
    merge_costs,
    stratified_random_like,
)


def planted(n_tokens: int = 2000, seed: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """Three mechanisms (sizes 4, 3, 2) that fire on disjoint random tokens, plus 3 independent singletons."""
    g = torch.Generator().manual_seed(seed)
    truth = [[0, 1, 2, 3], [4, 5, 6], [7, 8]]
    active = torch.zeros(n_tokens, 12, dtype=torch.bool)
    which = torch.randint(0, 4, (n_tokens,), generator=g)  # mechanism 3 = none of them
    for m, cols in enumerate(truth):
        active[torch.nonzero(which == m).flatten()[:, None], torch.tensor(cols)] = True
    active[:, 9:] = torch.rand(n_tokens, 3, generator=g) < 0.1
    return active, truth


def test_merge_cost_equals_the_change_in_description_length():
    active, _ = planted(500, seed=1)
    groups = [[j] for j in range(active.shape[1])]
    a = active.double()
    s = a.mean(0)
    s_or = torch.stack([(a[:, i, None].bool() | a.bool()).double().mean(0) for i in range(a.shape[1])])
    cost = merge_costs(s, torch.ones(len(s), dtype=torch.float64), s_or, alpha=1.0)
    base = description_length(active, groups, 1.0)
    for i, j in itertools.combinations(range(active.shape[1]), 2):
        merged = [g for t, g in enumerate(groups) if t not in (i, j)] + [[i, j]]
        assert float(cost[i, j]) == pytest.approx(description_length(active, merged, 1.0) - base, abs=1e-9)


def test_greedy_merging_recovers_planted_groups():
    active, truth = planted()
    res = merge_by_mdl(active, alpha=1.0)
    found = {tuple(sorted(g)) for g in res.groups}
    for t in truth:
        assert tuple(t) in found, (t, res.groups)
    assert res.mdl_end < res.mdl_start
    assert res.mdl_end == pytest.approx(description_length(active, res.groups, 1.0), abs=1e-9)
    assert all(h["delta"] < 0 for h in res.history)
    assert merge_by_mdl(active, alpha=1.0).groups == res.groups  # deterministic


def test_stratified_random_groups_match_composition():
    strata = [0] * 5 + [1] * 4 + [2] * 3
    members = [0, 1, 6, 11]
    groups = stratified_random_like(members, strata, 20, torch.Generator().manual_seed(0))
    assert len(groups) == 20
    for g in groups:
        assert sorted(strata[m] for m in g) == [0, 0, 1, 2] and len(set(g)) == 4
    assert len({tuple(g) for g in groups}) > 1
    with pytest.raises(ValueError, match="tokens, subcomponents"):
        merge_by_mdl(torch.zeros(3, dtype=torch.bool))
