"""Companion models: the zoo family and transformer baseline from the cards, --compare, roles, bad names."""

from __future__ import annotations

import json

import pytest
import torch

from mamba_interp import zoo
from mamba_interp.cli import main
from mamba_interp.pipeline import RunConfig, UsageError
from mamba_interp.pipeline.companions import no_companions_reason, resolve_companions
from mamba_interp.pipeline.model_source import load_model_source
from mamba_interp.tasks import TransformerBaseline


@pytest.fixture(scope="module")
def default_source():
    return load_model_source("induction-mamba1")


def test_zoo_family_and_baseline(default_source):
    comps = resolve_companions(default_source)
    names = {c.name: c for c in comps}
    assert "induction-mamba1" not in names
    assert set(zoo.family("induction-mamba1")) - {"induction-mamba1"} <= set(names)
    assert names["induction-transformer"].role == "transformer" and names["induction-transformer"].is_transformer
    assert names["induction-mamba1-d16"].role == "size" and names["induction-mamba1-d32"].role == "size"
    for n in ("induction-mamba1-s1", "induction-mamba1-s2"):
        if n in names:
            assert names[n].role == "seed" and names[n].seed != default_source.card["seed"]
    assert "induction-mamba2" not in names and "mqar-mamba1" not in names  # other architectures / tasks
    d = names["induction-mamba1-d16"].describe()
    assert d["d_model"] == 16 and d["n_params"] == zoo.info("induction-mamba1-d16")["n_params"]


def test_compare_replaces_the_family(default_source, tmp_path):
    comps = resolve_companions(default_source, ("induction-mamba2", "induction-mamba1"))
    assert [c.name for c in comps] == ["induction-mamba2"] and comps[0].role == "other"
    torch.manual_seed(0)
    folder = tmp_path / "gpt"
    TransformerBaseline.build(16, 16, 1, 2, 128).save_pretrained(folder)
    (folder / "card.json").write_text(json.dumps({"task": "induction",
                                                  "task_params": {"vocab_size": 16, "seq_len": 64}}))
    (c,) = resolve_companions(default_source, (str(folder),))
    assert c.kind == "folder" and c.role == "transformer" and c.task == "induction"
    assert isinstance(c.load(), TransformerBaseline)


def test_folder_model_has_companions_only_through_compare(task_model_dir):
    src = load_model_source(str(task_model_dir))
    assert resolve_companions(src) == []
    assert "--compare" in no_companions_reason(src, "transformer")
    (c,) = resolve_companions(src, ("induction-mamba1",))
    assert c.role == "other"  # same architecture, but trained at another sequence length (24 vs 64)


def test_bad_compare_names(default_source, tmp_path, capsys):
    with pytest.raises(UsageError, match="neither a zoo model"):
        resolve_companions(default_source, ("no-such-model",))
    assert RunConfig(compare="a, b,a").compare == ("a", "b")
    with pytest.raises(UsageError, match="compare"):
        RunConfig(compare=[1, 2])
    out = tmp_path / "run"
    assert main(["run", "--steps", "0", "--compare", "no-such-model", "-o", str(out), "-q"]) == 2
    assert "no-such-model" in capsys.readouterr().err and not out.exists()
