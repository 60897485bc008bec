"""Lookup measures on the trained default zoo model (a known induction mechanism), and the ground-truth lookup of
every task that has one."""

from __future__ import annotations

import pytest
import torch

from mamba_interp import zoo
from mamba_interp.pipeline.datasets import repeated_tokens
from mamba_interp.tasks import get_task
from mamba_interp.temporal_causality import (
    Lookup,
    class_shares,
    induction_score,
    influence_on_answer,
    knockout_accuracy_drop,
    lookup_attention,
    lookup_positions,
    mcnemar_greater,
    position_classes,
    proportion_ci,
    random_sources,
    top_source_hit,
    top_units,
)


@pytest.fixture(scope="module")
def default():
    if zoo.DEFAULT not in zoo.names():
        pytest.skip("the default zoo model is not built")
    model, task = zoo.load(), zoo.load_task()
    return model, task.sample(32, seed=11, split="test")


def test_lookup_positions_follow_each_task():
    ind = get_task("induction", vocab_size=16, seq_len=20).sample(5, seed=0)
    lk = lookup_positions(ind)
    assert torch.equal(lk.source[:, 0], ind.metadata["value_pos"]) and torch.equal(lk.trigger[:, 0] + 1,
                                                                                     lk.source[:, 0])
    assert bool((lk.query == 19).all()) and torch.equal(ind.tokens[torch.arange(5), lk.source[:, 0]], lk.answer[:, 0])
    mq = get_task("mqar", vocab_size=16, seq_len=16, num_kv_pairs=2).sample(4, seed=0)
    lk = lookup_positions(mq)
    rows = torch.arange(4)[:, None]
    assert torch.equal(mq.tokens[rows, lk.query], mq.tokens[rows, lk.trigger])  # the queried key = the stored key
    assert torch.equal(mq.tokens[rows, lk.source], lk.answer)
    rep = repeated_tokens(20, 3, 12, seed=0)
    lk = lookup_positions(rep)
    assert torch.equal(rep.tokens[rows[:3], lk.source], lk.answer)  # the token after the earlier occurrence
    assert torch.equal(rep.tokens[rows[:3], lk.trigger], rep.tokens[rows[:3], lk.query])
    par = lookup_positions(get_task("parity", seq_len=10).sample(3, seed=0))
    assert par.source is None and par.query.shape == (3, 1) and bool((par.query == 9).all())


def test_default_model_looks_up_in_layer_0(default):
    """The default model's layer-0 hidden attention at the final trigger peaks at p+1 on every sequence, its
    strongest channels write there, and knocking out that entry breaks the answer (a random entry does not)."""
    model, batch = default
    att = lookup_attention(model, batch, 0)
    score, per = induction_score(model, batch, 0, attention=att)
    assert score == 1.0 and per.shape == (32,)
    assert induction_score(model, batch, 1)[0] < 0.2
    ranked = top_units(att)
    assert sorted(ranked) == list(range(model.cfg.d_inner)) and att.at_source.shape == (32, model.cfg.d_inner, 1)
    ko = knockout_accuracy_drop(model, batch, 0, seed=0)
    assert ko["clean"]["value"] == 1.0 and ko["drop"]["value"] > 0.5 and ko["control_drop"]["value"] < 0.1
    assert ko["p_vs_control"] < 1e-3
    hit, per_hit = top_source_hit(model, batch)
    assert hit == 1.0 and per_hit.dtype == torch.bool


def test_influence_classes_partition_the_past(default):
    model, batch = default
    lk = lookup_positions(batch)
    infl = influence_on_answer(model, batch, ["hook_embed", "blocks.1.hook_resid_pre"], lk, batch_size=16)
    assert infl["hook_embed"].shape == (32, 64) and float(infl["hook_embed"].min()) >= 0
    classes = position_classes(lk, 64)
    total = sum(m.long() for m in classes.values())
    assert bool((total <= 1).all()) and torch.equal(total.bool(), torch.arange(64)[None] <= lk.query)
    shares = class_shares(infl["hook_embed"], classes)
    assert abs(sum(v.mean() for v in shares.values()) - 1) < 1e-9
    assert shares["source"].mean() + shares["trigger"].mean() > 0.3  # the lookup's two positions dominate


def test_random_sources_avoid_the_planted_positions():
    lk = Lookup(torch.tensor([[9], [9], [3]]), torch.zeros(3, 1, dtype=torch.long), torch.tensor([[4], [1], [1]]),
                torch.tensor([[3], [0], [0]]))
    for seed in range(5):
        r = random_sources(lk, seed)[:, 0]
        assert bool((r < lk.query[:, 0]).all()) and bool((r != lk.source[:, 0]).all())
        assert bool((r != lk.trigger[:, 0]).all())


def test_exact_tests_and_intervals():
    assert proportion_ci([True] * 64) == pytest.approx([0.9439, 1.0], abs=1e-4)  # never collapses to a point
    assert mcnemar_greater([1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]) == pytest.approx(1 / 64)
    assert mcnemar_greater([1, 0], [1, 0]) == 1.0
