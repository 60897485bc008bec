"""The trainer: it learns, it is deterministic, it writes loadable outputs; TrainConfig and CLI validation."""

import json
import math

import pytest
import torch

from mamba_interp.tasks import TrainConfig, get_task, train
from mamba_interp.tasks.training import config_from_args, build_parser, lr_factor, main
from mamba_interp.tasks.zoo import load_checkpoint

# 2-layer Mamba-2 (d_model 32, 8 heads) on induction with V=8, L=16: chance is 1/6; the held-out accuracy went
# from chance to 1.0 between steps 50 and 150 (~3 s on one thread).
LEARN = dict(task="induction", task_params=dict(vocab_size=8, seq_len=16), arch="mamba2", d_model=32, headdim=8,
             steps=200, warmup_steps=10, eval_every=50, eval_size=500, lr=3e-3, progress=False)


def test_short_run_learns():
    result = train(TrainConfig(**LEARN))
    log = result.log
    chance = result.task.chance
    assert chance == pytest.approx(1 / 6)
    first, last = sum(log["loss"][:10]) / 10, sum(log["loss"][-10:]) / 10
    assert last < 0.3 * first, f"loss did not fall enough: {first:.3f} -> {last:.3f}"
    assert log["evals"][0]["test_acc"] < chance + 0.2  # it starts near chance ...
    acc = log["final"]["test_acc"]
    assert acc > chance + 0.5, f"held-out accuracy {acc:.3f} is not clearly above chance {chance:.3f}"
    # ... and the logged accuracy is the model's accuracy on fresh held-out data
    fresh = result.task.sample(500, seed=99, split="test")
    with torch.no_grad():
        assert result.task.accuracy(result.model(fresh.tokens), fresh) > chance + 0.5


@pytest.mark.parametrize("arch", ["mamba1", "mamba2", "transformer"])
def test_training_is_deterministic(arch):
    cfg = TrainConfig(task="induction", task_params=dict(seq_len=16), arch=arch, d_model=16, d_state=4,
                      headdim=8, n_head=2, steps=6, warmup_steps=2, eval_every=3, eval_size=16, progress=False)
    a, b = train(cfg), train(cfg)
    assert a.log["loss"] == b.log["loss"]
    assert a.log["evals"] == b.log["evals"]
    assert a.log["fingerprint"] == b.log["fingerprint"]
    c = train(TrainConfig(**{**cfg.to_dict(), "seed": 1}))
    assert c.log["loss"] != a.log["loss"]


@pytest.mark.parametrize("arch", ["mamba2", "transformer"])
def test_outputs_round_trip(tmp_path, arch):
    cfg = TrainConfig(task="induction", task_params=dict(seq_len=12), arch=arch, d_model=16, headdim=8,
                      n_head=2, d_state=4, steps=4, warmup_steps=1, eval_every=2, eval_size=8,
                      eval_seq_lens=(48,), snapshot_steps=(0, 2), progress=False, out_dir=str(tmp_path))
    result = train(cfg)
    for f in ("config.json", "model.safetensors", "training_log.json", "curves.png",
              "snapshot_step000000.safetensors", "snapshot_step000002.safetensors"):
        assert (tmp_path / f).exists(), f
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert len(log["loss"]) == len(log["lr"]) == 4
    assert [e["step"] for e in log["evals"]] == [2, 4]
    assert set(log["evals"][0]) == {"step", "train_loss", "train_acc", "test_loss", "test_acc", "weight_norm_sq"}
    assert set(log["final"]["acc_by_seq_len"]) == {"48"}
    assert TrainConfig.from_dict(log["train_config"]) == cfg
    model = load_checkpoint(tmp_path)
    batch = get_task("induction", seq_len=12).sample(4, 0)
    with torch.no_grad():
        logits = model(batch.tokens)
        assert logits.shape == (4, 12, 16) and logits.dtype == torch.float32
        assert torch.equal(logits, result.model(batch.tokens))
    assert model.fingerprint() == log["fingerprint"]
    from mamba_interp.tasks.training import load_snapshot

    early = load_snapshot(load_checkpoint(tmp_path), tmp_path / "snapshot_step000000.safetensors")
    torch.manual_seed(cfg.seed)
    from mamba_interp.tasks.training import build_model

    init = build_model(cfg, get_task("induction", seq_len=12))
    with torch.no_grad():
        assert torch.equal(early(batch.tokens), init.eval()(batch.tokens)), "step-0 snapshot = the initial weights"


def test_full_batch_finite_task():
    cfg = TrainConfig(task="modular_addition", task_params=dict(p=7, frac_train=0.5), arch="mamba2", d_model=16,
                      n_layer=1, headdim=8, steps=3, warmup_steps=1, batch_size=0, eval_every=1, progress=False)
    log = train(cfg).log
    task = get_task("modular_addition", p=7, frac_train=0.5)
    assert len(log["evals"]) == 3 and log["task"]["params"]["vocab_size"] == 8
    assert all(0 <= e["train_acc"] <= 1 and 0 <= e["test_acc"] <= 1 for e in log["evals"])
    # train metrics are exact on the whole train split: accuracy is a multiple of 1/|train|
    n_train = task.split_size("train")
    assert all(abs(e["train_acc"] * n_train - round(e["train_acc"] * n_train)) < 1e-9 for e in log["evals"])


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_frac=0.1)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert factors[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(task="copy"), "known tasks"),
        (dict(arch="lstm"), "arch"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(steps=0), "steps"),
        (dict(warmup_steps=100, steps=100), "warmup_steps"),
        (dict(arch="mamba2", d_model=64, headdim=48), "headdim"),
        (dict(arch="transformer", d_model=30, n_head=4), "n_head"),
        (dict(stop_at_acc=1.5), "stop_at_acc"),
        (dict(eval_seq_lens=(0,)), "eval_seq_lens"),
        (dict(snapshot_steps=(5000,)), "snapshot_steps"),
        (dict(batch_size=-1), "batch_size"),
        (dict(d_model=2.5), "d_model"),
        (dict(task_params=[1, 2]), "task_params"),
        (dict(beta2=1.0), "betas"),
    ],
)
def test_train_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)


def test_build_task_validation():
    with pytest.raises(ValueError, match="full batch"):
        TrainConfig(task="induction", batch_size=0).build_task()
    with pytest.raises(ValueError, match="no parameter"):
        TrainConfig(task="induction", task_params={"length": 3}).build_task()


@pytest.mark.parametrize(
    "argv,match",
    [
        ([], "--task"),
        (["--task", "copy"], "copy"),
        (["--task", "induction", "--arch", "lstm"], "arch"),
        (["--task", "induction", "-p", "seq_len"], "KEY=VALUE"),
        (["--task", "induction", "-p", "length=3"], "no parameter"),
        (["--task", "induction", "--steps", "ten"], "invalid int"),
        (["--task", "induction", "--lr", "-1"], "lr"),
        (["--task", "induction", "--eval-seq-lens", "a,b"], "comma-separated"),
        (["--task", "modular_addition", "-p", "frac_train=2"], "frac_train"),
        (["--task", "induction", "--bogus"], "unrecognized"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mamba-interp train: error:") and match in err


def test_cli_trains_and_parses(tmp_path, capsys):
    argv = ["--task", "induction", "-p", "seq_len=8", "-p", "vocab_size=6", "--arch", "mamba2", "--d-model", "16",
            "--headdim", "8", "--steps", "3", "--warmup-steps", "1", "--eval-every", "3", "--eval-size", "8",
            "--out", str(tmp_path / "run"), "--no-progress", "--eval-seq-lens", "16,32"]
    assert main(argv) == 0
    assert "held-out acc" in capsys.readouterr().out
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert log["task"]["params"] == {"vocab_size": 6, "seq_len": 8}
    assert log["train_config"]["eval_seq_lens"] == [16, 32]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.task_params == {"seq_len": 8, "vocab_size": 6} and cfg.arch == "mamba2" and not cfg.progress
    assert main(["--help"]) == 0
