"""The Python face of the pipeline: ``MambaMechanisticAnalyzer`` runs the same steps as the CLI, one at a time.

In the methodology's words (a checkout also has the top-level ``experimental_framework.py``, so
``from experimental_framework import ...`` works from the repository root)::

    from mamba_interp.experimental_framework import ExperimentConfig, MambaMechanisticAnalyzer

    config = ExperimentConfig(model_name="induction-mamba1", output="results/nb")   # a zoo name, folder or hub id
    analyzer = MambaMechanisticAnalyzer(config)
    analyzer.setup()                          # load the model, choose the device, step 0 (instrumentation check)
    acts = analyzer.collect_activations(texts)            # language models; zoo models: collect_activations()
    features = analyzer.discover_interpretable_features() # step 3: SAEs and their latents vs task variables
    circuits = analyzer.select_candidate_circuits()       # step 5
    results = analyzer.test_circuit_causality()           # step 6
    analyzer.report()                         # write report.html

and step by step::

    tasks = analyzer.tasks()                  # step 1 -> StepResult; analyzer.data(1)["batch"] is the TaskBatch
    analyzer.activations()                    # step 2 -> StepResult with baseline statistics
    analyzer.data(2)["activations"].tokens("x", 1)          # [N, e] activations of layer 1's SSM input
    custom = analyzer.collect_activations(texts=["The cat sat on the mat."], layers=[0], hooks=["resid_post"])
    analyzer.run_step("sae")                  # any registered step, by number or name (requirements first)

``ExperimentConfig`` is :class:`mamba_interp.pipeline.RunConfig` (same fields, same validation) that also takes
``model_name=`` for ``model``. Every step the registry knows is also a method named after it (``analyzer.sae()``,
``analyzer.probes()``, ...), so methods appear as steps are added; the methodology's names call their steps by
name and say which step is missing when a checkout does not have it. The CLI (``mamba-interp run``) drives the
same :class:`~mamba_interp.pipeline.Runner`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mamba_interp.pipeline.activation_stats import ActivationSet, collect_activations
from mamba_interp.pipeline.config import RunConfig, UsageError
from mamba_interp.pipeline.context import StepResult
from mamba_interp.pipeline.registry import all_steps, get_step, implemented_summary
from mamba_interp.pipeline.runner import Runner, RunSummary

__all__ = ["ExperimentConfig", "MambaMechanisticAnalyzer"]


class ExperimentConfig(RunConfig):
    """The analyzer's configuration: the pipeline's :class:`RunConfig` (model, layers, samples, output, ...),
    which also accepts the methodology's ``model_name=`` for ``model``."""

    def __init__(self, *args: Any, model_name: str | None = None, **kwargs: Any) -> None:
        if model_name is not None:
            if kwargs.get("model", model_name) != model_name or args:
                raise UsageError(f"pass the model once: model_name={model_name!r} or model=..., not both")
            kwargs["model"] = model_name
        super().__init__(*args, **kwargs)

    @property
    def model_name(self) -> str:
        return self.model


class MambaMechanisticAnalyzer:
    """Runs pipeline steps on one model from Python, keeping every step's in-memory results.

    ``verbose=True`` prints the one-line status of each step, as the CLI does.
    """

    def __init__(self, config: RunConfig | None = None, verbose: bool = False, **overrides: Any) -> None:
        if config is None:
            config = ExperimentConfig(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, RunConfig):
            raise TypeError(f"MambaMechanisticAnalyzer needs an ExperimentConfig, got {type(config).__name__}")
        self.config = config
        self.runner = Runner(config, echo=print if verbose else None)

    # ---- state ----------------------------------------------------------------------------------
    @property
    def model(self):
        self._require_setup()
        return self.runner.source.model

    @property
    def source(self):
        self._require_setup()
        return self.runner.source

    @property
    def device(self) -> torch.device:
        self._require_setup()
        return self.runner.device

    @property
    def out_dir(self) -> Path:
        self._require_setup()
        return self.runner.out_dir

    @property
    def layers(self) -> tuple[int, ...]:
        self._require_setup()
        return self.runner.layers

    @property
    def results(self) -> dict[int, StepResult]:
        return self.runner.results

    def data(self, step: int | str) -> dict[str, Any]:
        """In-memory data of a step that ran (or was loaded) in this session."""
        number = get_step(step).number
        if number not in self.runner.data:
            raise KeyError(f"step {number} has not run in this session; call run_step({number}) first")
        return self.runner.data[number]

    def _require_setup(self) -> None:
        if not self.runner.prepared:
            raise RuntimeError("call setup() first: it loads the model and prepares the output folder")

    # ---- steps ------------------------------------------------------------------------------------
    def setup(self) -> StepResult:
        """Validate the config, load the model, choose the device, create the output folder; run step 0."""
        self.runner.prepare()
        return self.run_step(0)

    def run_step(self, step: int | str, force: bool = False) -> StepResult:
        """Run one step (after the steps it requires, unless they already ran in this session).

        With ``config.resume`` a step whose ``result.json`` matches is reused; ``force=True`` recomputes it.
        Raises ``RuntimeError`` when the step fails or is skipped (the error is also in its result.json).
        """
        self.runner.prepare()
        target = get_step(step)
        if target.number in self.runner.results and not force:
            return self.runner.results[target.number]
        from mamba_interp.pipeline.registry import with_requirements

        for n in with_requirements([target.number]):
            if n == target.number:  # as in the CLI: the target is reused only with resume
                self._run_single(n, reuse_ok=self.config.resume and not force)
            elif n not in self.runner.results:  # a requirement is reused from disk when its result matches
                self._run_single(n, reuse_ok=True)
        return self.runner.results[target.number]

    def _run_single(self, number: int, reuse_ok: bool) -> None:
        from mamba_interp.pipeline.runner import StepRecord

        step = get_step(number)
        record = self.runner.records.setdefault(number, StepRecord(step))
        if number not in self.runner.options:
            self.runner.options[number] = step.make_options(self.config.step_options.get(step.name))
        self.runner._run_one(step, reuse_ok=reuse_ok)
        self.runner.refresh_status()
        if record.status != "completed":
            raise RuntimeError(f"{step.label} {record.status}: {record.reason or 'see run.log'}")

    def run(self, steps: Sequence[int | str] | None = None) -> RunSummary:
        """Run ``steps`` (default: the config's) exactly as the CLI does, and write the report."""
        numbers = None if steps is None else [get_step(s).number for s in steps]
        return self.runner.run(numbers)

    def report(self) -> Path | None:
        """Write ``report.html`` for what has run so far."""
        self._require_setup()
        self.runner.write_manifest()
        return self.runner._write_report()

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> MambaMechanisticAnalyzer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # named methods for the implemented steps (the others resolve through __getattr__)
    def tasks(self) -> StepResult:
        """Step 1: datasets (task batches with ground truth, or prompt sets) and the model's accuracy on them."""
        return self.run_step(1)

    def activations(self) -> StepResult:
        """Step 2: activations at the chosen layers/hooks and their baseline statistics."""
        return self.run_step(2)

    # the methodology's names for steps 3, 5 and 6
    def discover_interpretable_features(self, force: bool = False) -> StepResult:
        """Step 3 (sae): SAEs on the chosen hooks, their quality, and which latents track which task variables
        (``metrics["best_by_variable"]``; ``data(3)["saes"]`` holds the trained SAEs)."""
        return self._named_step("sae", 3, "discover_interpretable_features", force)

    def select_candidate_circuits(self, force: bool = False) -> StepResult:
        """Step 5 (circuits): candidate circuits from the earlier steps' evidence, with random controls."""
        return self._named_step("circuits", 5, "select_candidate_circuits", force)

    def test_circuit_causality(self, force: bool = False) -> StepResult:
        """Step 6 (causality): necessity (ablation) and sufficiency (patching) of the candidate circuits."""
        return self._named_step("causality", 6, "test_circuit_causality", force)

    def _named_step(self, name: str, number: int, method: str, force: bool) -> StepResult:
        if not any(step.name == name for step in all_steps().values()):
            raise NotImplementedError(
                f"{method}() runs step {number} ({name}), which this checkout does not implement yet; "
                f"implemented steps: {implemented_summary()}"
            )
        return self.run_step(name, force=force)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        for step in all_steps().values():
            if step.name == name:
                return lambda force=False: self.run_step(step.number, force=force)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r} (and no step is named so)")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | {s.name for s in all_steps().values()})

    # ---- activations on demand ---------------------------------------------------------------------------
    def collect_activations(
        self,
        texts: Sequence[str] | None = None,
        tokens: torch.Tensor | None = None,
        batch: Any = None,
        layers: Sequence[int] | None = None,
        hooks: Sequence[str] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ActivationSet:
        """Activations of the chosen hooks (short names, e.g. ``"resid_post"``, ``"dt"``, ``"state_norm"``).

        Input, in order of precedence: ``texts`` (tokenised with the model's tokenizer, left-padded; language
        models), ``tokens`` [b, l], ``batch`` (a ``TaskBatch``), else the primary dataset of step 1 (task batches
        for zoo models; run after ``setup()``; step 1 runs if needed). The first argument may also be the token
        ids or the ``TaskBatch`` itself. Same code as step 2.
        """
        self._require_setup()
        if isinstance(texts, torch.Tensor):
            texts, tokens = None, texts
        elif texts is not None and hasattr(texts, "tokens") and hasattr(texts, "targets"):
            texts, batch = None, texts
        layers = tuple(self.layers if layers is None else layers)
        hooks = tuple(self.config.hooks if hooks is None else hooks)
        n_layer = self.model.cfg.n_layer
        bad = [i for i in layers if not 0 <= i < n_layer]
        if bad:
            raise UsageError(f"layer {bad[0]} is out of range 0..{n_layer - 1}")
        from mamba_interp.pipeline.activation_stats import available_hooks

        allowed = available_hooks(self.model.cfg.arch)
        if any(h not in allowed for h in hooks):
            raise UsageError(f"hooks must come from {', '.join(allowed)}; got {list(hooks)}")
        if texts is not None:
            tokens, attention_mask = self._tokenize(texts)
        elif tokens is None:
            if batch is None:
                self.run_step(1)
                batch = self.data(1)["batch"]
            tokens, attention_mask = batch.tokens, batch.attention_mask
        if tokens.dim() == 1:
            tokens = tokens[None]
        return collect_activations(self.model, tokens, layers, hooks, self.config.batch_size,
                                   attention_mask=attention_mask)

    def _tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        tok = self.source.tokenizer()
        if tok is None:
            raise UsageError(
                f"texts need a tokenizer, but {self.source.tokenizer_error}; pass tokens= (token ids) instead, or "
                "use a model folder that holds its tokenizer files"
            )
        rows = [list(tok.encode(t, add_special_tokens=False)) for t in texts]
        if any(not r for r in rows):
            raise UsageError("a text encodes to no tokens; pass non-empty texts")
        width = max(len(r) for r in rows)
        pad = next((getattr(tok, a) for a in ("pad_token_id", "eos_token_id") if getattr(tok, a, None) is not None), 0)
        ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: the last position is always a real token
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids, mask
