"""Train a tiny HookedMamba (Mamba-1 / Mamba-2) or the GPT-2 baseline on a task.

AdamW (betas 0.9/0.98, Nanda et al. 2023's setting for small algorithmic models) with linear warmup then cosine
decay to ``min_lr_frac·lr``; weight decay on matrices and embeddings only (not on biases, norms, ``A_log``, ``D``,
``dt_bias``, following
mamba_ssm's ``_no_weight_decay``) unless ``decay_all``. Each step draws a fresh training batch from the task's
``"train"`` stream (seed = ``seed·1_000_003 + step``); accuracy is measured on a held-out ``"test"`` sample fixed
at the start, or on the test split of a finite task (modular addition, trained full-batch with
``batch_size=0``). On CPU the same config gives the same losses bit for bit.

Outputs in ``out_dir``: ``config.json`` + ``model.safetensors`` (``HookedMamba.save_pretrained`` or transformers'
GPT-2 format), ``training_log.json`` and ``curves.png``, and ``snapshot_stepNNNNNN.safetensors`` for each of
``snapshot_steps``. ``training_log.json`` holds:

* ``train_config``, ``task`` (name and ``spec()``), ``model_config``, ``n_params``, ``versions``;
* ``loss`` and ``lr``: one value per step (training batch loss before the update);
* ``evals``: per evaluation ``{step, train_loss, train_acc, test_loss, test_acc, weight_norm_sq}`` — train
  metrics are exact on the whole train split for finite tasks and on the current batch otherwise;
* ``final``: ``test_acc``, ``test_loss``, ``acc_by_seq_len`` (for ``eval_seq_lens``), ``steps_run``,
  ``stopped_early``, ``train_time_s`` (the training loop), ``total_time_s``; ``fingerprint`` of the weights.

CLI (``mamba-interp train ...``, or ``python -m mamba_interp.tasks train ...``)::

    mamba-interp train --task induction --arch mamba1 --steps 400 --out results/train/ind
    mamba-interp train --task modular_addition -p p=31 -p frac_train=0.5 --arch mamba2 --batch-size 0 ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mamba_interp.tasks.base import Task, TaskBatch, get_task, task_names

ARCHS = ("mamba1", "mamba2", "transformer")


def _fail(msg: str) -> None:
    raise ValueError(msg)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (the run is a pure function of this config)."""

    task: str = "induction"
    task_params: dict[str, Any] = field(default_factory=dict, hash=False)
    """Passed to ``get_task(task, **task_params)``."""
    arch: str = "mamba1"
    """"mamba1", "mamba2" or "transformer" (the GPT-2 baseline)."""
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 16  # Mamba N
    d_conv: int = 4
    expand: int = 2
    headdim: int = 16  # Mamba-2 P (must divide expand·d_model)
    n_head: int = 4  # transformer heads
    max_positions: int = 0
    """Transformer position table; 0 = 16 × the task's seq_len (room to evaluate extrapolation)."""
    steps: int = 1000
    batch_size: int = 32
    """Sequences per step; 0 = the whole train split (full batch; finite tasks only)."""
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    decay_all: bool = False
    """Decay every parameter (as in Nanda et al.'s grokking runs) instead of matrices and embeddings only."""
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    """Max global grad norm; 0 disables clipping."""
    eval_every: int = 50
    eval_size: int = 1000
    """Held-out sequences per evaluation (generator tasks; finite tasks use their whole test split)."""
    eval_seq_lens: tuple[int, ...] = ()
    """Extra lengths evaluated once at the end (length generalisation), ``eval_size`` sequences each."""
    stop_at_acc: float | None = None
    """Stop at the first evaluation whose held-out accuracy reaches this value."""
    snapshot_steps: tuple[int, ...] = ()
    """Steps at which the weights are also saved as ``snapshot_stepNNNNNN.safetensors``."""
    seed: int = 0
    threads: int = 1
    """torch threads during training (1 is fastest on a shared CPU, docs/performance.md); 0 leaves torch's setting."""
    device: str = "cpu"
    progress: bool = True
    out_dir: str | None = None
    """Where outputs go; None trains in memory only."""

    def __post_init__(self) -> None:
        if self.task not in task_names():
            _fail(f"TrainConfig.task={self.task!r} is unknown; known tasks: {', '.join(task_names())}")
        if not isinstance(self.task_params, dict):
            _fail(f"TrainConfig.task_params must be a dict, got {type(self.task_params).__name__}")
        if self.arch not in ARCHS:
            _fail(f"TrainConfig.arch={self.arch!r} is unknown; use one of {ARCHS}")
        for name in ("d_model", "n_layer", "d_state", "d_conv", "expand", "headdim", "n_head", "steps",
                     "eval_every", "eval_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                _fail(f"TrainConfig.{name}={value!r} must be a positive integer")
        for name in ("batch_size", "warmup_steps", "max_positions", "seed", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                _fail(f"TrainConfig.{name}={value!r} must be a non-negative integer")
        if self.arch == "mamba2" and (self.expand * self.d_model) % self.headdim:
            _fail(f"mamba2 needs headdim={self.headdim} to divide expand*d_model={self.expand * self.d_model}")
        if self.arch == "transformer" and self.d_model % self.n_head:
            _fail(f"transformer needs n_head={self.n_head} to divide d_model={self.d_model}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            _fail(f"TrainConfig.lr={self.lr!r} must be a positive finite number")
        if not 0 <= self.min_lr_frac <= 1:
            _fail(f"TrainConfig.min_lr_frac={self.min_lr_frac!r} must be in [0, 1]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            _fail("TrainConfig.weight_decay and grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            _fail(f"TrainConfig betas ({self.beta1}, {self.beta2}) must be in [0, 1)")
        if self.warmup_steps >= self.steps:
            _fail(f"TrainConfig.warmup_steps={self.warmup_steps} must be < steps={self.steps}")
        if self.stop_at_acc is not None and not 0 < self.stop_at_acc <= 1:
            _fail(f"TrainConfig.stop_at_acc={self.stop_at_acc!r} must be in (0, 1] or None")
        object.__setattr__(self, "eval_seq_lens", tuple(int(x) for x in self.eval_seq_lens))
        object.__setattr__(self, "snapshot_steps", tuple(sorted({int(x) for x in self.snapshot_steps})))
        if any(x <= 0 for x in self.eval_seq_lens):
            _fail(f"TrainConfig.eval_seq_lens={self.eval_seq_lens} must be positive lengths")
        if any(not 0 <= s <= self.steps for s in self.snapshot_steps):
            _fail(f"TrainConfig.snapshot_steps={self.snapshot_steps} must lie in 0..steps={self.steps}")

    def build_task(self) -> Task:
        task = get_task(self.task, **self.task_params)
        if self.batch_size == 0 and not task.finite:
            _fail(f"batch_size=0 (full batch) needs a finite task; {self.task!r} generates fresh data, set a size")
        return task

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            _fail(f"unknown TrainConfig fields {unknown}")
        return cls(**data)


@dataclass
class TrainResult:
    model: nn.Module
    task: Task
    log: dict[str, Any]
    out_dir: Path | None


# ---- building blocks ---------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, task: Task) -> nn.Module:
    """A freshly initialised model for ``task`` (seed first: ``torch.manual_seed(cfg.seed)``)."""
    if cfg.arch == "transformer":
        from mamba_interp.tasks.baseline import TransformerBaseline

        positions = cfg.max_positions or 16 * task.seq_len
        return TransformerBaseline.build(task.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head, positions)
    from mamba_interp.models import HookedMamba, MambaConfig

    extra = {"headdim": cfg.headdim} if cfg.arch == "mamba2" else {}
    mcfg = MambaConfig(arch=cfg.arch, d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=task.vocab_size,
                       d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, **extra)
    return HookedMamba(mcfg)


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    if hasattr(model, "hf_model"):
        return {k: v for k, v in model.hf_model.config.to_dict().items() if k != "transformers_version"}
    return model.cfg.to_dict()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # matrices and embeddings decay; vectors (biases, norms, D, dt_bias) and Mamba-1's A_log do not
        matrix = param.dim() >= 2 and not name.endswith("A_log")
        (decay if matrix or cfg.decay_all else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for the update made at ``step`` (0-based): warmup, then cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, batch: TaskBatch, max_tokens: int = 32768) -> dict[str, float]:
    """Loss and accuracy on ``batch``, in chunks of at most ``max_tokens`` tokens (attention is l²)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chunk = max(1, max_tokens // batch.seq_len)
    loss_sum, n_targets, correct, n_scored = 0.0, 0, 0, 0
    try:
        for start in range(0, len(batch), chunk):
            part = batch.select(slice(start, start + chunk)).to(device)
            logits = model(part.tokens, attention_mask=part.attention_mask)
            k = int((part.targets != -100).sum())
            if k:
                loss_sum += float(task.loss(logits, part)) * k
                n_targets += k
            mask = part.eval_mask
            correct += int(((logits.argmax(-1) == part.targets) & mask).sum())
            n_scored += int(mask.sum())
    finally:
        model.train(was_training)
    return {"loss": loss_sum / max(1, n_targets), "acc": correct / max(1, n_scored)}


def weight_norm_sq(model: nn.Module) -> float:
    """Σ w² over all parameters (a grokking progress measure, Nanda et al. 2023)."""
    return float(sum((p.detach().double() ** 2).sum() for p in model.parameters()))


def data_seed(cfg: TrainConfig, step: int) -> int:
    return cfg.seed * 1_000_003 + step


# ---- the training loop -----------------------------------------------------------------------------
def train(cfg: TrainConfig) -> TrainResult:
    """Train per ``cfg``; write checkpoint, log and curves to ``cfg.out_dir`` (if set); return the result."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    task = cfg.build_task()
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, task).to(cfg.device)
        model.train()
        opt = make_optimizer(model, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
        out = Path(cfg.out_dir) if cfg.out_dir else None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        if task.finite:
            train_full = task.sample(None, 0, split="train")
            test_batch = task.sample(None, 0, split="test")
        else:
            train_full = None
            test_batch = task.sample(cfg.eval_size, cfg.seed, split="test")
        log: dict[str, Any] = {
            "train_config": cfg.to_dict(),
            "task": {"name": task.name, "params": task.spec()},
            "model_config": model_config_dict(model),
            "arch": cfg.arch,
            "n_params": sum(p.numel() for p in model.parameters()),
            "versions": _versions(),
            "loss": [],
            "lr": [],
            "evals": [],
        }
        if 0 in cfg.snapshot_steps and out is not None:
            _save_snapshot(model, out, 0)
        interval_losses: list[float] = []
        stopped_early = False
        step = 0
        bar = tqdm(total=cfg.steps, desc=f"{task.name} {cfg.arch}", disable=not cfg.progress, dynamic_ncols=True,
                   file=sys.stderr)
        t_loop = time.perf_counter()
        for step in range(1, cfg.steps + 1):
            if cfg.batch_size == 0:
                batch = train_full
            else:
                batch = task.sample(cfg.batch_size, data_seed(cfg, step), split="train")
            batch = batch.to(cfg.device)
            logits = model(batch.tokens, attention_mask=batch.attention_mask)
            loss = task.loss(logits, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            log["lr"].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at step {step}; lower --lr")
            log["loss"].append(loss_value)
            interval_losses.append(loss_value)
            bar.update(1)
            if step in cfg.snapshot_steps and out is not None:
                _save_snapshot(model, out, step)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                record = {"step": step}
                if train_full is not None:
                    train_metrics = evaluate(model, task, train_full)
                    record["train_loss"], record["train_acc"] = train_metrics["loss"], train_metrics["acc"]
                else:
                    record["train_loss"] = sum(interval_losses) / len(interval_losses)
                    record["train_acc"] = task.accuracy(logits.detach(), batch)
                test_metrics = evaluate(model, task, test_batch)
                record["test_loss"], record["test_acc"] = test_metrics["loss"], test_metrics["acc"]
                record["weight_norm_sq"] = weight_norm_sq(model)
                log["evals"].append(record)
                interval_losses = []
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", test_acc=f"{record['test_acc']:.3f}")
                if cfg.stop_at_acc is not None and record["test_acc"] >= cfg.stop_at_acc:
                    stopped_early = step < cfg.steps
                    break
        bar.close()
        train_time = time.perf_counter() - t_loop
        model.eval()
        last = log["evals"][-1]
        acc_by_len = {}
        for length in cfg.eval_seq_lens:
            held_out = task.sample(cfg.eval_size, cfg.seed, seq_len=length, split="test")
            acc_by_len[str(length)] = evaluate(model, task, held_out)["acc"]
        log["final"] = {
            "test_acc": last["test_acc"],
            "test_loss": last["test_loss"],
            "acc_by_seq_len": acc_by_len,
            "steps_run": step,
            "stopped_early": stopped_early,
            "train_time_s": round(train_time, 2),
            "total_time_s": round(time.perf_counter() - t_start, 2),
        }
        log["fingerprint"] = model.fingerprint()
        if out is not None:
            model.save_pretrained(out)
            from mamba_interp.utils.io import atomic_write_json

            atomic_write_json(out / "training_log.json", log)
            plot_curves(log, out / "curves.png", chance=task.chance)
        return TrainResult(model=model, task=task, log=log, out_dir=out)
    finally:
        torch.set_num_threads(old_threads)


def _save_snapshot(model: nn.Module, out: Path, step: int) -> None:
    from safetensors.torch import save_file

    from mamba_interp.utils.io import atomic_path

    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied to embed.weight
    with atomic_path(out / f"snapshot_step{step:06d}.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"step": str(step)})
        os.chmod(tmp, 0o644)  # safetensors replaces the file with a 0600 one; snapshots may ship as package data


def load_snapshot(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``snapshot_step*.safetensors`` (our parameter names) into a model of the same config."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{path}: snapshot does not match the model (missing {missing}, unexpected {unexpected})")
    return model.eval()


def _versions() -> dict[str, str]:
    import platform

    import mamba_interp

    return {"mamba_interp": mamba_interp.__version__, "torch": torch.__version__, "python": platform.python_version()}


def plot_curves(log: dict[str, Any], path: Path, chance: float | None = None) -> None:
    """Two panels: training loss per step with held-out loss at evaluations; train/held-out accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = log["evals"]
    steps = [e["step"] for e in evals]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(range(1, len(log["loss"]) + 1), log["loss"], lw=0.6, alpha=0.6, label="train (batch)")
    ax_loss.plot(steps, [e["test_loss"] for e in evals], "o-", ms=3, label="held-out")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(steps, [e["train_acc"] for e in evals], "o-", ms=3, label="train")
    ax_acc.plot(steps, [e["test_acc"] for e in evals], "o-", ms=3, label="held-out")
    if chance is not None:
        ax_acc.axhline(chance, color="grey", ls=":", label="chance")
    ax_acc.set_ylim(-0.02, 1.02)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    task = log["task"]["name"]
    fig.suptitle(f"{task} · {log['arch']} · {log['n_params']:,} params")
    fig.tight_layout()
    from mamba_interp.utils.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ---- CLI ---------------------------------------------------------------------------------------------
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump, exit code 2 (handled in main)
        raise _UsageError(message)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog="mamba-interp train", description="Train a tiny Mamba or GPT-2 baseline on a task.")
    p.add_argument("--task", required=True, help=f"one of: {', '.join(task_names())}")
    p.add_argument("-p", "--task-param", action="append", default=[], metavar="KEY=VALUE",
                   help="task parameter (repeatable), value parsed as JSON when possible, e.g. -p seq_len=64")
    p.add_argument("--arch", default=d.arch, help=f"one of {ARCHS} (default {d.arch})")
    for name in ("d_model", "n_layer", "d_state", "d_conv", "expand", "headdim", "n_head", "max_positions",
                 "steps", "batch_size", "warmup_steps", "eval_every", "eval_size", "seed", "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                       help=f"(default {getattr(d, name)})")
    for name in ("lr", "min_lr_frac", "weight_decay", "beta1", "beta2", "grad_clip"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name),
                       help=f"(default {getattr(d, name)})")
    p.add_argument("--decay-all", action="store_true", help="weight decay on every parameter (grokking setups)")
    p.add_argument("--stop-at-acc", type=float, default=None, help="stop once held-out accuracy reaches this")
    p.add_argument("--eval-seq-lens", type=_int_list, default=(), help="extra eval lengths, e.g. 256,1024")
    p.add_argument("--snapshot-steps", type=_int_list, default=(), help="steps to save weight snapshots at")
    p.add_argument("--device", default=d.device)
    p.add_argument("--out", default=None, help="output folder (default results/train/<task>-<arch>-s<seed>)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    task_params = {}
    for item in args.task_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise _UsageError(f"--task-param expects KEY=VALUE, got {item!r}")
        task_params[key.strip()] = _parse_value(value.strip())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    out = args.out or f"results/train/{args.task}-{args.arch}-s{args.seed}"
    return TrainConfig(**{**values, "task_params": task_params, "out_dir": out, "progress": not args.no_progress})


def main(argv: list[str] | None = None) -> int:
    """``mamba-interp train ...``: 0 on success, 2 (one-line message on stderr) on bad input."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        cfg = config_from_args(args)
        cfg.build_task()  # validate the task parameters before any work
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (_UsageError, ValueError, TypeError) as exc:
        print(f"mamba-interp train: error: {exc}", file=sys.stderr)
        return 2
    result = train(cfg)
    final = result.log["final"]
    extra = "".join(f", acc@{k}={v:.4f}" for k, v in final["acc_by_seq_len"].items())
    print(f"{cfg.task}/{cfg.arch}: held-out acc {final['test_acc']:.4f}{extra} after {final['steps_run']} steps "
          f"({final['train_time_s']:.0f} s); wrote {result.out_dir}")
    return 0

