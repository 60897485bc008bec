"""The step registry: every pipeline step is one function registered with its number, name and requirements.

See the package docstring (``mamba_interp/pipeline/__init__.py``) for the step API and a worked example.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mamba_interp.pipeline.config import ALWAYS_READ, RunConfig, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from mamba_interp.pipeline.context import StepContext, StepResult

StepFn = Callable[["StepContext"], "StepResult"]
LoadFn = Callable[["StepContext"], dict]


class StepSkipped(Exception):
    """Raise inside a step when it does not apply (e.g. a grokking step on a model without a training log).

    The step is recorded with status ``skipped`` and the message as its reason; dependents are skipped too.
    """


@dataclass(frozen=True)
class Step:
    number: int
    name: str
    fn: StepFn
    requires: tuple[int, ...] = ()
    """Steps whose results (and in-memory data) this step reads; they run first, or are loaded on resume."""
    title: str = ""
    load: LoadFn | None = None
    """Rebuild this step's in-memory ``data`` from its folder when a resumed run skips it but a later step
    needs the data. Without it such a step is re-run."""
    options: type | None = None
    """A (frozen) dataclass of this step's options, filled from ``config.step_options[name]``."""
    version: int = 1
    """Bump when the step's outputs change, so ``--resume`` recomputes old results."""
    default: bool = True
    """Part of the default run (no ``--steps``). Steps too slow for the default run's time budget set it False;
    they run when named with ``--steps`` (or required by a named step)."""
    reads: frozenset[str] | None = None
    """The result-relevant ``RunConfig`` fields the step reads (``ctx.config.<field>``, plus ``layers`` and
    ``batch_size`` through ``ctx``); None: all of them. Only these enter its resume key (with ``ALWAYS_READ``),
    and reading any other is an error, so a narrowed set cannot silently go stale."""

    @property
    def key_fields(self) -> tuple[str, ...]:
        """The config fields in this step's resume key, in ``RunConfig`` order."""
        declared = set(RunConfig.result_fields()) if self.reads is None else set(self.reads)
        return tuple(f for f in RunConfig.result_fields() if f in declared or f in ALWAYS_READ)

    @property
    def folder_name(self) -> str:
        return f"step_{self.number:02d}_{self.name}"

    @property
    def label(self) -> str:
        return f"step {self.number} ({self.name})"

    def make_options(self, raw: dict[str, Any] | None) -> Any:
        raw = dict(raw or {})
        if self.options is None:
            if raw:
                raise UsageError(f"{self.label} takes no options, got {sorted(raw)}; remove them from step_options")
            return None
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UsageError(
                f"unknown option {unknown[0]!r} for {self.label}; known options: {', '.join(sorted(known))}"
            )
        try:
            return self.options(**raw)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid option for {self.label}: {str(exc).splitlines()[0]}") from None


_REGISTRY: dict[int, Step] = {}
_DISCOVERED = False


def register_step(
    number: int,
    name: str,
    *,
    requires: tuple[int, ...] = (),
    title: str = "",
    load: LoadFn | None = None,
    options: type | None = None,
    version: int = 1,
    default: bool = True,
    reads: tuple[str, ...] | frozenset[str] | None = None,
) -> Callable[[StepFn], StepFn]:
    """Decorator registering ``fn(ctx) -> StepResult`` as pipeline step ``number``; returns ``fn`` unchanged."""
    if not isinstance(number, int) or number < 0:
        raise ValueError(f"step number {number!r} must be a non-negative integer")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"step name {name!r} must be lower_snake_case (it names the output folder)")
    if number in requires:
        raise ValueError(f"step {number} cannot require itself")
    if options is not None and not dataclasses.is_dataclass(options):
        raise ValueError(f"options of step {number} must be a dataclass type")
    if reads is not None:
        if isinstance(reads, str):
            raise ValueError(f"reads of step {number} must be a collection of field names, not the string {reads!r}")
        unknown = sorted(set(reads) - set(RunConfig.result_fields()))
        if unknown:
            raise ValueError(f"reads of step {number} names {unknown[0]!r}, which is not a result-relevant RunConfig "
                             f"field; choose from {', '.join(RunConfig.result_fields())}")
        reads = frozenset(reads)

    def decorator(fn: StepFn) -> StepFn:
        existing = _REGISTRY.get(number)
        if existing is not None and (existing.name != name or existing.fn.__qualname__ != fn.__qualname__):
            raise ValueError(f"step {number} is already registered as {existing.name!r}")
        for other in _REGISTRY.values():
            if other.name == name and other.number != number:
                raise ValueError(f"step name {name!r} is already used by step {other.number}")
        _REGISTRY[number] = Step(number, name, fn, tuple(sorted(set(requires))), title or name, load, options,
                                 version, default, reads)
        return fn

    return decorator


def unregister_step(number: int) -> None:
    """Remove a step (tests register temporary steps)."""
    _REGISTRY.pop(number, None)


def discover_steps() -> None:
    """Import every module of ``mamba_interp.pipeline.steps`` (each registers its steps) once."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    from mamba_interp.pipeline import steps as steps_pkg

    for info in sorted(pkgutil.iter_modules(steps_pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{steps_pkg.__name__}.{info.name}")


def all_steps() -> dict[int, Step]:
    """Registered steps by number, in order."""
    discover_steps()
    return dict(sorted(_REGISTRY.items()))


def get_step(key: int | str) -> Step:
    """A step by number or name; unknown keys raise :class:`UsageError` listing the implemented ones."""
    steps = all_steps()
    if isinstance(key, str) and key.isdigit():
        key = int(key)
    if isinstance(key, int):
        if key in steps:
            return steps[key]
    else:
        for step in steps.values():
            if step.name == key:
                return step
    raise UsageError(f"step {key!r} is not implemented; implemented steps: {implemented_summary()}")


def default_steps() -> list[int]:
    """The steps of a run with no ``--steps``: every registered step whose ``default`` is True."""
    return [n for n, s in all_steps().items() if s.default]


def implemented_summary() -> str:
    return ", ".join(f"{s.number} {s.name}" for s in all_steps().values())


def with_requirements(numbers: tuple[int, ...] | list[int]) -> list[int]:
    """``numbers`` plus everything they require, transitively, in run order: by number, except that a step runs
    after every step it requires (step 5 reads the evidence of steps 7 and 8)."""
    steps = all_steps()
    out: set[int] = set()
    stack = list(numbers)
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        for r in get_step(n).requires:
            if r not in steps:
                raise UsageError(f"step {n} requires step {r}, which is not implemented")
            stack.append(r)
    return _run_order(out)


def _run_order(numbers: set[int]) -> list[int]:
    """Topological order of ``numbers`` by ``requires``, the smallest ready number first."""
    import heapq

    waiting = {n: {r for r in get_step(n).requires if r in numbers} for n in numbers}
    ready = [n for n, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        n = heapq.heappop(ready)
        order.append(n)
        for m, deps in waiting.items():
            if n in deps:
                deps.discard(n)
                if not deps:
                    heapq.heappush(ready, m)
    if len(order) != len(numbers):
        raise UsageError(f"steps {sorted(set(numbers) - set(order))} require each other in a cycle")
    return order
