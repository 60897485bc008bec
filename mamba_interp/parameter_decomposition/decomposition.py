"""What a decomposition runs on (:class:`Target`) and what it returns (:class:`Decomposition`), shared by SPD and APD.

A :class:`Target` names the ``nn.Linear`` modules of a model to decompose and says how to draw a batch, run the
model on it, and compare two outputs (MSE for the toy models, KL over all positions for a language model). The
same training loop then serves the toy models and Mamba.

A :class:`Decomposition` holds the trained parameters (an :class:`~.spd.ComponentModel` or an
:class:`~.apd.APDModel`), the training history, and the toy ground truth when there is one; it saves and loads
itself with safetensors (:meth:`Decomposition.save`, :func:`load_decomposition`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mamba_interp.parameter_decomposition.components import stand_in
from mamba_interp.utils.io import atomic_path

Batch = Any
SampleFn = Callable[[int, torch.Generator], Batch]  # (batch_size, generator) -> batch
ForwardFn = Callable[[nn.Module, Batch], Tensor]  # (model, batch) -> output
OutputLoss = Callable[[Tensor, Tensor, Batch], Tensor]  # (output, target output, batch) -> scalar D


@dataclass
class Target:
    """A model and the Linears of it to decompose.

    ``tied`` maps a module to the module whose transpose it is (TMS: ``{"linear2": "linear1"}``); its components
    are the source's, transposed. ``token_mask(batch)`` -> [b, l] bool of the positions that count (None: all).
    ``toy`` holds the ground truth of a toy model (see ``toy_models``), None otherwise.
    """

    model: nn.Module
    modules: tuple[str, ...]
    sample: SampleFn
    forward: ForwardFn
    loss: OutputLoss
    tied: Mapping[str, str] = field(default_factory=dict)
    token_mask: Callable[[Batch], Tensor | None] = lambda batch: None
    toy: Any = None

    def __post_init__(self) -> None:
        if not self.modules:
            raise ValueError("a Target needs at least one module to decompose")
        if len(set(self.modules)) != len(self.modules):
            raise ValueError(f"modules {list(self.modules)} name a module twice")
        for name, source in self.tied.items():
            if name not in self.modules or source not in self.modules or source in self.tied:
                raise ValueError(f"tied {name!r} -> {source!r}: both must be decomposed and the source not tied")
        for p in self.model.parameters():
            p.requires_grad_(False)  # the target is frozen: biases, norms, conv, A_log, D keep their values

    @property
    def n_params(self) -> int:
        """N, the number of decomposed weights (a tied matrix counts again, as in both papers' code)."""
        return sum(self.model.get_submodule(n).weight.numel() for n in self.modules)

    def weights(self) -> dict[str, Tensor]:
        return {n: self.model.get_submodule(n).weight.detach() for n in self.modules}


def key(name: str) -> str:
    """ModuleDict keys cannot hold dots."""
    return name.replace(".", "-")


class DecomposedModel(nn.Module):
    """The components of the decomposed Linears of ``target.model`` (SPD's or APD's), and how to run the model
    with them. The target model is referenced, not owned: its parameters are neither trained nor saved."""

    def __init__(self, target: Target) -> None:
        super().__init__()
        self.modules_ = tuple(target.modules)
        self.components = nn.ModuleDict()
        object.__setattr__(self, "model", target.model)

    def comp(self, name: str) -> nn.Module:
        return self.components[key(name)]

    def weight(self, name: str) -> Tensor:
        """[o, i]: the sum of the components of matrix ``name``."""
        return self.comp(name).weight()

    def n_components(self, name: str) -> int:
        return self.comp(name).C

    def faithfulness(self, target: Target) -> Tensor:
        """Σ_l ‖W^l − Σ_c P_c^l‖² / N."""
        total = sum((self.model.get_submodule(n).weight - self.weight(n)).pow(2).sum() for n in self.modules_)
        return total / target.n_params

    def forward_with(
        self,
        fn: ForwardFn,
        batch: Batch,
        masks: Mapping[str, Tensor | None] | None = None,
        routes: Mapping[str, Tensor] | None = None,
        record: dict[str, Tensor] | None = None,
        probes: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Run ``fn(model, batch)`` with the decomposed Linears swapped in (and put back afterwards).

        ``masks``: None runs the target; otherwise the modules named in it use their components with that mask
        ([..., C], or None for all ones) and the others the target's weights. ``routes`` [...] bool per module:
        per-token routing (components where True). ``record``: filled with each decomposed matrix's input.
        ``probes``: filled with a zero tensor added to each matrix's output, whose gradient is the gradient of the
        output with respect to that matrix's output.
        """
        with stand_in(self.model, {n: self.comp(n) for n in self.modules_}) as stands:
            for name, s in stands.items():
                if masks is not None and name in masks:
                    s.use_components, s.mask = True, masks[name]
                    s.route = routes.get(name) if routes is not None else None
                s.record = record
                s.probes = probes
            return fn(self.model, batch)

    def target_run(self, target: Target, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The target's output and the input of every decomposed matrix (no gradient)."""
        inputs: dict[str, Tensor] = {}
        with torch.no_grad():
            out = self.forward_with(target.forward, batch, record=inputs)
        return out, inputs

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` [b, ...] over the positions of ``mask`` (its leading dims), or over everything."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.device)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def mse_loss(out: Tensor, target_out: Tensor, batch: Batch = None) -> Tensor:
    """D for the toy models: mean squared error over batch and outputs (both papers' code)."""
    return (out - target_out).pow(2).mean()


def lr_factor(step: int, steps: int, schedule: str, warmup: float, final_frac: float) -> float:
    """Learning-rate multiplier at ``step`` of ``steps``: a linear warm-up over ``warmup`` × steps, then
    ``constant``, ``linear`` or ``cosine`` decay to ``final_frac`` (cosine is the papers' quarter cosine
    cos(π/2 · t/T) when final_frac = 0)."""
    n_warm = int(warmup * steps)
    if step < n_warm:
        return (step + 1) / n_warm
    if schedule == "constant":
        return 1.0
    t = (step - n_warm) / max(1, steps - n_warm - 1)
    t = min(max(t, 0.0), 1.0)
    shape = 1 - t if schedule == "linear" else math.cos(0.5 * math.pi * t)
    return final_frac + (1 - final_frac) * shape


SCHEDULES = ("constant", "linear", "cosine")


def check_common(cfg: Any) -> None:
    """Validation shared by ``SPDConfig`` and ``APDConfig`` (fields both have)."""
    for name in ("steps", "batch_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if not cfg.lr > 0:
        raise ValueError(f"lr={cfg.lr!r} must be > 0")
    if cfg.lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={cfg.lr_schedule!r} is unknown; use one of {SCHEDULES}")
    if not 0 <= cfg.lr_warmup < 1 or not 0 <= cfg.lr_final_frac <= 1:
        raise ValueError("lr_warmup must be in [0, 1) and lr_final_frac in [0, 1]")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"seed={cfg.seed!r} must be a non-negative integer")
    if cfg.log_every < 1:
        raise ValueError(f"log_every={cfg.log_every!r} must be >= 1")
    if cfg.checkpoint_every is not None and (cfg.checkpoint_every < 1 or cfg.checkpoint_path is None):
        raise ValueError("checkpoint_every needs checkpoint_path and must be >= 1")


def check_C(C: Any, modules: tuple[str, ...]) -> dict[str, int]:
    """C as one int for every module or a mapping module -> int; returns the mapping."""
    if isinstance(C, Mapping):
        missing = [m for m in modules if m not in C]
        if missing:
            raise ValueError(f"C has no entry for module {missing[0]!r}; give every decomposed module a C")
        out = {m: C[m] for m in modules}
    else:
        out = {m: C for m in modules}
    for m, c in out.items():
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(f"C for {m!r} is {c!r}; it must be a positive integer")
    return out


@dataclass
class Decomposition:
    """The result of :func:`~.spd.run_spd` or :func:`~.apd.run_apd`.

    ``components`` maps each decomposed matrix to ``(U [C, o], V [C, i])`` with the matrix ≈ Σ_c U_c V_cᵀ. For SPD
    these are the subcomponents themselves; an APD component has rank up to k, so there each entry is its best
    rank-one approximation (its top singular pair), and :meth:`component_matrices` gives the full ones.
    """

    method: str  # "spd" or "apd"
    model: nn.Module  # ComponentModel (SPD) or APDModel (APD)
    target: Target
    config: Any
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def components(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {n: self.model.rank_one(n) for n in self.target.modules}

    def component_matrices(self, name: str) -> Tensor:
        """[C, o, i]: each (sub)component of matrix ``name`` as a full matrix."""
        return self.model.component_matrices(name).detach()

    def importances(self, batch: Batch) -> dict[str, Tensor]:
        """Per module [..., C]: SPD's causal importances (lower leaky) or APD's normalised attributions."""
        return self.model.importances(self.target, batch)

    def metrics(self, **kw: Any) -> dict[str, Any]:
        """The figures of ``metrics.decomposition_metrics`` (MMCS, ML2R, alive counts, identity-CI error on
        toys; faithfulness and component counts on any target)."""
        from mamba_interp.parameter_decomposition.metrics import decomposition_metrics

        return decomposition_metrics(self, **kw)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the trained parameters to ``path`` (safetensors, atomically) with the config as metadata."""
        return save_state(self.model, path, self.method, self.target, self.config, step=len(self.history))


def decompose(target: Target, method: str, seed: int, config: dict[str, Any]) -> Decomposition:
    """Run SPD or APD on ``target`` with ``config`` overriding the method's config fields."""
    if method == "spd":
        from mamba_interp.parameter_decomposition.spd import SPDConfig, run_spd

        return run_spd(target, SPDConfig(seed=seed, **config))
    if method == "apd":
        from mamba_interp.parameter_decomposition.apd import APDConfig, run_apd

        return run_apd(target, APDConfig(seed=seed, **config))
    raise ValueError(f"method={method!r} is unknown; use 'spd' or 'apd'")


def optimise(model: nn.Module, target: Target, cfg: Any, method: str, opt: torch.optim.Optimizer,
             losses: Callable[[Batch, torch.Generator], tuple[Tensor, dict[str, float]]], gen: torch.Generator,
             progress: Callable[..., Any] | None = None, history: list[dict[str, float]] | None = None,
             clip: list[nn.Parameter] | None = None) -> Decomposition:
    """The training loop SPD and APD share: LR schedule, a fresh batch per step, ``losses(batch, gen)``, Adam,
    history every ``cfg.log_every`` steps, checkpoints every ``cfg.checkpoint_every`` steps and at the end."""
    history = [] if history is None else history
    steps: Any = range(cfg.steps)
    if progress is not None:
        steps = progress(steps, total=cfg.steps)
    elif cfg.progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=cfg.steps, desc=method.upper(), leave=False, dynamic_ncols=True)
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.lr_schedule, cfg.lr_warmup, cfg.lr_final_frac)
        loss, terms = losses(target.sample(cfg.batch_size, gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": float(loss.detach()), **terms})
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save_state(model, cfg.checkpoint_path, method, target, cfg, step + 1)
    result = Decomposition(method, model, target, cfg, history)
    if cfg.checkpoint_path is not None:
        result.save(cfg.checkpoint_path)
    return result


def save_state(model: nn.Module, path: str | Path, method: str, target: Target, config: Any, step: int) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"method": method, "modules": json.dumps(list(target.modules)), "tied": json.dumps(dict(target.tied)),
            "config": json.dumps(dataclasses.asdict(config), default=str), "step": str(step)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_decomposition(path: str | Path, target: Target) -> Decomposition:
    """Rebuild a saved decomposition of ``target`` (the same modules; the config is read from the file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no decomposition checkpoint at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    modules = tuple(json.loads(meta.get("modules", "[]")))
    if modules != tuple(target.modules):
        raise ValueError(f"{path} decomposes {list(modules)}, not the target's {list(target.modules)}")
    raw = json.loads(meta["config"])
    if meta["method"] == "spd":
        from mamba_interp.parameter_decomposition.spd import ComponentModel, SPDConfig

        config = SPDConfig(**raw)
        model: nn.Module = ComponentModel(target, config)
    elif meta["method"] == "apd":
        from mamba_interp.parameter_decomposition.apd import APDConfig, APDModel

        config = APDConfig(**raw)
        model = APDModel(target, config)
    else:
        raise ValueError(f"{path}: unknown method {meta.get('method')!r}")
    model.load_state_dict(load_file(str(path)))
    return Decomposition(meta["method"], model, target, config)
