"""--corpus: documents streamed from text or jsonl into context windows, which drive steps 2-3 of a language model."""

from __future__ import annotations

import json
import random

import pytest

from pipeline_helpers import read_result, run_pipeline

from mamba_interp import cli
from mamba_interp.pipeline.corpus import corpus_windows, iter_documents


class CharTokenizer:
    """One id per character (a = 1 ...); end-of-text 0."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - 96 if c.isalpha() else 27 for c in text.lower()]}


def test_documents_from_text_and_jsonl(tmp_path):
    txt, jl = tmp_path / "c.txt", tmp_path / "c.jsonl"
    txt.write_text("ab\n\ncd e\n")
    jl.write_text(json.dumps({"text": "ab", "id": 1}) + "\n" + json.dumps({"text": "cd e"}) + "\n")
    assert list(iter_documents(txt)) == list(iter_documents(jl)) == ["ab", "cd e"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 has no 'text'"):
        list(iter_documents(tmp_path / "bad.jsonl"))


def test_windows_pack_documents_and_stop_at_the_budget(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("abc\n" * 100000)  # far more than the budget: reading stops early
    w = corpus_windows(path, CharTokenizer(), seq_len=5, windows=3)
    assert w.tokens.tolist() == [[1, 2, 3, 0, 1], [2, 3, 0, 1, 2], [3, 0, 1, 2, 3]]
    assert w.document[0].tolist() == [0, 0, 0, 0, 1] and w.documents_read == 4
    with pytest.raises(ValueError, match="fewer than one window"):
        corpus_windows(tmp_path / "c.txt", CharTokenizer(), seq_len=10**6, windows=1)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    from mamba_interp.tasks.text import builtin_words

    words = sorted(builtin_words())
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)))
    return path


def test_a_corpus_drives_steps_2_and_3(tokenizer_model_dir, corpus_file, tmp_path):
    out = tmp_path / "run"
    sae = {"hooks": ["resid_post"], "epochs": 2.0, "batch_size": 64, "k": 4}
    _, summary = run_pipeline(tokenizer_model_dir, out, steps="0-3", corpus=str(corpus_file), tokens=960,
                              seq_len=16, step_options={"sae": sae})
    assert summary.exit_code == 0
    s1 = read_result(out, "step_01_tasks")
    assert s1["metrics"]["primary"] == "corpus" and s1["metrics"]["data"].startswith("corpus ")
    assert s1["metrics"]["datasets"]["corpus"]["sequences"] == 60 and "natural text" in s1["reading"]
    assert any(n.startswith("corpus corpus.txt: 60 windows of 16 tokens") for n in s1["metrics"]["notes"])
    s2 = read_result(out, "step_02_activations")["metrics"]
    assert s2["dataset"] == "corpus" and s2["tokens"] == 960
    s3 = read_result(out, "step_03_sae")
    assert s3["status"] == "completed", s3.get("error")
    assert s3["metrics"]["split"] == "sequences" and s3["metrics"]["train_tokens"] == 45 * 16


def test_corpus_needs_a_language_model_with_a_tokenizer(task_model_dir, lm_model_dir, corpus_file, tmp_path, capsys):
    for model, why in ((task_model_dir, "task model"), (lm_model_dir, "has no tokenizer")):
        code = cli.main(["run", "--model", str(model), "--corpus", str(corpus_file), "-o", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "--corpus needs a language model" in err[0] and why in err[0], err
    code = cli.main(["run", "--model", str(lm_model_dir), "--corpus", str(tmp_path / "missing.txt")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert cli.main(["run", "--model", str(lm_model_dir), "--tokens", "100"]) == 2
    assert "pass --corpus FILE as well" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

