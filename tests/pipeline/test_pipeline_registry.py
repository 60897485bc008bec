"""The step registry: registration rules, requirement closure, lookup errors, step options."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mamba_interp.pipeline import StepResult, register_step
from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.registry import all_steps, get_step, with_requirements



def test_builtin_steps_are_registered():
    steps = all_steps()
    assert [steps[n].name for n in (0, 1, 2)] == ["setup", "tasks", "activations"]
    assert steps[2].requires == (1,) and steps[1].requires == (0,)
    assert steps[2].folder_name == "step_02_activations"
    assert get_step("activations") is steps[2] and get_step("2") is steps[2]


def test_register_and_requirements(temp_steps):
    @register_step(80, "eighty", requires=(2,))
    def a(ctx):
        return StepResult()

    @register_step(81, "eighty_one", requires=(80, 0))
    def b(ctx):
        return StepResult()

    temp_steps += [80, 81]
    assert with_requirements([81]) == [0, 1, 2, 80, 81]
    assert get_step(81).title == "eighty_one"


def test_registration_errors(temp_steps):
    with pytest.raises(ValueError, match="already registered"):
        register_step(2, "other")(lambda ctx: StepResult())
    with pytest.raises(ValueError, match="already used by step 1"):
        register_step(82, "tasks")(lambda ctx: StepResult())
    with pytest.raises(ValueError, match="lower_snake_case"):
        register_step(83, "Bad Name")
    with pytest.raises(ValueError, match="require itself"):
        register_step(84, "selfish", requires=(84,))


def test_unknown_step_names_the_implemented_ones():
    with pytest.raises(UsageError, match=r"step 77 is not implemented; implemented steps: 0 setup, 1 tasks"):
        get_step(77)


def test_step_options(temp_steps):
    @dataclass(frozen=True)
    class Opts:
        width: int = 4

        def __post_init__(self):
            if self.width < 1:
                raise ValueError("width must be >= 1")

    register_step(85, "with_opts", options=Opts)(lambda ctx: StepResult())
    temp_steps.append(85)
    step = get_step(85)
    assert step.make_options(None) == Opts() and step.make_options({"width": 9}).width == 9
    with pytest.raises(UsageError, match="unknown option 'depth'.*width"):
        step.make_options({"depth": 2})
    with pytest.raises(UsageError, match="width must be >= 1"):
        step.make_options({"width": 0})
    with pytest.raises(UsageError, match="takes no options"):
        get_step(0).make_options({"x": 1})


def test_steps_left_out_of_the_default_run(temp_steps, tmp_path):
    from mamba_interp.cli import list_steps
    from mamba_interp.pipeline.registry import default_steps

    register_step(86, "slow_one", requires=(0,), default=False)(lambda ctx: StepResult())
    temp_steps.append(86)
    assert 86 not in default_steps() and 0 in default_steps()
    assert get_step(86).default is False
    assert "slow_one" in list_steps() and "not in the default run" in list_steps()


def test_a_step_runs_after_later_numbered_requirements(temp_steps):
    @register_step(90, "ninety", requires=(1, 92))
    def a(ctx):
        return StepResult()

    @register_step(92, "ninety_two", requires=(0,))
    def b(ctx):
        return StepResult()

    temp_steps += [90, 92]
    assert with_requirements([90]) == [0, 1, 92, 90]
    assert with_requirements([90, 2]) == [0, 1, 2, 92, 90]
