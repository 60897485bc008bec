"""The analysis pipeline: a registry of numbered steps, a runner, per-step outputs and an HTML report.

Running
-------
``mamba-interp run`` / ``python mamba_mechanistic_analysis.py`` (see ``mamba_interp/cli.py``), or from Python::

    from mamba_interp.pipeline import RunConfig, Runner
    summary = Runner(RunConfig(model="induction-mamba1", steps="0-2", output="results/demo")).run()
    summary.report   # Path of report.html

or through ``mamba_interp.experimental_framework.MambaMechanisticAnalyzer`` (the same runner).

Outputs (docs/outputs.md): ``OUT/manifest.json``, ``OUT/run.log``, ``OUT/step_NN_<name>/result.json`` (+ figures and
files), ``OUT/report.html``; ``OUT/run.lock`` while a run holds the folder, ``OUT/stale/<timestamp>/`` for an
earlier configuration's results. See ``runner.py`` for the guarantees (atomic results, resume, one run per
folder, failures, interruption, OOM).

Writing a step
--------------
A step is one function registered with :func:`register_step`, in a module of ``mamba_interp/pipeline/steps/``
(every module there is imported automatically; name it ``sNN_<name>.py``). Minimal example::

    # mamba_interp/pipeline/steps/s07_ssm_dynamics.py
    from dataclasses import dataclass

    from mamba_interp.pipeline import StepContext, StepResult, StepSkipped, register_step

    @dataclass(frozen=True)
    class Options:                      # optional; filled from config.step_options["ssm_dynamics"]
        max_lag: int = 32
        def __post_init__(self):
            if self.max_lag < 1:
                raise ValueError("max_lag must be >= 1")

    @register_step(7, "ssm_dynamics", requires=(1, 2), title="Δ selectivity and decay timescales",
                   options=Options)
    def run(ctx: StepContext) -> StepResult:
        batch = ctx.data(1)["batch"]                 # TaskBatch: tokens, targets, metadata (ground truth)
        acts = ctx.data(2)["activations"]            # ActivationSet: acts.tokens("dt", layer) -> [N, k]
        values = []
        for layer in ctx.progress(ctx.layers, desc="layers"):   # a progress bar labelled with the step
            dt = acts.tokens("dt", layer)
            values.append(float(dt.std(0).mean()))
        if ctx.config.figures:                       # --no-figures skips drawing
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(layout="constrained")
            ax.plot(ctx.layers, values)
            ctx.save_figure(fig, "selectivity")      # -> OUT/step_07_ssm_dynamics/selectivity.png (listed)
        ctx.log.info("max_lag=%d", ctx.options.max_lag)
        return StepResult(
            metrics={"selectivity": values},         # JSON-able; summaries, not big arrays
            reading=f"Δ varies most in layer {ctx.layers[values.index(max(values))]}.",
            data={"selectivity": values},            # in memory, for later steps of the same run
        )

That is all: ``mamba-interp run --steps 7`` now runs steps 0, 1, 2 (or reuses their results on disk) and 7,
``--list-steps`` lists it, and the report shows its section.

The contract, in detail:

* ``register_step(number, name, requires=(...), title=..., load=None, options=None, version=1, default=True,
  reads=None)``.
  ``number`` keeps the methodology's numbering (docs/architecture.md); ``name`` is lower_snake_case and names the folder
  ``step_NN_<name>``. ``requires`` lists the steps whose in-memory data the step reads; they run first (or are
  reused from disk when not selected / on ``--resume``). Requirements are transitive; 1 requires 0.
* ``ctx`` (:class:`StepContext`): ``model`` (a ``HookedMamba`` on ``ctx.device``, eval mode), ``config``
  (:class:`RunConfig`: the fields of ``reads``), ``options`` (your options dataclass or None), ``device``,
  ``dtype``, ``seed`` (this step's seed; torch/numpy/random are already seeded with it), ``batch_size`` (use it
  for forward passes: the out-of-memory fallback lowers it), ``layers`` (resolved layer indices), ``out_dir``
  (the step's empty folder), ``source`` (the model's origin: ``source.task``, ``source.task_params``,
  ``source.card``, ``source.tokenizer()``),
  ``results[n]`` (earlier :class:`StepResult`), ``data(n)`` (earlier steps' in-memory data), ``metrics(n)``,
  ``progress(iterable, total=, desc=)``, ``log`` (to ``OUT/run.log``), ``save_figure(fig, name)``,
  ``save_tensors(name, dict)``, ``save_json(name, obj)``, ``path(name)``.
* Independent units of work (an SAE per (layer, hook), a probe per (layer, hook, variable), a patching sweep per
  site, a decomposition per layer) go through ``ctx.executor.map(fn, units, desc=...)``: ``fn(worker, unit)`` is a
  module-level function (``worker.model``, ``worker.device``), each unit carries its data and its own seed, and the
  results come back in the order of the units, identical under ``--executor local`` and ``--executor ray``
  (``pipeline/executor.py``; step 3's ``train_unit`` is the example).
* Return a :class:`StepResult` (``metrics``, ``reading``, ``artifacts``, ``data``). Raise :class:`StepSkipped`
  ("needs a Mamba-2 model") when the step does not apply; any other exception marks it failed (recorded with the
  traceback) and steps requiring it are skipped, while the rest of the run continues.
* In-memory data of earlier steps: step 1 gives ``batch`` (the primary ``TaskBatch``), ``sets``, ``task``,
  ``heldout``, ``kind`` (``"task"`` or ``"lm"``), ``primary``; step 2 gives ``activations``
  (:class:`~mamba_interp.pipeline.activation_stats.ActivationSet` over step 1's ``batch``: ``acts[(hook, layer)]``
  [b, l, k], ``acts.tokens(hook, layer)`` [N, k] over real tokens, ``acts.coords()`` [N, 2] their (sequence,
  position), ``acts.mask`` [b, l]) and ``dataset``.
* ``load(ctx) -> dict``: rebuild the step's ``data`` from its folder when a resumed run skips it and a later step
  needs the data (``ctx.out_dir`` is the step's folder). Without ``load``, the step is re-run in that case.
* Keep it deterministic (use ``ctx.seed``); two runs with the same seed must give identical ``metrics``.
  Keep timings out of ``metrics`` (the runner records ``duration_s``).
* ``version``: bump it when the step's outputs change so ``--resume`` recomputes old results.
* The resume key (``resume_key.py``): ``--resume`` reuses a step's ``result.json`` only when it was computed for
  the same key, a hash of the config fields the step reads, its ``version`` and options, the model (weights
  fingerprint; task, task parameters, card and tokenizer files of its source), and the keys of the steps it
  ``requires`` (so their options and fields count, transitively). ``seed``, ``dtype`` and ``scan_impl`` are in
  every key. ``reads`` names the other result-relevant ``RunConfig`` fields the step reads, through ``ctx.config``
  or as ``ctx.layers`` / ``ctx.batch_size``; the default None means all of them (always safe: any change
  recomputes the step). Narrow it to what the step reads, e.g. ``reads=("samples", "figures")``, so changes of
  other fields keep its result; reading an undeclared field then raises ``UndeclaredRead``, so a narrowed set
  cannot go stale unnoticed. Read options as ``ctx.options``, never ``ctx.config.step_options``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# imported on first use: the CLI reads ``pipeline.config`` before torch is loaded
_EXPORTS = {
    "RunConfig": "config", "UsageError": "config", "build_config": "config", "parse_layers": "config",
    "parse_steps": "config", "StepContext": "context", "StepResult": "context", "Step": "registry",
    "StepSkipped": "registry", "all_steps": "registry", "get_step": "registry", "register_step": "registry",
    "build_report": "report", "write_report": "report", "Runner": "runner", "RunSummary": "runner",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from mamba_interp.pipeline.config import RunConfig, UsageError, build_config, parse_layers, parse_steps
    from mamba_interp.pipeline.context import StepContext, StepResult
    from mamba_interp.pipeline.registry import Step, StepSkipped, all_steps, get_step, register_step
    from mamba_interp.pipeline.report import build_report, write_report
    from mamba_interp.pipeline.runner import Runner, RunSummary


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
