"""The run configuration of the pipeline: one frozen dataclass, read from YAML and overridden from the CLI.

Every field is validated in ``__post_init__``; a bad value raises :class:`UsageError` (a ``ValueError``) whose
one-line message names the problem and the fix, which the CLI prints with exit code 2. Values that need the model
to check (layer range, hook names for the architecture, step numbers) are checked by the runner before anything
is written.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
DTYPES = ("float32", "bfloat16", "float16")
SCAN_IMPLS = ("auto", "reference", "compiled", "loop", "parallel", "chunked", "kernel")  # models/ops/dispatch.py
DEFAULT_MODEL = "default"
"""Stands for the zoo's embedded default model (``zoo.DEFAULT``)."""

# Short hook names collected by step 2 (``models/cache.get_act_name`` spells them out per layer).
# ``state_norm`` is derived: the L2 norm of the SSM state per channel (Mamba-1) or per head (Mamba-2).
HOOK_CHOICES = (
    "resid_pre", "resid_post", "norm", "in_x", "in_z", "conv", "x", "dt_low", "dt", "B", "C", "y", "gate",
    "gated", "out", "state_norm",
)
DEFAULT_HOOKS = ("resid_post", "x", "dt", "B", "C", "y", "gate", "state_norm")

STORES = ("auto", "memory", "disk")  # pipeline/activation_store.py
EXECUTORS = ("local", "ray")  # pipeline/executor.py

# Fields that change where or how a run is shown, not what it computes: left out of every resume key.
NON_RESULT_FIELDS = ("output", "resume", "steps", "device", "quiet", "threads", "activation_store", "executor",
                     "ray_address")
ALWAYS_READ = ("seed", "dtype", "scan_impl")
"""Fields in every step's resume key: each step runs seeded from ``seed``, on the model cast to ``dtype``, through
the chosen scan, whether or not it reads them."""
CONTEXT_FIELDS = ("layers", "batch_size")
"""Result-relevant fields a step reads through its context (``ctx.layers``, ``ctx.batch_size``)."""


class UsageError(ValueError):
    """Bad user input (config, CLI argument, model name): the CLI prints the message and exits with code 2."""


def _fail(msg: str) -> None:
    raise UsageError(msg)


def parse_layers(value: Any) -> tuple[int, ...] | None:
    """``"all"``/None -> None (every layer); ``3``, ``"3"``, ``"0,2"``, ``"0-3"``, ``[0, 2]`` -> sorted tuple."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    if isinstance(value, bool):
        _fail(f"layers={value!r} is not a layer; use an integer, a list such as 0,2, a range 0-3, or 'all'")
    if isinstance(value, int):
        items: list[Any] = [value]
    elif isinstance(value, str):
        items = [p.strip() for p in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        _fail(f"layers={value!r} is not understood; use an integer, a list such as 0,2, a range 0-3, or 'all'")
    out: set[int] = set()
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            out.add(item)
            continue
        text = str(item).strip()
        if m := re.fullmatch(r"(-?\d+)", text):
            out.add(int(m.group(1)))
        elif m := re.fullmatch(r"(\d+)-(\d+)", text):
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                _fail(f"layer range {text!r} is empty; write it low-high, e.g. 0-3")
            out.update(range(lo, hi + 1))
        else:
            _fail(f"layer {text!r} is not understood; use an integer, a list such as 0,2, a range 0-3, or 'all'")
    if not out:
        _fail("layers is empty; name at least one layer or use 'all'")
    negative = sorted(i for i in out if i < 0)
    if negative:
        _fail(f"layer {negative[0]} is negative; layers are numbered from 0")
    return tuple(sorted(out))


def parse_steps(value: Any) -> tuple[int, ...] | None:
    """``"all"``/None -> None (every implemented step); ``"0-2,5"``, ``3``, ``[0, 1]`` -> sorted tuple."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    hint = "write steps as numbers and ranges, e.g. 0-2,5, or 'all'"
    if isinstance(value, bool):
        _fail(f"steps={value!r} is malformed; {hint}")
    if isinstance(value, int):
        parts: list[str] = [str(value)]
    elif isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
    elif isinstance(value, str):
        parts = value.split(",")
    else:
        _fail(f"steps={value!r} is malformed; {hint}")
    out: set[int] = set()
    for part in parts:
        text = part.strip()
        if m := re.fullmatch(r"\d+", text):
            out.add(int(text))
        elif m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", text):
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi:
                _fail(f"step range {text!r} is empty; {hint}")
            out.update(range(lo, hi + 1))
        else:
            _fail(f"steps={value!r} is malformed at {text!r}; {hint}")
    return tuple(sorted(out))


def parse_compare(value: Any) -> tuple[str, ...]:
    """``None``/``""`` -> (); ``"a,b"`` or ``["a", "b"]`` -> ("a", "b") (order kept, duplicates dropped)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(i, str) for i in items):
        _fail(f"compare={value!r} must be model names separated by commas, e.g. induction-transformer")
    return tuple(dict.fromkeys(i.strip() for i in items if i.strip()))


def _check_int(name: str, value: Any, minimum: int, fix: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        _fail(f"{name}={value!r} must be an integer; {fix}")
    if value < minimum:
        _fail(f"{name}={value} must be >= {minimum}; {fix}")


@dataclass(frozen=True)
class RunConfig:
    """What one pipeline run computes and where it writes. Also the analyzer's ``ExperimentConfig``."""

    model: str = DEFAULT_MODEL
    """A zoo name (``mamba-interp list-models`` / ``zoo.names()``), a checkpoint folder, or a hub id in the local
    Hugging Face cache. ``"default"`` is the zoo's embedded default."""
    layers: tuple[int, ...] | None = None
    """Layers to analyse; None means all. Accepts ``"all"``, ``2``, ``"0,2"``, ``"0-3"`` or a list."""
    samples: int = 256
    """Sequences per dataset (task batch or prompt set)."""
    seq_len: int | None = None
    """Sequence length of generated sequences; None uses the task's (or a 64-token) default."""
    batch_size: int = 64
    """Sequences per forward pass; halved automatically on CUDA out-of-memory."""
    steps: tuple[int, ...] | None = None
    """Steps to run; None means every implemented step. Accepts ``"0-2,5"``."""
    output: str | None = None
    """Output folder; None creates ``results/<model>-<timestamp>``."""
    device: str = "auto"
    dtype: str = "float32"
    scan_impl: str = "auto"
    """Selective-scan implementation (``HookedMamba.set_scan_impl``): auto, reference, compiled, loop, parallel,
    chunked, kernel. ``auto`` picks per device (the compiled C kernel for Mamba-1 on CPU where a C compiler is
    found, and the mamba_ssm kernels on CUDA when installed)."""
    seed: int = 0
    threads: int | None = None
    """CPU threads for torch (``torch.set_num_threads``); None keeps torch's default. On a busy machine 1 is
    often fastest."""
    task: str | None = None
    """Task generator for models that do not carry one (a zoo model's card names its task)."""
    corpus: str | None = None
    """A text corpus for a language model: a text file (one document per line) or ``.jsonl`` with a ``text``
    field. Step 1 tokenises it into context windows of ``seq_len`` tokens, which steps 2–4 analyse instead of the
    synthetic prompt sets (``pipeline/corpus.py``)."""
    tokens: int | None = None
    """Token budget read from ``corpus``: ``tokens // seq_len`` windows (instead of ``samples``)."""
    hooks: tuple[str, ...] = DEFAULT_HOOKS
    """Short hook names step 2 collects (see ``HOOK_CHOICES``)."""
    figures: bool = True
    """Draw the steps' figures (off: metrics and files only, faster)."""
    save_activations: bool = True
    """Write step 2's activations to ``activations.safetensors`` (later steps and resumed runs read them)."""
    dead_threshold: float = 0.01
    """A dimension is near-dead when its RMS is below this fraction of the median dimension's RMS."""
    outlier_ratio: float = 5.0
    """A dimension is an outlier when its RMS exceeds this multiple of the median dimension's RMS."""
    resume: bool = False
    quiet: bool = False
    activation_store: str = "auto"
    """Where step 2 (and steps collecting more) keep activations: ``memory``, ``disk`` (one safetensors file per
    (layer, hook), written as collected, read in chunks), or ``auto`` (disk when they would not fit comfortably in
    memory). Both give identical numbers."""
    executor: str = "local"
    """How independent units of work (SAEs per (layer, hook), ...) run: ``local`` (in this process, in order) or
    ``ray`` (one Ray actor per device; ``pip install mamba-interp[distributed]``). Results are identical."""
    ray_address: str | None = None
    """Address of a running Ray cluster to join (``ray start --head``); None starts a local one."""
    step_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-step options by step name, e.g. ``{"sae": {"expansion": 8}}``; each step validates its own (every
    registered step's, whether or not it runs)."""
    compare: tuple[str, ...] = ()
    """Companion models for the cross-model steps (9, 10, 14): zoo names, checkpoint folders or hub ids. Empty:
    a zoo model's family (other sizes and seeds) and its task's transformer baseline. Accepts ``"a,b"``."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            _fail(f"model={self.model!r} must be a non-empty string; pass a zoo name, a folder or a hub id")
        object.__setattr__(self, "layers", parse_layers(self.layers))
        object.__setattr__(self, "steps", parse_steps(self.steps))
        _check_int("samples", self.samples, 1, "pass --samples with a positive number of sequences, e.g. 256")
        _check_int("batch_size", self.batch_size, 1, "use a positive batch size, e.g. 64")
        _check_int("seed", self.seed, 0, "use a non-negative integer seed")
        if self.threads is not None:
            _check_int("threads", self.threads, 1, "use a positive number of CPU threads, e.g. 1")
        if self.seq_len is not None:
            _check_int("seq_len", self.seq_len, 2, "use a sequence length of at least 2 tokens")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            _fail(f"device={self.device!r} is unknown; use {DEVICES_HELP}")
        if self.scan_impl not in SCAN_IMPLS:
            _fail(f"scan_impl={self.scan_impl!r} is unknown; use one of {', '.join(SCAN_IMPLS)}")
        if self.dtype not in DTYPES:
            _fail(f"dtype={self.dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        hooks = (self.hooks,) if isinstance(self.hooks, str) else self.hooks
        if isinstance(hooks, tuple) and len(hooks) == 1 and "," in hooks[0]:
            hooks = tuple(h.strip() for h in hooks[0].split(","))
        if not isinstance(hooks, (list, tuple)) or not hooks:
            _fail(f"hooks={self.hooks!r} must be a non-empty list of hook names from {', '.join(HOOK_CHOICES)}")
        bad = [h for h in hooks if h not in HOOK_CHOICES]
        if bad:
            _fail(f"hook {bad[0]!r} is unknown; choose from {', '.join(HOOK_CHOICES)}")
        object.__setattr__(self, "hooks", tuple(dict.fromkeys(hooks)))
        if self.activation_store not in STORES:
            _fail(f"activation_store={self.activation_store!r} is unknown; use one of {', '.join(STORES)}")
        if self.executor not in EXECUTORS:
            _fail(f"executor={self.executor!r} is unknown; use one of {', '.join(EXECUTORS)}")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address.strip()):
            _fail(f"ray_address={self.ray_address!r} must be a cluster address such as 10.0.0.5:6379 or auto")
        if self.ray_address is not None and self.executor != "ray":
            _fail("--ray-address needs --executor ray")
        for name in ("figures", "save_activations", "resume", "quiet"):
            if not isinstance(getattr(self, name), bool):
                _fail(f"{name}={getattr(self, name)!r} must be true or false")
        for name in ("dead_threshold", "outlier_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                _fail(f"{name}={value!r} must be a positive number")
        if self.outlier_ratio <= 1:
            _fail(f"outlier_ratio={self.outlier_ratio} must be > 1 (a multiple of the median RMS)")
        if self.tokens is not None:
            _check_int("tokens", self.tokens, 2, "pass --tokens with a positive token budget, e.g. 1000000")
            if self.corpus is None:
                _fail("--tokens is the token budget of --corpus; pass --corpus FILE as well")
        if self.corpus is not None:
            if not isinstance(self.corpus, (str, Path)) or not str(self.corpus).strip():
                _fail(f"corpus={self.corpus!r} must be the path of a text or .jsonl file")
            object.__setattr__(self, "corpus", str(self.corpus))
            if not Path(self.corpus).expanduser().is_file():
                _fail(f"corpus file {self.corpus!r} does not exist; pass a text file (one document per line) or "
                      f".jsonl with a 'text' field")
        if self.task is not None and not isinstance(self.task, str):
            _fail(f"task={self.task!r} must be a task name")
        if self.output is not None and not isinstance(self.output, (str, Path)):
            _fail(f"output={self.output!r} must be a folder path")
        if self.output is not None:
            object.__setattr__(self, "output", str(self.output))
        if not isinstance(self.step_options, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Mapping) for k, v in self.step_options.items()
        ):
            _fail("step_options must map step names to option mappings, e.g. {sae: {expansion: 8}}")
        object.__setattr__(self, "step_options", {k: dict(v) for k, v in self.step_options.items()})
        object.__setattr__(self, "compare", parse_compare(self.compare))

    # ---- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layers"] = "all" if self.layers is None else list(self.layers)
        out["steps"] = "all" if self.steps is None else list(self.steps)
        out["hooks"] = list(self.hooks)
        out["compare"] = list(self.compare)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        aliases = {"layer": "layers", "n_samples": "samples", "num_samples": "samples", "output_dir": "output"}
        clean: dict[str, Any] = {}
        for key, value in data.items():
            name = aliases.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
            if name not in known:
                _fail(f"unknown config key {key!r}; known keys are {', '.join(sorted(known))}")
            clean[name] = value
        if isinstance(clean.get("hooks"), list):
            clean["hooks"] = tuple(clean["hooks"])
        try:
            return cls(**clean)
        except TypeError as exc:  # a wrongly typed value that __post_init__ could not even compare
            raise UsageError(f"invalid config value: {exc}; check the types in the config file") from None

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def result_fields(cls) -> tuple[str, ...]:
        """Fields that can change a step's result (all but ``NON_RESULT_FIELDS``; ``step_options`` are keyed per
        step through each step's own options)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in NON_RESULT_FIELDS + ("step_options",))


_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2's floats: PyYAML (YAML 1.1) reads ``1e-2`` or ``3E5`` as strings, so an
    option written as ``importance_minimality_coeff=1e-2`` would reach its step as the text "1e-2"."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    # a plain integer stays an int: the int resolver, registered first, matches it before this one
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) run-config file into a mapping; every failure is a one-line :class:`UsageError`."""
    import yaml

    p = Path(path).expanduser()
    if not p.exists():
        _fail(f"config file {str(p)!r} does not exist; pass the path of a YAML file")
    if not p.is_file():
        _fail(f"config file {str(p)!r} is not a file; pass the path of a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"config file {str(p)!r} cannot be read ({type(exc).__name__}); check its permissions and encoding")
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        _fail(f"config file {str(p)!r} is not valid YAML{where}; fix the syntax")
    if data is None:
        return {}
    if not isinstance(data, dict):
        _fail(f"config file {str(p)!r} must hold a mapping of keys such as 'model: ...', got {type(data).__name__}")
    return data


def build_config(config_file: str | Path | None = None, **overrides: Any) -> RunConfig:
    """YAML file values, then every override that is not None (the CLI passes unset flags as None)."""
    data: dict[str, Any] = dict(read_config_file(config_file)) if config_file is not None else {}
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    return RunConfig.from_dict(data)
