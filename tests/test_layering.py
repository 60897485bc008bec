"""The import rules of docs/architecture.md §2, checked on the source with ``ast`` (no module is imported).

Every ``import`` / ``from ... import`` of a ``mamba_interp`` module is an edge between two *units*: a subpackage
or top-level module of ``mamba_interp`` (``models/ops`` is a unit of its own). Imports inside functions and under
``if TYPE_CHECKING:`` count too, since they are dependencies all the same; only the start-up rule (the last test)
looks at what runs at import time. Names built at run time (``importlib.import_module(f"...")``, the registry's
step discovery) are not visible to this check.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mamba_interp"
ROOT = "mamba_interp"

# The foundation: each unit may import only these units (besides itself).
FOUNDATION: dict[str, set[str]] = {
    "utils": set(),
    "stats": set(),
    "models.ops": set(),
    "models": {"models.ops", "utils"},
    "sparse_autoencoder": {"utils"},
    "tasks": {"models", "utils", ROOT},  # ROOT: tasks/training.py records mamba_interp.__version__
    "zoo": {"tasks"},  # mamba_interp/zoo.py, an alias of tasks/zoo.py
    ROOT: {"models"},  # the package's lazily resolved names
}
# Foundation edges allowed only inside a function body (imported when called, never at import time).
CALL_TIME_ONLY = {("models", "sparse_autoencoder")}  # HookedMamba.run_with_saes -> sparse_autoencoder.splice
# The top of the stack: they may import anything, and nothing in the package imports them.
TOP = {"cli", "experimental_framework"}
PIPELINE = "pipeline"
# The pipeline modules a method module may use (data collection and task variables, no step machinery) ...
DATA_HELPERS = {"activation_stats", "datasets", "task_variables"}
# ... and the machinery those helpers never import.
STEP_MACHINERY = {"registry", "runner", "context", "results", "resume_key", "output_folder", "fallback", "report",
                  "steps"}
HEAVY = {"torch", "numpy", "scipy", "sklearn", "transformers", "matplotlib", "safetensors", "pandas"}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported mamba_interp module, dotted
    line: int
    in_function: bool
    type_only: bool

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8"), filename=str(p)) for p in PACKAGE.rglob("*.py")}


def unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return ROOT
    if parts[1] == "models" and len(parts) > 2 and parts[2] == "ops":
        return "models.ops"
    return parts[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.AST, known: dict[str, ast.Module]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        # ``from mamba_interp.pipeline import interrupts`` imports the submodule when there is one
        return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
    if (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


@lru_cache(maxsize=None)
def edges() -> tuple[Edge, ...]:
    known = modules()
    out: list[Edge] = []

    def visit(node: ast.AST, source: str, in_function: bool, type_only: bool) -> None:
        for target in _targets(node, known):
            if target == ROOT or target.startswith(ROOT + "."):
                out.append(Edge(source, target, node.lineno, in_function, type_only))
        for child in ast.iter_child_nodes(node):
            visit(child, source, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                  type_only or (isinstance(node, ast.If) and _is_type_checking(node)))

    for name, tree in known.items():
        visit(tree, name, False, False)
    return tuple(out)


def cross_unit_edges() -> list[Edge]:
    return [e for e in edges() if unit(e.source) != unit(e.target)]


def test_the_check_sees_the_package():
    found = {unit(m) for m in modules()}
    assert {"models", "models.ops", "tasks", "pipeline", "cli"} <= found
    assert any(unit(e.source) == "pipeline" and unit(e.target) == "models" for e in edges())
    # imports inside functions are seen, and the call-time edges of the foundation are seen as such
    assert any(e.in_function for e in edges()) and not all(e.in_function for e in edges())
    assert all(e.in_function for e in edges() if (unit(e.source), unit(e.target)) in CALL_TIME_ONLY)
    # and the start-up check would see a heavy import: models/ imports torch at import time
    assert _heavy_imports_at_import_time(f"{ROOT}.models.hooks")


def test_imports_are_absolute():
    relative = [f"{name}:{node.lineno}" for name, tree in modules().items() for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, f"relative imports hide edges from this check: {relative}"


@pytest.mark.parametrize("source", sorted(FOUNDATION))
def test_foundation_imports_only_what_is_below_it(source):
    bad = []
    for e in cross_unit_edges():
        if unit(e.source) != source:
            continue
        target = unit(e.target)
        if target in FOUNDATION[source]:
            continue
        if (source, target) in CALL_TIME_ONLY and e.in_function:
            continue
        bad.append(e.where)
    assert not bad, f"{source} may import only {sorted(FOUNDATION[source])} (docs/architecture.md §2): {bad}"


def test_method_modules_use_the_foundation_and_only_the_pipelines_data_helpers():
    bad = []
    for e in cross_unit_edges():
        source, target = unit(e.source), unit(e.target)
        if source in FOUNDATION or source in TOP or source == PIPELINE:
            continue
        if target == PIPELINE:
            parts = e.target.split(".")
            if len(parts) < 3 or parts[2] not in DATA_HELPERS:
                bad.append(e.where)
        elif target in TOP:
            bad.append(e.where)
    assert not bad, (f"a method module may import from the pipeline only {sorted(DATA_HELPERS)} "
                     f"(docs/architecture.md §2): {bad}")


def test_data_helpers_never_import_the_step_machinery():
    bad = [e.where for e in edges()
           if e.source.split(".")[1:2] == [PIPELINE] and e.source.split(".")[2:3] and
           e.source.split(".")[2] in DATA_HELPERS and e.target.split(".")[1:2] == [PIPELINE]
           and e.target.split(".")[2:3] and e.target.split(".")[2] in STEP_MACHINERY]
    assert not bad, bad


def test_nothing_imports_the_top_of_the_stack():
    bad = [e.where for e in cross_unit_edges() if unit(e.target) in TOP and unit(e.source) not in TOP]
    assert not bad, f"{sorted(TOP)} sit on top of the pipeline; nothing in the package may import them: {bad}"


def test_only_the_registry_and_steps_import_step_modules_by_name():
    """Steps are found by ``registry.discover_steps``; the runner never names one (a step may reuse another's
    helpers, and so may the step-support modules of the pipeline)."""
    machinery = {f"{ROOT}.{PIPELINE}.{m}" for m in STEP_MACHINERY - {"steps"}}
    bad = [e.where for e in edges() if e.target.startswith(f"{ROOT}.{PIPELINE}.steps.") and e.source in machinery]
    assert not bad, bad


def _import_time_closure(start: str) -> set[str]:
    known = modules()
    by_source: dict[str, set[str]] = {}
    for e in edges():
        if not e.in_function and not e.type_only:
            by_source.setdefault(e.source, set()).add(e.target)
    seen: set[str] = set()
    stack = [start]
    while stack:
        name = stack.pop()
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix not in seen:
                seen.add(prefix)
                stack.extend(by_source.get(prefix, ()))
    return seen


def _heavy_imports_at_import_time(name: str) -> list[str]:
    found = []

    def visit(node: ast.AST, skip: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip = True
        if not skip and isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found.extend(f"{name}:{node.lineno} imports {m}" for m in mods if m.split(".")[0] in HEAVY)
        for child in ast.iter_child_nodes(node):
            visit(child, skip)

    visit(modules()[name], False)
    return found


def test_the_cli_starts_without_heavy_imports():
    """The CLI installs its signal handlers before torch is imported, so Ctrl-C at any moment ends in one line
    (docs/outputs.md §7): what ``import mamba_interp.cli`` runs imports no torch, numpy, ..."""
    closure = _import_time_closure(f"{ROOT}.cli")
    assert f"{ROOT}.pipeline.interrupts" in closure
    heavy = [hit for name in sorted(closure) for hit in _heavy_imports_at_import_time(name)]
    assert not heavy, heavy
