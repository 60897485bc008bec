"""Command line: ``mamba-interp run|train|list-steps|list-models|report``.

``python mamba_mechanistic_analysis.py [options]`` is ``mamba-interp run [options]``. Bad input prints one line
``mamba-interp: error: <problem>; <fix>`` on stderr and exits with code 2 before anything is written.
Exit codes: 0 success, 1 a step failed (the others still ran; see the report), 2 bad input, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM). The signal handlers are installed before torch is imported (this module and
the packages above it import nothing heavy), so an interruption at any moment prints one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from mamba_interp.pipeline import interrupts
from mamba_interp.pipeline.config import DTYPES, EXECUTORS, HOOK_CHOICES, SCAN_IMPLS, STORES, UsageError

PROG = "mamba-interp"
SUBCOMMANDS = ("run", "train", "list-steps", "list-models", "report")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see {self.prog} --help")


def _run_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description="Run the mechanistic-analysis pipeline on a Mamba model. With no options: every implemented "
        "step on the embedded default zoo model, into a new folder under results/.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Options given on the command line override those of --config. Exit codes: 0 ok, 1 a step failed, "
        "2 bad input, 130 interrupted.",
    )
    p.add_argument("--model", "-m", help="zoo name (see list-models), checkpoint folder, or hub id in the local "
                   "Hugging Face cache (default: the embedded default zoo model)")
    p.add_argument("--layer", "--layers", dest="layers", help="layers to analyse: an integer, a list 0,2, a range "
                   "0-3, or all (default: all)")
    p.add_argument("--samples", "-n", type=int, help="sequences per dataset (default 256)")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="length of generated sequences (default: the task's)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="sequences per forward pass (default 64)")
    p.add_argument("--steps", "-s", help="steps to run, e.g. 0-2,5 (default: all implemented; requirements are "
                   "added automatically)")
    p.add_argument("--output", "-o", help="output folder (default: results/<model>-<timestamp>)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", choices=DTYPES, help="model dtype (default float32)")
    p.add_argument("--scan-impl", dest="scan_impl", choices=SCAN_IMPLS,
                   help="selective-scan implementation (default auto: chosen per device; see README, GPU)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's; 1 is often fastest on a "
                   "busy machine)")
    p.add_argument("--config", "-c", help="YAML file with any of these options (keys as in RunConfig)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="skip steps whose result.json in --output was computed for what this run gives them")
    p.add_argument("--task", help="task generator for a model without a card (e.g. induction)")
    p.add_argument("--hooks", help=f"hooks step 2 collects, comma-separated, from: {', '.join(HOOK_CHOICES)}")
    p.add_argument("--compare", help="companion models for steps 9, 10, 14, comma-separated: zoo names, folders "
                   "or hub ids (default: a zoo model's family and its task's transformer baseline)")
    p.add_argument("--option", action="append", metavar="STEP.KEY=VALUE", default=None,
                   help="a step option, e.g. sae.expansion=8 (repeatable; list-steps shows each step's options)")
    p.add_argument("--no-figures", dest="figures", action="store_false", default=None,
                   help="skip the figures (metrics and files only; faster)")
    p.add_argument("--no-save-activations", dest="save_activations", action="store_false", default=None,
                   help="do not write step 2's activations.safetensors")
    p.add_argument("--quiet", "-q", action="store_true", default=None, help="no per-step lines or progress bars")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="validate and print the memory plan (peak memory, disk, CPU time per step), write nothing")
    p.add_argument("--activation-store", dest="activation_store", choices=STORES,
                   help="keep activations in memory, on disk (streamed in chunks), or auto (default: disk when they "
                   "would not fit comfortably)")
    p.add_argument("--executor", choices=EXECUTORS,
                   help="run independent units (SAEs per layer and hook, ...) locally or on Ray (default local)")
    p.add_argument("--ray-address", dest="ray_address", help="join a running Ray cluster (with --executor ray)")
    p.add_argument("--corpus", help="a text file (one document per line) or .jsonl with a 'text' field: steps 2-4 "
                   "of a language model analyse its context windows of --seq-len tokens")
    p.add_argument("--tokens", type=int, help="token budget read from --corpus: tokens // seq-len windows (default: "
                   "--samples windows)")
    p.add_argument("--list-steps", action="store_true", help="list the implemented steps and exit")
    return p


def _step_options(items: list[str] | None, base: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    if not items:
        return None
    import yaml

    from mamba_interp.pipeline.config import load_yaml

    out: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (base or {}).items()}
    for item in items:
        key, sep, raw = item.partition("=")
        step, dot, name = key.partition(".")
        if not sep or not dot or not step or not name:
            raise UsageError(f"--option {item!r} is malformed; write STEP.KEY=VALUE, e.g. sae.expansion=8")
        try:
            value = load_yaml(raw)
        except yaml.YAMLError:
            value = raw
        out.setdefault(step.strip(), {})[name.strip()] = value
    return out


def list_steps() -> str:
    import dataclasses

    from mamba_interp.pipeline.registry import all_steps

    lines = [f"{'#':>3}  {'name':<14} {'requires':<10} title"]
    for s in all_steps().values():
        req = ",".join(map(str, s.requires)) or "-"
        note = "" if s.default else "  (not in the default run: name it with --steps)"
        lines.append(f"{s.number:>3}  {s.name:<14} {req:<10} {s.title}{note}")
        if s.options is not None:
            opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(s.options)
                             if f.default is not dataclasses.MISSING)
            lines.append(f"{'':>5}options (--option {s.name}.KEY=VALUE): {opts}")
    return "\n".join(lines)


def list_models() -> str:
    from mamba_interp.pipeline.model_source import import_zoo

    zoo = import_zoo()
    if zoo is None:
        return "the model zoo (mamba_interp.zoo) is not installed"
    lines = []
    for name in zoo.names():
        try:
            info = zoo.info(name)
        except Exception as exc:  # a broken card should not hide the others
            lines.append(f"{name}: card unreadable ({type(exc).__name__})")
            continue
        task = info.get("task")
        task = task.get("name") if isinstance(task, dict) else task
        default = " (default)" if name == getattr(zoo, "DEFAULT", None) else ""
        acc = info.get("accuracy")
        acc_s = f", accuracy {acc:.3f}" if isinstance(acc, (int, float)) else ""
        lines.append(f"{name}{default}: {info.get('arch')}, task {task}{acc_s}")
    return "\n".join(lines)


def cmd_run(argv: list[str], prog: str = f"{PROG} run") -> int:
    from mamba_interp.pipeline.config import build_config, read_config_file
    from mamba_interp.pipeline.runner import Runner, print_line

    args = _run_parser(prog).parse_args(argv)
    if args.list_steps:
        print(list_steps())
        return 0
    base_options = read_config_file(args.config).get("step_options", {}) if args.config else {}
    fields = ("model", "layers", "samples", "seq_len", "batch_size", "steps", "output", "device", "dtype",
              "scan_impl", "seed", "threads", "resume", "task", "hooks", "figures", "save_activations", "quiet",
              "activation_store", "executor", "ray_address", "corpus", "tokens", "compare")
    overrides = {k: getattr(args, k) for k in fields}
    overrides["step_options"] = _step_options(args.option, base_options if isinstance(base_options, dict) else {})
    cfg = build_config(args.config, **overrides)
    echo = (lambda line: None) if cfg.quiet else print_line
    runner = Runner(cfg, echo=echo, argv=[prog.split()[0], *prog.split()[1:], *argv], dry_run=args.dry_run)
    runner.prepare()
    if args.dry_run:
        print_line(runner.plan.format())
        print_line(f"dry run: nothing was written (the output would be {runner.out_dir})")
        return 0
    if not cfg.quiet:
        src = runner.source
        print_line(f"mamba_interp: model {src.name} ({src.kind}, {src.model.cfg.arch}, {src.model.cfg.n_layer} "
                   f"layers) on {runner.device}; layers {','.join(map(str, runner.layers))}; steps "
                   f"{','.join(map(str, runner.planned))}; output {runner.out_dir}")
        print_line(runner.plan.format())
    try:
        summary = runner.run()
    except KeyboardInterrupt as exc:
        print(f"{PROG}: {interrupts.describe(exc)}; partial results are in {runner.out_dir}; rerun with --resume "
              f"--output {runner.out_dir} to continue", file=sys.stderr)
        return interrupts.exit_code(exc)
    finally:
        runner.close()
    if summary.failed:
        names = ", ".join(f"{n} ({summary.records[n].step.name})" for n in summary.failed)
        print(f"{PROG}: step(s) {names} failed; details in {summary.out_dir / 'run.log'}", file=sys.stderr)
    if summary.report is None:
        print(f"{PROG}: report.html could not be written (see {summary.out_dir / 'run.log'}); the results are in "
              f"{summary.out_dir}", file=sys.stderr)
        return max(summary.exit_code, 1)
    print(f"Report: {summary.report}")
    return summary.exit_code


def cmd_report(argv: list[str]) -> int:
    from pathlib import Path

    from mamba_interp.pipeline.report import write_report

    p = _Parser(prog=f"{PROG} report", description="Rebuild report.html of a run folder.")
    p.add_argument("output", help="the run's output folder")
    args = p.parse_args(argv)
    out = Path(args.output)
    if not (out / "manifest.json").is_file():
        raise UsageError(f"{args.output!r} holds no manifest.json; pass a pipeline output folder")
    try:
        path = write_report(out)
    except OSError as exc:
        raise UsageError(f"cannot write {str(out / 'report.html')!r} ({exc.strerror or type(exc).__name__}); "
                         "check the folder's permissions and free space") from None
    print(f"Report: {path}")
    return 0


def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Mechanistic interpretability for Mamba-1 / Mamba-2 models.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="commands:\n  run           run the analysis pipeline (mamba-interp run --help)\n"
                "  train         train a tiny model on a synthetic task (mamba-interp train --help)\n"
                "  list-steps    list the implemented pipeline steps\n"
                "  list-models   list the model zoo\n"
                "  report OUT    rebuild OUT/report.html\n"
                "Without a command, options are those of run.")
    p.add_argument("command", nargs="?", choices=SUBCOMMANDS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mamba-interp`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _guarded(lambda: _dispatch(argv))


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0
    if not argv or argv[0].startswith("-"):
        return cmd_run(argv)
    command, rest = argv[0], argv[1:]
    if command == "run":
        return cmd_run(rest)
    if command == "train":
        from mamba_interp.tasks.training import main as train_main

        return int(train_main(rest) or 0)
    if command == "list-steps":
        _Parser(prog=f"{PROG} list-steps").parse_args(rest)
        print(list_steps())
        return 0
    if command == "list-models":
        _Parser(prog=f"{PROG} list-models").parse_args(rest)
        print(list_models())
        return 0
    if command == "report":
        return cmd_report(rest)
    raise UsageError(f"unknown command {command!r}; use one of {', '.join(SUBCOMMANDS)} (see {PROG} --help)")


def _guarded(command: Callable[[], int]) -> int:
    """Run a command with the signal handlers installed: bad input and interruptions (also during the imports of
    torch and the model loading that commands do lazily) end in one line on stderr."""
    previous = interrupts.install_handlers()
    try:
        return command()
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # before a run started writing (cmd_run handles it once it has)
        print(f"{PROG}: {interrupts.describe(exc)}", file=sys.stderr)
        return interrupts.exit_code(exc)
    finally:  # callers in the same process (tests, notebooks) get their handlers back
        interrupts.restore_handlers(previous)


def run_main(argv: list[str] | None = None) -> int:
    """``python mamba_mechanistic_analysis.py``: the ``run`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return _guarded(lambda: cmd_run(argv, prog="mamba_mechanistic_analysis.py"))


if __name__ == "__main__":
    sys.exit(main())
