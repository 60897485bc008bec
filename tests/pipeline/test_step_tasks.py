"""Step 1 (tasks): scores against chance with CIs, the chance warning, tokens shown as text."""

import json
import math

import pytest
import torch
from pipeline_helpers import read_result, run_pipeline

from mamba_interp.pipeline.datasets import MIN_BUDGET_SEQUENCES, budget_sequences, chance_warning, score_set


def _ev(**per_example):
    """An ``evaluate`` result with the given per-example tensors."""
    return {"scores": {k: v for k, v in per_example.items() if k == "logit_diff"},
            **{k: v for k, v in per_example.items() if k != "logit_diff"}}


def test_a_sequence_budget_caps_short_sequences_by_count_and_long_ones_by_tokens():
    assert budget_sequences(64, 4096, 64, 256) == 64  # the default model's 64-token sequences: the count binds
    assert budget_sequences(64, 4096, 256, 64) == 16  # 256-token corpus windows: 4096 tokens
    assert budget_sequences(128, 8192, 256, 64) == 32
    assert budget_sequences(64, 4096, 1024, 100) == MIN_BUDGET_SEQUENCES == 16  # never below the floor
    assert budget_sequences(8, 4096, 1024, 100) == 8  # ...unless the count asks for fewer
    assert budget_sequences(64, None, 256, 64) == 64 and budget_sequences(64, 4096, 16, 10) == 10


def test_score_set_against_chance_on_planted_scores():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(200, generator=g, dtype=torch.float64)
    ioi_good = score_set("ioi", None, _ev(logit_diff=2.0 + 0.5 * noise), vocab_size=1000)
    ioi_none = score_set("ioi", None, _ev(logit_diff=0.02 + noise), vocab_size=1000)
    ioi_small = score_set("ioi", None, _ev(logit_diff=0.3 + 0.1 * noise), vocab_size=1000)  # significant, < log 2
    assert ioi_good.above_chance and ioi_good.estimate.ci_low > 1.8 and ioi_good.chance == 0.0
    assert not ioi_none.above_chance and not ioi_small.above_chance
    uniform = -math.log(1000)
    fact_good = score_set("factual_recall", None, _ev(logprob=uniform + 3 + 0.1 * noise), vocab_size=1000)
    fact_none = score_set("factual_recall", None, _ev(logprob=uniform + 0.01 * noise), vocab_size=1000)
    assert fact_good.above_chance and not fact_none.above_chance
    assert fact_none.chance == pytest.approx(uniform) and fact_none.name == "answer_logprob"

    class Parity:
        chance = 0.5

    acc = lambda p: (torch.rand(400, generator=g) < p).double()  # noqa: E731
    assert score_set("parity", Parity(), _ev(example_accuracy=acc(0.9)), 2).above_chance
    assert not score_set("parity", Parity(), _ev(example_accuracy=acc(0.55)), 2).above_chance  # < 2x in odds
    assert not score_set("repeated_tokens", None, _ev(example_accuracy=torch.zeros(50)), 50).above_chance
    scores = {"ioi": ioi_none, "factual_recall": fact_none}
    warning = chance_warning(scores)
    assert warning.startswith("The model is at chance on every one of its 2 datasets")
    assert "ioi: logit difference IO − S" in warning and "factual_recall: log p(answer)" in warning
    assert chance_warning({**scores, "ioi_good": ioi_good}) is None


def test_random_language_model_with_tokenizer(tokenizer_model_dir, tmp_path):
    _, summary = run_pipeline(tokenizer_model_dir, tmp_path / "tok", steps="0-1", seq_len=12)
    assert summary.exit_code == 0
    res = read_result(tmp_path / "tok", "step_01_tasks")
    m = res["metrics"]
    ioi, fact = m["datasets"]["ioi"], m["datasets"]["factual_recall"]
    assert ioi["score"]["score"] == "logit_diff" and ioi["score"]["chance"] == 0.0
    lo, hi = ioi["logit_diff"]["ci"]
    assert lo <= ioi["logit_diff"]["value"] <= hi and ioi["logit_diff"]["n"] == 12
    assert 0 <= ioi["io_over_s"]["value"] <= 1
    assert fact["score"]["score"] == "answer_logprob" and fact["answer_logprob"]["n"] == 12
    ex = ioi["examples"][0]
    assert ex["prompt"].endswith("to") and ex["answer"].startswith('"') and ex["wrong"].startswith('"')
    assert not any(s["above_chance"] for s in (d["score"] for d in m["datasets"].values()))
    assert m["chance_warning"].startswith("The model is at chance on every one of its 3 datasets")
    assert res["reading"].startswith("Warning: no dataset is above chance")
    assert "logit difference IO − S" in res["reading"]
    labels = json.loads((tmp_path / "tok" / "step_01_tasks" / "dataset_ioi_metadata.json").read_text())["answer_label"]
    assert len(labels) == 12 and all(lab.startswith('"') for lab in labels)


def test_random_language_model_without_tokenizer(lm_model_dir, tmp_path):
    _, summary = run_pipeline(lm_model_dir, tmp_path / "lm", steps="0-1", seq_len=16)
    assert summary.exit_code == 0
    m = read_result(tmp_path / "lm", "step_01_tasks")["metrics"]
    score = m["datasets"]["repeated_tokens"]["score"]
    assert score["score"] == "accuracy" and score["chance"] == pytest.approx(1 / 50) and not score["above_chance"]
    assert m["chance_warning"].startswith("The model is at chance on its dataset")


def test_trained_zoo_model_has_no_chance_warning(tmp_path):
    _, summary = run_pipeline("induction-mamba1", tmp_path / "zoo", steps="0-1")
    assert summary.exit_code == 0
    m = read_result(tmp_path / "zoo", "step_01_tasks")["metrics"]
    score = m["datasets"]["induction"]["score"]
    assert score["above_chance"] and score["ci"][0] > 0.9
    assert m["chance_warning"] is None
