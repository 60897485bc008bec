"""The analysis pipeline: a registry of numbered steps, a runner, per-step outputs and an HTML report.

Running
-------
``mamba-interp run`` / ``python mamba_mechanistic_analysis.py`` (see ``mamba_interp/cli.py``), or from Python::

    from mamba_interp.pipeline import RunConfig, Runner
    summary = Runner(RunConfig(model="induction-mamba1", steps="0-2", output="results/demo")).run()
    summary.report   # Path of report.html

or through ``mamba_interp.experimental_framework.MambaMechanisticAnalyzer`` (the same runner).

Outputs (DESIGN.md §4): ``OUT/manifest.json``, ``OUT/run.log``, ``OUT/step_NN_<name>/result.json`` (+ figures and
files), ``OUT/report.html``. See ``runner.py`` for the guarantees (atomic results, resume, failures, OOM).

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

* ``register_step(number, name, requires=(...), title=..., load=None, options=None, version=1)``.
  ``number`` keeps the methodology's numbering (DESIGN.md §5); ``name`` is lower_snake_case and names the folder
  ``step_NN_<name>``. ``requires`` lists the steps whose in-memory data the step reads; they run first (or are
  reused from disk when not selected / on ``--resume``). Requirements are transitive; 1 requires 0.
* ``ctx`` (:class:`StepContext`): ``model`` (a ``HookedMamba`` on ``ctx.device``, eval mode), ``config``
  (:class:`RunConfig`), ``options`` (your options dataclass or None), ``device``, ``dtype``, ``seed`` (this step's
  seed; torch/numpy/random are already seeded with it), ``batch_size`` (use it for forward passes: the
  out-of-memory fallback lowers it), ``layers`` (resolved layer indices), ``out_dir`` (the step's empty folder),
  ``source`` (the model's origin: ``source.task``, ``source.task_params``, ``source.card``, ``source.tokenizer()``),
  ``results[n]`` (earlier :class:`StepResult`), ``data(n)`` (earlier steps' in-memory data), ``metrics(n)``,
  ``progress(iterable, total=, desc=)``, ``log`` (to ``OUT/run.log``), ``save_figure(fig, name)``,
  ``save_tensors(name, dict)``, ``save_json(name, obj)``, ``path(name)``.
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
"""

from mamba_interp.pipeline.config import RunConfig, UsageError, build_config, parse_layers, parse_steps
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import Step, StepSkipped, all_steps, get_step, register_step
from mamba_interp.pipeline.report import build_report, write_report
from mamba_interp.pipeline.runner import Runner, RunSummary

__all__ = [
    "RunConfig", "RunSummary", "Runner", "Step", "StepContext", "StepResult", "StepSkipped", "UsageError",
    "all_steps", "build_config", "build_report", "get_step", "parse_layers", "parse_steps", "register_step",
    "write_report",
]
