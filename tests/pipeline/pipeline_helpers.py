"""Helpers shared by the pipeline tests (imported as ``pipeline_helpers``)."""

from __future__ import annotations

import json
from pathlib import Path


def small_config(model: Path | str, out: Path, **kw):
    from mamba_interp.pipeline import RunConfig

    # figures off by default: drawing dominates the run time of these tiny models (one test draws them)
    base = dict(model=str(model), output=str(out), samples=12, batch_size=8, quiet=True, steps="0-2", figures=False)
    base.update(kw)
    return RunConfig(**base)


def run_pipeline(model: Path | str, out: Path, **kw):
    from mamba_interp.pipeline import Runner

    runner = Runner(small_config(model, out, **kw))
    try:
        return runner, runner.run()
    finally:
        runner.close()


def read_result(out: Path, folder: str) -> dict:
    return json.loads((out / folder / "result.json").read_text())


def load_step_data(model: Path | str, out: Path, number: int, **kw) -> dict:
    """A finished step's in-memory data as rebuilt by its ``load`` (what a resumed run gives later steps).

    The runner is prepared with the configuration recorded in ``out``'s manifest (plus ``kw``): preparing with
    another configuration would set the run's results aside as stale."""
    from mamba_interp.pipeline import Runner, RunConfig
    from mamba_interp.pipeline.registry import get_step

    recorded = json.loads((Path(out) / "manifest.json").read_text())["config"]
    cfg = RunConfig.from_dict({**recorded, "model": str(model), "output": str(out), "steps": str(number),
                               "resume": True, **kw})
    runner = Runner(cfg)
    try:
        runner.prepare()
        step = get_step(number)
        return step.load(runner._context(step, runner.device, runner.config.batch_size))
    finally:
        runner.close()
