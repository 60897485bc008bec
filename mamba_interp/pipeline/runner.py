"""The pipeline runner: validates a run, executes the selected steps and writes every output (docs/outputs.md).

Output layout::

    OUT/manifest.json                 config, seed, versions, model fingerprint, git revision, per-step status/time
    OUT/run.log                       the log of every run into OUT (appended)
    OUT/step_NN_<name>/result.json    step, name, status, duration_s, config, metrics, artifacts, reading, ...
    OUT/step_NN_<name>/*.png, ...     the step's figures and files
    OUT/report.html                   self-contained report (see ``report.py``)

Guarantees:

* All validation (config, model, layers, hooks, steps, output folder, device) happens in :meth:`Runner.prepare`
  before anything is written; failures are :class:`UsageError`.
* A step folder is emptied when its step starts, and ``result.json`` is written atomically only when the step
  ends, so a run killed mid-step leaves no result that looks complete; ``--resume`` re-runs it.
* ``--resume`` skips a step whose ``result.json`` is ``completed`` with the step's resume key in this run (the
  config fields it reads, its options and version, the model and its task, card and tokenizer, and the keys of the
  steps it requires; ``resume_key.py``).
* One run per output folder: ``OUT/run.lock`` is held from :meth:`Runner.prepare` to :meth:`Runner.close`; a second
  run into the folder is a :class:`UsageError` naming the first.
* What an earlier run with another configuration left (``step_*`` entries whose ``result.json`` does not carry this
  run's key for that step, or cannot be read, or a file where a step folder belongs) is moved, with the old
  manifest and report, to ``OUT/stale/<timestamp>/`` before the run writes; nothing is deleted.
* A failing step is recorded (``status: failed`` with the error) and the run goes on; steps that require it
  are recorded as ``skipped`` with the reason. Filesystem errors while preparing a step's folder or writing its
  result are that step's failure too.
* Ctrl-C and SIGTERM (``interrupts.py``) record the running step and the run as ``interrupted``.
* CUDA out-of-memory inside a step: retried with half the batch (twice), then on CPU; each fallback is recorded
  in ``result.json["fallbacks"]``.

The pieces live in their own modules: ``output_folder.py`` (checks on ``OUT``, the lock, stale leftovers),
``results.py`` (records, ``result.json`` and the resume match), ``resume_key.py`` (what a step's key covers),
``fallback.py`` (the out-of-memory retries).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mamba_interp.pipeline import environment as env
from mamba_interp.pipeline.config import RunConfig, UsageError
from mamba_interp.pipeline.context import ConfigView, StepContext, StepResult
from mamba_interp.pipeline.fallback import OOMFallback
from mamba_interp.pipeline.interrupts import describe as describe_interrupt
from mamba_interp.pipeline.memory_plan import MemoryPlan, make_plan
from mamba_interp.pipeline.resources import peak_rss, reset_peak_rss
from mamba_interp.pipeline.model_source import ModelSource, load_model_source
from mamba_interp.pipeline.output_folder import RunLock, check_output_folder, make_output_folder, move_to_stale
from mamba_interp.pipeline.registry import (
    Step,
    StepSkipped,
    all_steps,
    default_steps,
    get_step,
    with_requirements,
)
from mamba_interp.pipeline.results import (
    MANIFEST_FORMAT,
    ResultStore,
    RunSummary,
    StepRecord,
    first_line,
    now,
)
from mamba_interp.pipeline.resume_key import ResumeKeys
from mamba_interp.utils.io import atomic_write_json

__all__ = ["Runner", "RunSummary", "StepRecord", "print_line"]

logger = logging.getLogger("mamba_interp.pipeline")


class Runner:
    """Runs pipeline steps for one :class:`RunConfig`. ``Runner(cfg).run()`` is what the CLI does.

    ``echo`` receives one human-readable line per step (the CLI prints them; the analyzer may silence them).
    """

    def __init__(self, config: RunConfig, echo: Callable[[str], None] | None = None,
                 argv: list[str] | None = None, source: ModelSource | None = None, dry_run: bool = False) -> None:
        if not isinstance(config, RunConfig):
            raise TypeError(f"Runner needs a RunConfig, got {type(config).__name__}")
        self.config = config
        self.echo = echo if echo is not None else (lambda line: None)
        self.argv = list(argv) if argv is not None else None
        self.source: ModelSource | None = source
        self.dry_run = dry_run
        """Only validate and plan: :meth:`prepare` writes nothing and :meth:`run` refuses to run."""
        self.plan: MemoryPlan | None = None
        self.prepared = False
        self.results: dict[int, StepResult] = {}
        self.data: dict[int, dict[str, Any]] = {}
        self.records: dict[int, StepRecord] = {}
        self._log_handler: logging.Handler | None = None
        self._peak_reset = False
        self._cpu0: float | None = None
        self._executor: Any = None
        self._lock: RunLock | None = None
        self._manifest_created = now()
        self._status = "running"

    # ---- preparation: everything that can fail on bad input, before anything is written ------------
    def prepare(self) -> Runner:
        """Validate everything and make the memory plan (a step that cannot fit is a :class:`UsageError`), then,
        unless ``dry_run``, create the output folder, take its lock and write the manifest."""
        if self.prepared or (self.dry_run and self.plan is not None):
            return self
        cfg = self.config
        if cfg.resume and cfg.output is None:
            raise UsageError("--resume needs --output, the folder of the run to continue")
        self.device = env.resolve_device(cfg.device)
        self.dtype = env.DTYPES[cfg.dtype]
        steps = all_steps()
        if cfg.steps is None:
            self.selected = default_steps()
        else:
            for n in cfg.steps:
                get_step(n)  # raises UsageError naming the implemented steps
            self.selected = list(cfg.steps)
        self.planned = with_requirements(self.selected)
        known_names = {s.name for s in steps.values()}
        unknown = sorted(set(cfg.step_options) - known_names)
        if unknown:
            raise UsageError(f"step_options names unknown step {unknown[0]!r}; steps: {', '.join(sorted(known_names))}")
        # every step's options, run or not: a typo must not be stored in the run's config as if it were used
        self.options = {n: s.make_options(cfg.step_options.get(s.name)) for n, s in steps.items()}
        if self.source is None:
            self.source = load_model_source(cfg.model, task=cfg.task, dtype=None)
        model = self.source.model
        try:
            model.set_scan_impl(cfg.scan_impl)
        except ValueError as exc:
            raise UsageError(f"{first_line(exc)} (--scan-impl)") from None
        if cfg.scan_impl == "kernel" and self.device.type != "cuda":
            raise UsageError("--scan-impl kernel needs a CUDA device and mamba_ssm; use --scan-impl auto on CPU")
        n_layer = model.cfg.n_layer
        if cfg.layers is None:
            self.layers = tuple(range(n_layer))
        else:
            bad = [i for i in cfg.layers if i >= n_layer]
            if bad:
                raise UsageError(
                    f"layer {bad[0]} is out of range: model {self.source.name!r} has {n_layer} layers "
                    f"(0..{n_layer - 1}); pass --layer within that range or 'all'"
                )
            self.layers = cfg.layers
        from mamba_interp.pipeline.activation_stats import available_hooks

        allowed = available_hooks(model.cfg.arch)
        bad_hooks = [h for h in cfg.hooks if h not in allowed]
        if bad_hooks:
            raise UsageError(
                f"hook {bad_hooks[0]!r} does not exist in {model.cfg.arch}; choose from {', '.join(allowed)}"
            )
        if cfg.corpus is not None and (self.source.task is not None or self.source.tokenizer() is None):
            why = (f"model {self.source.name!r} is a {self.source.task} task model" if self.source.task is not None
                   else f"model {self.source.name!r} has no tokenizer ({self.source.tokenizer_error})")
            raise UsageError(f"--corpus needs a language model with a tokenizer, but {why}; drop --corpus or save "
                             f"the tokenizer into the model folder")
        self.out_dir = Path(cfg.output).expanduser() if cfg.output else self._default_output()
        check_output_folder(self.out_dir)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        model.to(device=self.device, dtype=self.dtype).eval()
        self.plan = make_plan(cfg, self.source, self.layers, self.planned, self.options, self.device, self.out_dir)
        problems = self.plan.problems()
        if problems:
            raise UsageError(problems[0])
        if self.dry_run:
            return self
        # validation is over: from here on the run may write
        make_output_folder(self.out_dir)
        self._lock = RunLock(self.out_dir)
        self._lock.acquire(" ".join(self.argv) if self.argv else f"python (pid {os.getpid()})")
        try:
            self.fingerprint = model.fingerprint()
            self.keys = ResumeKeys(cfg, self.options, self.fingerprint, self.layers, self.source)
            self.store = ResultStore(self.out_dir, cfg, self.fingerprint, self.layers, self.keys)
            self._environment = {"versions": env.library_versions(), "platform": env.platform_info(),
                                 "git": env.git_revision()}
            self.records = {n: StepRecord(steps[n]) for n in self.planned}
            self._attach_log()
            if self._lock.took_over:
                logger.warning("took over the lock of an earlier run that is no longer running: %s",
                               self._lock.took_over)
            self._set_aside_stale()
            self.prepared = True
            logger.info("run prepared: model %s (%s), device %s, layers %s, steps %s, output %s", self.source.name,
                        self.fingerprint, self.device, list(self.layers), self.planned, self.out_dir)
            logger.info("%s", self.plan.format())
            self.write_manifest()
        except BaseException:
            self.close()
            raise
        return self

    def _set_aside_stale(self) -> None:
        """Move ``step_*`` entries that are not this configuration's results (see the module docstring) to
        ``OUT/stale/<timestamp>/``, with the manifest and report that described them."""
        by_folder = {s.folder_name: s for s in all_steps().values()}
        stale = []
        for entry in sorted(self.out_dir.glob("step_*")):
            step = by_folder.get(entry.name)
            if entry.is_symlink() or not entry.is_dir():
                stale.append(entry.name)
            elif os.path.lexists(entry / "result.json") and (
                    step is None or not self.store.belongs(step, self.store.read(step))):
                stale.append(entry.name)
        if not stale:
            return
        extra = [f for f in ("manifest.json", "report.html") if (self.out_dir / f).is_file()]
        target, failed = move_to_stale(self.out_dir, stale + extra)
        moved = [n for n in stale if n not in failed]
        if moved:
            self.echo(f"moved {len(moved)} result folder(s) of an earlier run with another configuration to {target}")
            logger.warning("moved %s (another configuration's results) to %s", ", ".join(moved), target)
        if failed:
            logger.warning("could not move %s to %s; a step that needs the place will fail", ", ".join(failed),
                           target)

    def _default_output(self) -> Path:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path("results") / f"{self.source.name}-{stamp}"
        out, i = base, 2
        while out.exists():
            out, i = base.with_name(f"{base.name}-{i}"), i + 1
        return out

    def _attach_log(self) -> None:
        handler = logging.FileHandler(self.out_dir / "run.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        root = logging.getLogger("mamba_interp")
        root.addHandler(handler)
        self._log_level = root.level
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        self._log_handler = handler

    def close(self) -> None:
        """Detach the log file, stop a Ray executor and release the output folder (the runner stays usable for
        reading results)."""
        if self._executor is not None:
            self._executor.close()
            self._executor = None
        if self._log_handler is not None:
            root = logging.getLogger("mamba_interp")
            root.removeHandler(self._log_handler)
            root.setLevel(self._log_level)
            self._log_handler.close()
            self._log_handler = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- manifest and results ---------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        src = self.source
        return {
            "format": MANIFEST_FORMAT,
            "status": self._status,
            "created_at": self._manifest_created,
            "updated_at": now(),
            "command": self.argv,
            "config": self.config.to_dict(),
            "seed": self.config.seed,
            **self._environment,
            "device": env.device_info(self.device),
            "dtype": self.config.dtype,
            "model": {**src.describe(), "fingerprint": self.fingerprint},
            "layers": list(self.layers),
            "memory_plan": self.plan.to_dict() if self.plan is not None else None,
            "steps": [r.to_json() | {"result_key": self.keys.key(r.step)} for r in self.records.values()],
        }

    def write_manifest(self) -> None:
        atomic_write_json(self.out_dir / "manifest.json", self.manifest())

    def _write_result(self, step: Step, status: str, started: str, duration: float, result: StepResult | None,
                      ctx: StepContext | None, fallbacks: list[dict], error: dict | None = None,
                      reason: str | None = None) -> None:
        self.store.write(step, status, started, duration, result, ctx, fallbacks, self.device, error=error,
                         reason=reason, peak_rss_mb=self.records[step.number].peak_rss_mb,
                         cpu_s=self.records[step.number].cpu_s)

    # ---- execution ---------------------------------------------------------------------------
    def run(self, steps: Iterable[int] | None = None) -> RunSummary:
        """Run the configured steps (or ``steps``, with their requirements); write the report; return a summary."""
        if self.dry_run:
            raise RuntimeError("this Runner was made with dry_run=True: it only plans (see .plan)")
        self.prepare()
        selected = list(self.selected) if steps is None else [get_step(n).number for n in steps]
        planned = with_requirements(selected)
        for n in planned:
            self.records.setdefault(n, StepRecord(get_step(n)))
        self._status = "running"
        self.write_manifest()
        try:
            for n in planned:
                self._run_one(get_step(n), reuse_ok=self.config.resume or n not in selected)
        except KeyboardInterrupt:
            self._status = "interrupted"
            self.write_manifest()
            self._write_report()
            raise
        except BaseException:
            self._status = "failed"  # an error of the runner itself, outside any step: say so, not "running"
            self.write_manifest()
            raise
        self.refresh_status()
        report = self._write_report()
        return RunSummary(self.out_dir, report, dict(self.records))

    def refresh_status(self) -> None:
        """Set the run status from the steps' records and rewrite the manifest."""
        failed = any(r.status == "failed" for r in self.records.values())
        self._status = "completed_with_failures" if failed else "completed"
        self.write_manifest()

    def _write_report(self) -> Path | None:
        from mamba_interp.pipeline.report import write_report

        try:
            return write_report(self.out_dir)
        except Exception:  # a broken report must not hide the results already on disk
            logger.exception("writing report.html failed")
            self.echo("warning: report.html could not be written (see run.log)")
            return None

    def _run_one(self, step: Step, reuse_ok: bool) -> None:
        record = self.records[step.number]
        blocked = [r for r in step.requires if self.records.get(r) and self.records[r].status in ("failed", "skipped")]
        if blocked:
            dep = self.records[blocked[0]]
            reason = f"requires {dep.step.label}, which {'failed' if dep.status == 'failed' else 'was skipped'}"
            self._record_skip(step, reason)
            return
        if reuse_ok:
            previous = self.store.matching(step)
            if previous is not None:
                self.results[step.number] = StepResult(previous.get("metrics", {}), previous.get("reading", ""),
                                                       previous.get("artifacts", []))
                record.status, record.resumed = "completed", True
                record.duration_s = previous.get("duration_s")
                self.echo(f"step {step.number:>2} {step.name:<14} resumed (result.json matches the config)")
                logger.info("%s: reusing the matching result.json", step.label)
                self.write_manifest()
                return
        self._execute(step)

    def _ensure_inputs(self, step: Step) -> None:
        """Make the in-memory data of every required step, transitively, available (loader, or re-run)."""
        for r in with_requirements(step.requires):
            if r in self.data:
                continue
            req = get_step(r)
            if req.load is not None and self.store.matching(req) is not None:
                ctx = self._context(req, self.device, self.config.batch_size)
                logger.info("%s: loading the data of %s from its folder", step.label, req.label)
                try:
                    self.data[r] = req.load(ctx)
                    continue
                except Exception as exc:  # a missing or unreadable file: recompute instead
                    logger.warning("%s: loading %s failed (%s); re-running it", step.label, req.label, exc)
            if r not in self.data:
                logger.info("%s: re-running %s to rebuild its in-memory data", step.label, req.label)
                self._execute(req)
                if self.records[r].status != "completed":
                    raise RuntimeError(f"{req.label} could not be re-run ({self.records[r].status})")

    def _context(self, step: Step, device: torch.device, batch_size: int) -> StepContext:
        seed = env.step_seed(self.config.seed, step.number)
        return StepContext(
            step=step, config=ConfigView(self.config, step), model=self.source.model, device=device, dtype=self.dtype,
            seed=seed, _batch_size=batch_size, out_dir=self.out_dir / step.folder_name, source=self.source,
            _layers=self.layers,
            results=self.results, log=logging.getLogger(f"mamba_interp.pipeline.{step.folder_name}"),
            options=self.options.get(step.number), _data=self.data,
            _executor=self._ray_executor if self.config.executor == "ray" else None,
        )

    def _ray_executor(self) -> Any:
        """The run's Ray executor, started on first use (one actor per device, each with the model)."""
        if self._executor is None:
            from mamba_interp.pipeline.executor import make_executor

            self._executor = make_executor("ray", self.source.model, self.device, address=self.config.ray_address)
            logger.info("Ray executor: %d actor(s)", self._executor.devices)
        return self._executor

    def _move_model(self, device: torch.device) -> None:
        self.source.model.to(device)

    def _fresh_folder(self, step: Step) -> None:
        folder = self.out_dir / step.folder_name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)

    def _execute(self, step: Step) -> None:
        record = self.records.setdefault(step.number, StepRecord(step))
        record.status, record.resumed, record.reason = "running", False, None
        self.write_manifest()
        started, t0 = now(), time.perf_counter()
        self._cpu0 = time.process_time()
        self._peak_reset = reset_peak_rss()
        ctx: StepContext | None = None
        fallback = OOMFallback(self.device, self.config.batch_size)
        try:
            self._fresh_folder(step)
            self._ensure_inputs(step)
            while True:
                env.seed_everything(env.step_seed(self.config.seed, step.number))
                ctx = self._context(step, fallback.device, fallback.batch_size)
                try:
                    result = step.fn(ctx)
                    break
                except Exception as exc:
                    if not fallback.recoverable(exc):
                        raise
                    msg = first_line(exc)[:200] or type(exc).__name__
                action = fallback.advance(msg)  # outside the except block: see OOMFallback.advance
                if action["action"] == "cpu":
                    self._move_model(fallback.device)
                logger.warning("%s: out of memory (%s); retrying with batch %d on %s", step.label, msg,
                               fallback.batch_size, fallback.device)
                self.echo(f"step {step.number:>2} {step.name:<14} out of memory; retrying with batch "
                          f"{fallback.batch_size} on {fallback.device}")
                self._fresh_folder(step)
            if not isinstance(result, StepResult):
                raise TypeError(f"{step.label} returned {type(result).__name__}; return a StepResult")
        except StepSkipped as exc:
            self._finish(step, "skipped", started, t0, ctx, fallback.taken, reason=str(exc))
            return
        except KeyboardInterrupt as exc:
            self._restore_device()
            record.status, record.reason = "interrupted", describe_interrupt(exc)
            logger.warning("%s %s; no result.json written (rerun with --resume)", step.label, record.reason)
            raise
        except Exception as exc:
            tb = traceback.format_exc()
            logger.error("%s failed:\n%s", step.label, tb)
            error = {"type": type(exc).__name__, "message": str(exc), "traceback": tb}
            self._finish(step, "failed", started, t0, ctx, fallback.taken, error=error,
                         reason=f"{type(exc).__name__}: {first_line(exc)}")
            return
        self._finish(step, "completed", started, t0, ctx, fallback.taken, result=result)

    def _finish(self, step: Step, status: str, started: str, t0: float, ctx: StepContext | None,
                fallbacks: list[dict], result: StepResult | None = None, error: dict | None = None,
                reason: str | None = None) -> None:
        """Record the end of a step: ``result.json`` (a failure to write it fails the step), record, manifest."""
        self._restore_device()
        duration = time.perf_counter() - t0
        peak = peak_rss() if getattr(self, "_peak_reset", False) else None
        self._peak_reset = False
        record = self.records[step.number]
        record.peak_rss_mb = None if peak is None else round(peak / 2**20, 1)
        record.cpu_s = round(time.process_time() - self._cpu0, 2) if self._cpu0 is not None else None
        self._cpu0 = None
        try:
            self._write_result(step, status, started, duration, result, ctx, fallbacks, error=error,
                               reason=None if status == "failed" else reason)
        except OSError as exc:
            logger.error("%s: result.json could not be written: %s", step.label, exc)
            if status == "completed":
                status, result = "failed", None
                reason = f"result.json could not be written ({type(exc).__name__}: {first_line(exc)})"
            else:
                reason = f"{reason}; its result.json could not be written ({type(exc).__name__})"
        record = self.records[step.number]
        record.status, record.duration_s, record.resumed = status, round(duration, 3), False
        record.reason = None if status == "completed" else reason
        if result is not None:
            self.results[step.number] = result
            self.data[step.number] = result.data
            note = f" [{len(fallbacks)} OOM fallback(s)]" if fallbacks else ""
            peak_note = f", peak RSS {record.peak_rss_mb:.0f} MB" if record.peak_rss_mb is not None else ""
            self.echo(f"step {step.number:>2} {step.name:<14} completed in {duration:6.1f} s{peak_note}{note}")
            logger.info("%s completed in %.2f s", step.label, duration)
        elif status == "skipped":
            self.echo(f"step {step.number:>2} {step.name:<14} skipped: {reason}")
            logger.info("%s skipped: %s", step.label, reason)
        else:
            self.echo(f"step {step.number:>2} {step.name:<14} FAILED: {reason} (traceback in run.log)")
        self.write_manifest()

    def _restore_device(self) -> None:
        if next(self.source.model.parameters()).device != self.device:
            self._move_model(self.device)

    def _record_skip(self, step: Step, reason: str) -> None:
        try:
            self._fresh_folder(step)
        except OSError as exc:  # the result.json write below fails too and says so
            logger.error("%s: its folder could not be prepared: %s", step.label, exc)
        self._finish(step, "skipped", now(), time.perf_counter(), None, [], reason=reason)


def print_line(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
