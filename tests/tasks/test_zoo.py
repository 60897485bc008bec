"""Every shipped zoo model loads, matches its card, and reaches the card's accuracy on fresh data.

Tolerance for sampling noise: the card's accuracy was measured on ``EVAL_N`` = 2000 held-out sequences (1000
at 16x length); here a different fresh sample of 1000 (500 at 16x) is drawn, so the two estimates differ by
a binomial noise of sd = sqrt(a(1-a)(1/n_card + 1/n_here)); we allow max(0.01, 4 sd). Finite tasks (modular
addition) are scored on their whole test split, which is deterministic: the card's number must match exactly.
"""

import json
import math

import pytest
import torch

from mamba_interp import zoo
from mamba_interp.models import HookedMamba
from mamba_interp.tasks import TrainConfig, TransformerBaseline, get_task
from mamba_interp.tasks.build_zoo import EVAL_SEED, RECIPES, command
from mamba_interp.tasks.training import build_parser, config_from_args, evaluate

REQUIRED = ["induction-mamba1", "induction-mamba2", "induction-transformer", "mqar-mamba1", "modadd-mamba2"]
BAR_MODELS = ("induction-mamba1", "induction-mamba2")  # the bars: >= 0.98 at L, >= 0.95 at 16 L
FRESH_SEED = 4242  # differs from the card's EVAL_SEED and from every training / eval seed
N_FRESH, N_FRESH_LONG = 1000, 500


def _tolerance(acc: float, n_card: int, n_here: int) -> float:
    return max(0.01, 4 * math.sqrt(max(acc * (1 - acc), 0.0) * (1 / n_card + 1 / n_here)))


def test_required_models_and_default():
    names = zoo.names()
    assert set(REQUIRED) <= set(names)
    assert zoo.DEFAULT == "induction-mamba1" and zoo.DEFAULT in names
    assert set(names) == set(RECIPES), "every recipe is built and every shipped model has a recipe"
    assert FRESH_SEED != EVAL_SEED


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="induction-mamba1"):
        zoo.load("induction-mamba3")
    with pytest.raises(ValueError, match="known models"):
        zoo.info("nope")


@pytest.mark.parametrize("name", zoo.names())
def test_card_is_complete_and_consistent(name):
    card = zoo.info(name)
    for key in ("task", "task_params", "arch", "accuracy", "command", "n_params", "seed", "train_time_s",
                "train_config", "model_config", "fingerprint", "accuracy_by_seq_len", "eval"):
        assert key in card, key
    assert {"vocab_size", "seq_len"} <= set(card["task_params"])
    # each model regenerates in <= 20 minutes: CPU time where recorded (wall time on a busy machine is inflated)
    assert card.get("train_cpu_s", card["train_time_s"]) <= 1200, "each model regenerates in <= 20 minutes"
    folder = zoo.path(name)
    for f in ("config.json", "model.safetensors", "card.json"):
        assert (folder / f).is_file()
    assert sum(p.stat().st_size for p in folder.glob("*.safetensors")) <= 1_000_000
    model = zoo.load(name)
    assert isinstance(model, TransformerBaseline if card["arch"] == "transformer" else HookedMamba)
    assert model.n_params() == card["n_params"]
    assert model.fingerprint() == card["fingerprint"]
    # the documented command rebuilds exactly the recorded training configuration
    argv = card["command"].split()
    assert argv[:2] == ["mamba-interp", "train"] and card["command"] == command(name)
    cfg = config_from_args(build_parser().parse_args(argv[2:]))
    recorded = TrainConfig.from_dict(card["train_config"])
    ignore = {"out_dir": None, "progress": None}
    assert cfg.to_dict() | ignore == recorded.to_dict() | ignore
    task = zoo.load_task(name)
    assert task.spec() == card["task_params"] and task.name == card["task"]


@pytest.mark.parametrize("name", zoo.names())
def test_reaches_card_accuracy_on_fresh_data(name):
    card, task, model = zoo.info(name), zoo.load_task(name), zoo.load(name)
    batch = task.sample(None if task.finite else N_FRESH, FRESH_SEED, split="test")
    with torch.no_grad():
        logits = model(batch.tokens[:4])
    assert logits.shape == (4, task.seq_len, task.vocab_size) and logits.dtype == torch.float32
    acc = evaluate(model, task, batch)["acc"]
    if task.finite:
        assert acc == card["accuracy"]
    else:
        tol = _tolerance(card["accuracy"], card["eval"]["n"], N_FRESH)
        assert acc >= card["accuracy"] - tol, f"{name}: {acc:.4f} vs card {card['accuracy']:.4f} (tol {tol:.4f})"


@pytest.mark.parametrize("name", [n for n in zoo.names() if zoo.info(n)["task"] == "induction"])
def test_induction_bars_and_extrapolation(name):
    card, task, model = zoo.info(name), zoo.load_task(name), zoo.load(name)
    long = str(16 * task.seq_len)
    assert long in card["accuracy_by_seq_len"]
    if card["arch"] == "transformer":
        # learned absolute positions: the baseline solves the task at its length and fails to extrapolate
        assert card["accuracy"] >= 0.98 and card["accuracy_by_seq_len"][long] < 0.5
        return
    if name not in BAR_MODELS:
        return  # smaller members of the scaling family: their card accuracy is checked above
    assert card["accuracy"] >= 0.98 and card["accuracy_by_seq_len"][long] >= 0.95
    batch = task.sample(N_FRESH_LONG, FRESH_SEED, seq_len=int(long), split="test")
    acc = evaluate(model, task, batch)["acc"]
    tol = _tolerance(card["accuracy_by_seq_len"][long], card["eval"]["n_long"], N_FRESH_LONG)
    assert acc >= card["accuracy_by_seq_len"][long] - tol


def test_mqar_bar():
    assert zoo.info("mqar-mamba1")["accuracy"] >= 0.95


def test_modadd_grokked_with_log_and_snapshots():
    card = zoo.info("modadd-mamba2")
    assert card["task_params"]["frac_train"] <= 0.5
    assert card["accuracy"] >= 0.99 and card["train_accuracy"] >= 0.99
    log = zoo.training_log("modadd-mamba2")
    evals = log["evals"]
    assert {"step", "train_loss", "train_acc", "test_loss", "test_acc", "weight_norm_sq"} <= set(evals[0])
    assert len(log["loss"]) == card["steps_run"]
    # grokking: the train split is fit long before the test split generalises
    fit = next(e["step"] for e in evals if e["train_acc"] >= 0.99)
    general = next(e["step"] for e in evals if e["test_acc"] >= 0.99)
    assert general >= 2 * fit
    assert next(e for e in evals if e["step"] == fit)["test_acc"] < 0.5
    steps = zoo.snapshot_steps("modadd-mamba2")
    assert steps == card["snapshots"] and len(steps) >= 3
    task = zoo.load_task("modadd-mamba2")
    grid = task.sample(None, 0, split="all")
    with torch.no_grad():
        first = zoo.load_snapshot("modadd-mamba2", steps[0])
        assert evaluate(first, task, task.sample(None, 0, split="test"))["acc"] < 0.5
        final = zoo.load("modadd-mamba2")
        if card["steps_run"] in steps:
            assert torch.equal(zoo.load_snapshot("modadd-mamba2", card["steps_run"])(grid.tokens), final(grid.tokens))
    with pytest.raises(ValueError, match="available"):
        zoo.load_snapshot("modadd-mamba2", 10**6)


def test_scaling_family():
    fams = {zoo.info(n).get("family") for n in zoo.names()} - {None}
    sized = [f for f in fams if len(zoo.family(f)) >= 2]
    assert sized, "at least one family with two or more sizes for the scaling step"
    for fam in sized:
        members = zoo.family(fam)
        cards = [zoo.info(n) for n in members]
        assert [c["n_params"] for c in cards] == sorted(c["n_params"] for c in cards)
        assert len({(c["task"], tuple(sorted(c["task_params"].items())), c["arch"]) for c in cards}) == 1
    with pytest.raises(ValueError, match="known families"):
        zoo.family("nope")


def test_alias_module_and_task_roundtrip():
    import mamba_interp.tasks.zoo as tz

    assert zoo.load is tz.load and zoo.DEFAULT == tz.DEFAULT
    card = zoo.info(zoo.DEFAULT)
    task = get_task(card["task"], **card["task_params"])
    assert task.params == zoo.load_task(zoo.DEFAULT).params


def test_cards_record_family_and_seed_as_the_recipes_do():
    for name in zoo.names():
        card = zoo.info(name)
        assert card["family"] == RECIPES[name][1], name
        assert card["seed"] == card["train_config"]["seed"], name


@pytest.mark.parametrize("fam", ["induction-mamba1", "induction-mamba2"])
def test_three_seeds_of_the_default_size(fam):
    """The universality step compares seeds: each induction family ships >= 3 seeds of its largest size, which
    differ only in the seed (and, for the Mamba-1 seeds 1 and 2, the number of steps: see their cards)."""
    cards = [zoo.info(n) for n in zoo.family(fam)]
    top = max(c["model_config"]["d_model"] for c in cards)
    same = [c for c in cards if c["model_config"]["d_model"] == top]
    assert len({c["seed"] for c in same}) >= 3
    assert len({json.dumps(c["model_config"], sort_keys=True) for c in same}) == 1
    ignore = {"seed", "steps", "out_dir"}
    configs = [{k: v for k, v in c["train_config"].items() if k not in ignore} for c in same]
    assert all(cfg == configs[0] for cfg in configs)
    assert len({c["fingerprint"] for c in same}) == len(same)
