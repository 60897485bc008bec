"""Steps 4 (probes) and 16 (probe_report): end to end on the quickly trained induction model, resume, Mamba-2,
language-model folders, options; and (slow) the issue's checks on the default zoo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_helpers import load_step_data, read_result, run_pipeline
from test_step_sae import trained_model  # noqa: F401  (the fixture: the session's tiny trained induction model)

from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import get_step

# small and fast: 48 sequences of 16 tokens, three hooks, few tokens per variable, short bootstraps
FAST_PROBES = {"hooks": ["resid_post", "x", "y"], "max_tokens": 300, "state_max_tokens": 400, "n_resamples": 200,
               "state_random": 3, "amnesic_sequences": 32, "ks": [1, 2, 4, 8]}
REPORT_FIGURES = ("score_heatmap", "selectivity_heatmap", "sparsity_curves", "support_overlap", "state_map",
                  "amnesic")


def probe_run(model: Path | str, out: Path, **kw):
    kw.setdefault("step_options", {"probes": FAST_PROBES})
    kw.setdefault("samples", 48)
    return run_pipeline(model, out, steps=kw.pop("steps", "4,16"), **kw)


@pytest.fixture(scope="module")
def probes_out(trained_model, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("probes") / "run"
    _, summary = probe_run(trained_model, out, hooks=["resid_post", "x", "y"])
    assert summary.exit_code == 0
    return out


def test_step4_probes_every_variable_at_every_site(probes_out):
    res = read_result(probes_out, "step_04_probes")
    assert res["status"] == "completed", res.get("error")
    m = res["metrics"]
    assert set(m["best"]) == {"token", "prev_token", "position", "answer", "after_trigger", "stored_value"}
    width = {"resid_post": 32, "x": 64, "y": 64}
    for v, b in m["best"].items():
        assert b["hook"] in width and all(0 <= i < width[b["hook"]] for i in b["support"])
        assert b["k"] == len(b["support"])
        assert b["score_ci"][0] <= b["score"] <= b["score_ci"][1]
        assert set(m["probes"][v]) == {f"L{i}.{h}" for i in (0, 1) for h in width}
    # the trained model reads token identity and "right after the trigger" off layer 0, the answer off layer 1
    for v in ("token", "after_trigger", "answer"):
        assert m["best"][v]["score"] >= 0.9, (v, m["best"][v])
    assert m["best"]["answer"]["selectivity"] >= 0.3  # at the query the current token is always the trigger
    saved = json.loads((probes_out / "step_04_probes" / "probes.json").read_text())
    assert len(saved["report"]["records"]) == 6 * 2 * 3 * 2
    assert "coefficients.safetensors" in res["artifacts"] and "answer: best probe" in res["reading"]


def test_step4_amnesic_test_hurts_more_than_its_control(probes_out):
    """Erasing the answer (or the stored value) where the best probe reads it costs the tiny model >= 0.3 of its
    accuracy on 32 held-out sequences (measured: 0.41 and 0.81), more than erasing permuted labels of the same
    rank (0.19 and 0.25)."""
    am = read_result(probes_out, "step_04_probes")["metrics"]["amnesic"]
    for v in ("answer", "stored_value"):
        a = am[v]
        assert a["eval"] == "heldout" and a["clean_accuracy"] > 0.9 and a["rank"] >= 1
        assert a["erased_accuracy"] <= a["clean_accuracy"] - 0.3, (v, a)
        assert a["erased_accuracy"] < a["control_accuracy"], (v, a)


def test_step4_state_probe_finds_the_stored_value(probes_out):
    sp = read_result(probes_out, "step_04_probes")["metrics"]["state_probes"]["stored_value"]
    layer = max(sp, key=lambda i: sp[i]["top_score"])
    best = sp[layer]
    assert best["unit"] == "channel" and len(best["top"]) == 8 and all(0 <= c < 64 for c in best["top"])
    assert best["top_score"] > best["random_mean"]


def test_step16_reads_the_strongest_and_weakest_findings(probes_out):
    res = read_result(probes_out, "step_16_probe_report")
    assert res["status"] == "completed", res.get("error")
    assert "Strongest finding" in res["reading"] and "Weakest" in res["reading"]
    m = res["metrics"]
    assert m["strongest"] in m["finding_strength"] and m["weakest"] in m["finding_strength"]
    html = (probes_out / "report.html").read_text()
    assert "probes" in html and "probe_report" in html


def test_step4_loader_rebuilds_the_data(trained_model, probes_out):
    data = load_step_data(trained_model, probes_out, 4)
    m = read_result(probes_out, "step_04_probes")["metrics"]
    assert {v: (b["layer"], b["hook"], b["support"]) for v, b in data["best"].items()} == \
        {v: (b["layer"], b["hook"], b["support"]) for v, b in m["best"].items()}
    assert set(data["state_probes"]["stored_value"]) == {0, 1}
    assert all(r.coef is not None for r in data["report"].records)
    assert data["amnesic"]["answer"]["rank"] == m["amnesic"]["answer"]["rank"]


def test_steps_4_and_16_run_on_mamba2_and_draw_every_figure(m2_model_dir, tmp_path, monkeypatch):
    from mamba_interp.pipeline import datasets

    # the amnesic tests' token budget binds: 1 token leaves the floor of sequences (lowered to 4 here)
    monkeypatch.setattr(datasets, "MIN_BUDGET_SEQUENCES", 4)
    opts = {**FAST_PROBES, "hooks": ["x"], "variables": ["token", "stored_value"], "amnesic_sequences": 8,
            "amnesic_tokens": 1}
    out = tmp_path / "m2"
    _, summary = probe_run(m2_model_dir, out, samples=16, step_options={"probes": opts}, figures=True, hooks=["x"])
    assert summary.exit_code == 0
    res = read_result(out, "step_04_probes")
    assert res["status"] == "completed", res.get("error")
    assert {a["eval_sequences"] for a in res["metrics"]["amnesic"].values()} == {4}
    report = read_result(out, "step_16_probe_report")
    for fig in (*REPORT_FIGURES, "head_scores"):
        assert f"{fig}.png" in report["artifacts"] and (out / "step_16_probe_report" / f"{fig}.png").is_file(), fig
    sp = res["metrics"]["state_probes"]["stored_value"]["0"]
    assert sp["unit"] == "head" and all(0 <= h < 4 for h in sp["top"])  # 4 heads: the top set is every head
    saved = json.loads((tmp_path / "m2" / "step_04_probes" / "probes.json").read_text())
    assert {k.split("|")[2] for k in saved["report"]["head_scores"]} == {"x"}
    assert all(len(v) == 4 for v in saved["report"]["head_scores"].values())


def test_step4_on_language_model_folders(lm_model_dir, tokenizer_model_dir, tmp_path):
    opts = {**FAST_PROBES, "hooks": ["resid_post"], "max_tokens": 150, "amnesic_sequences": 8}
    _, summary = probe_run(lm_model_dir, tmp_path / "lm", samples=12, step_options={"probes": opts},
                           steps="4", layers=[0], hooks=["resid_post"])
    m = read_result(tmp_path / "lm", "step_04_probes")["metrics"]
    assert summary.exit_code == 0 and {"token", "prev_token", "position", "second_copy"} <= set(m["best"])
    assert set(m["state_probes"]) == {"prev_token"}  # no stored task variable: the previous token
    _, summary = probe_run(tokenizer_model_dir, tmp_path / "tok", samples=12, step_options={"probes": opts},
                           steps="4", layers=[0], hooks=["resid_post"])
    m = read_result(tmp_path / "tok", "step_04_probes")["metrics"]
    assert summary.exit_code == 0
    assert {"ioi:is_io", "ioi:is_s", "factual_recall:is_subject"} <= set(m["best"]), sorted(m["best"])
    assert m["amnesic"]["ioi:is_io"]["eval"] == "ioi"


@pytest.mark.parametrize("bad, message", [
    ({"hooks": ["state_norm"]}, "activation hooks"),
    ({"methods": ["svm"]}, "must be some of"),
    ({"k": 0}, "positive integer"),
    ({"cv": 1}, ">= 2"),
    ({"curves": "some"}, "'best' or 'all'"),
    ({"ridge_cv": 1}, "leave-one-out"),
    ({"amnesic_tokens": True}, "positive integer or null"),
])
def test_probe_options_are_validated(bad, message):
    with pytest.raises(UsageError, match=message):
        get_step(4).make_options(bad)
    assert get_step(4).make_options({"methods": "ksparse,logistic"}).methods == ("ksparse", "logistic")


def test_unknown_variable_fails_with_its_name(trained_model, tmp_path):
    _, summary = probe_run(trained_model, tmp_path / "bad", samples=4, steps="4", hooks=["resid_post"],
                           step_options={"probes": {**FAST_PROBES, "variables": ["nope"]}})
    res = read_result(tmp_path / "bad", "step_04_probes")
    assert res["status"] == "failed" and "'nope' is not defined" in res["error"]["message"]


@pytest.mark.slow
def test_default_zoo_model_probes(tmp_path):
    """The issue's checks on the default zoo model with default options (see the README for the numbers)."""
    from mamba_interp import zoo

    if zoo.DEFAULT not in zoo.names():
        pytest.skip("the default zoo model is not built")
    _, summary = run_pipeline("default", tmp_path / "zoo", steps="4,16", samples=256, batch_size=64, figures=True)
    assert summary.exit_code == 0
    m = read_result(tmp_path / "zoo", "step_04_probes")["metrics"]
    best = m["best"]
    for v in ("token", "prev_token", "after_trigger", "answer"):
        assert best[v]["score"] >= 0.9, (v, best[v])
    for v in ("after_trigger", "answer"):
        assert best[v]["selectivity"] >= 0.3, (v, best[v])
    # prev_token's best probe is dense and as selective as 0; its k-sparse probe on layer 0's x is the selective one
    ks = m["probes"]["prev_token"]["L0.x"]
    assert ks["scores"]["ksparse"] >= 0.9
    am = m["amnesic"]
    assert am["answer"]["example_accuracy_change"]["ci"][1] < -0.5  # erasing the answer hurts
    assert abs(am["position"]["example_accuracy_change"]["value"]) < 0.05  # erasing position does not
    sp = m["state_probes"]["stored_value"]
    layer = max(sp, key=lambda i: sp[i]["top_score"])
    assert sp[layer]["top_score_ci"][0] > sp[layer]["random_max"]
    assert read_result(tmp_path / "zoo", "step_16_probe_report")["status"] == "completed"


def test_task_variables_of_the_text_prompt_sets(tokenizer_model_dir):
    import torch

    from mamba_interp.pipeline.task_variables import task_variables, variable_labels
    from mamba_interp.tasks import get_task

    ioi = get_task("ioi", tokenizer=str(tokenizer_model_dir)).sample(6, seed=0)
    tv = task_variables(ioi)
    rows = torch.arange(6)
    assert bool((tv.numeric["is_io"][rows, ioi.metadata["io_pos"]] == 1).all())
    assert bool((tv.numeric["is_io"].nansum(1) == 1).all()) and bool((tv.numeric["is_s"].nansum(1) == 2).all())
    abba = tv.numeric["abba"][:, -1]
    assert abba.tolist() == [float(o == "ABBA") for o in ioi.metadata["order"]]
    fr = get_task("factual_recall", tokenizer=str(tokenizer_model_dir)).sample(6, seed=0)
    tv = task_variables(fr)
    last = fr.metadata["subject_last_pos"]
    assert bool((tv.numeric["subject_last"][rows, last] == 1).all())
    assert bool((tv.numeric["is_subject"].nansum(1) >= 1).all())
    mask = fr.attention_mask.bool()
    labels, task = variable_labels(tv, "relation", mask, min_count=1)
    assert task == "classification" and int(torch.isfinite(labels).sum()) == 6
    assert variable_labels(tv, "is_subject", mask)[1] == "classification"
    assert variable_labels(tv, "position", mask)[1] == "regression"
