"""Stochastic Parameter Decomposition (Bushnaq, Braun & Sharkey 2025, arXiv 2506.20790, §2 and App. E).

Each decomposed matrix W^l [o, i] gets C rank-one subcomponents U^l_c V^lᵀ_c and per-subcomponent causal-importance
functions g^l_c (``components.py``). One training step:

1. draw x; run the target, y* = f(x | W), recording the input a^l of every decomposed matrix;
2. L_faith = Σ_l ‖W^l − U^lᵀV^l‖²_F / N  (N = number of decomposed weights);
3. raw importances G^l = Γ^l(a^l V^lᵀ); g_upper = σ_H,upper(G), g = σ_H,lower(G);
4. L_imp = mean over tokens of Σ_l Σ_c |g_upper|^p  (summed over layers, not normalised by L);
5. masks m^l = g + (1 − g) ⊙ r, r ~ U(0, 1) per token, layer and subcomponent (S samples);
   L_sr = D(f(x | every matrix masked), y*);
   L_srl = mean over l of D(f(x | only matrix l masked, the rest at the target's weights), y*)   ("layerwise"),
   or, with ``routing="subset"``, one forward in which each token routes a random k ~ U{1..L} of the matrices
   through their masked components and the rest through the target (spd-main's uniform-k subset routing);
6. L = c_f L_faith + β1 L_sr + β2 L_srl + β3 L_imp; Adam on U, V and the CI functions.

D is the target's output loss: MSE for the toy models, KL(target ‖ masked) over all positions for an LM.
Optional ``faithfulness_warmup_steps`` (spd-main) first fits Σ_c U_c V_cᵀ to W alone, so the stochastic losses
start from a faithful sum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mamba_interp.parameter_decomposition.components import (
    CIFunction,
    LinearComponents,
    lower_leaky_hard_sigmoid,
    resolve_linear,
    upper_leaky_hard_sigmoid,
)
from mamba_interp.parameter_decomposition.decomposition import (
    DecomposedModel,
    Decomposition,
    Target,
    check_C,
    check_common,
    key,
    masked_mean,
    optimise,
)

ROUTINGS = ("layerwise", "subset")


@dataclass(frozen=True)
class SPDConfig:
    """Hyperparameters of SPD. Defaults are the paper's TMS 5-2 settings (App. D) at 10k instead of 40k steps."""

    C: int | Mapping[str, int] = 20
    """Subcomponents per matrix: one int, or module name -> int."""
    d_gate: int = 16
    """Hidden width of each causal-importance MLP."""
    steps: int = 10_000
    batch_size: int = 2048
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    lr_warmup: float = 0.0
    lr_final_frac: float = 0.0
    faithfulness_coeff: float = 1.0
    stochastic_recon_coeff: float = 1.0
    layerwise_recon_coeff: float = 1.0
    ci_recon_coeff: float = 0.0
    """spd-main's CI-masked reconstruction: D(f(x | every matrix masked with m = g), y*) (0 = off, as the paper)."""
    routing: str = "layerwise"
    """How the second reconstruction loss picks the matrices it masks: "layerwise" (L forwards, one matrix each)
    or "subset" (one forward, a random subset of matrices per token)."""
    importance_minimality_coeff: float = 3e-3
    pnorm: float = 1.0
    n_mask_samples: int = 1
    faithfulness_warmup_steps: int = 0
    faithfulness_warmup_lr: float = 0.01
    tied_steps: str = "separate"
    """Tied matrices (TMS's Wᵀ): "separate" — their own parameter tensors on the shared storage, one Adam step
    each (the SPD paper's code); "summed" — one parameter, the gradients of both uses summed."""
    grad_clip: float | None = None
    seed: int = 0
    log_every: int = 500
    checkpoint_every: int | None = None
    checkpoint_path: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_common(self)
        if not isinstance(self.C, Mapping):
            check_C(self.C, ("all",))
        else:
            object.__setattr__(self, "C", dict(self.C))
        if self.d_gate < 1:
            raise ValueError(f"d_gate={self.d_gate} must be >= 1")
        for name in ("faithfulness_coeff", "stochastic_recon_coeff", "layerwise_recon_coeff", "ci_recon_coeff",
                     "importance_minimality_coeff", "faithfulness_warmup_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing={self.routing!r} is unknown; use one of {ROUTINGS}")
        if not self.pnorm > 0:
            raise ValueError(f"pnorm={self.pnorm!r} must be > 0")
        if self.n_mask_samples < 1 or self.faithfulness_warmup_steps < 0:
            raise ValueError("n_mask_samples must be >= 1 and faithfulness_warmup_steps >= 0")
        if self.tied_steps not in ("separate", "summed"):
            raise ValueError(f"tied_steps={self.tied_steps!r} is unknown; use 'separate' or 'summed'")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be > 0 or None")

    def replace(self, **changes: Any) -> SPDConfig:
        return dataclasses.replace(self, **changes)


class ComponentModel(DecomposedModel):
    """SPD's rank-one subcomponents and causal-importance functions for the decomposed Linears of a target."""

    def __init__(self, target: Target, config: SPDConfig) -> None:
        super().__init__(target)
        C = check_C(config.C, target.modules)
        self.ci_fns = nn.ModuleDict()
        for name in self.modules_:  # sources before the matrices tied to them
            if name not in target.tied:
                linear = resolve_linear(target.model, name)
                self.components[key(name)] = LinearComponents(linear.in_features, linear.out_features, C[name])
        for name, source in target.tied.items():
            linear = resolve_linear(target.model, name)
            self.components[key(name)] = LinearComponents(linear.in_features, linear.out_features, C[name],
                                                          tied_to=self.components[key(source)],
                                                          separate_steps=config.tied_steps == "separate")
        for name in self.modules_:
            self.ci_fns[key(name)] = CIFunction(C[name], config.d_gate)

    @torch.no_grad()
    def init_(self, generator: torch.Generator) -> None:
        for name in self.modules_:
            self.comp(name).init_from(self.model.get_submodule(name).weight, generator)
            self.ci_fns[key(name)].reinit(generator)

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() copy parameters: re-alias the tied ones
        out = super()._apply(fn, *args, **kwargs)
        for comp in self.components.values():
            comp.retie_()
        return out

    def causal_importances(self, inputs: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(lower-leaky g, upper-leaky g) per module from the inputs a^l of the matrices, each [..., C]."""
        lower, upper = {}, {}
        for name in self.modules_:
            raw = self.ci_fns[key(name)](self.comp(name).inner(inputs[name]))
            lower[name] = lower_leaky_hard_sigmoid(raw)
            upper[name] = upper_leaky_hard_sigmoid(raw)
        return lower, upper

    def importances(self, target: Target, batch: Any) -> dict[str, Tensor]:
        """The causal importances g (lower leaky) of every subcomponent, per module [..., C]."""
        _, inputs = self.target_run(target, batch)
        with torch.no_grad():
            return self.causal_importances(inputs)[0]

    def eval_masks(self, target: Target, batch: Any) -> dict[str, Tensor]:
        """The deterministic masks of an evaluation: m = g."""
        return self.importances(target, batch)

    def norms(self, name: str) -> Tensor:
        return self.comp(name).norms().detach()

    def component_matrices(self, name: str) -> Tensor:
        c = self.comp(name)
        return torch.einsum("co,ci->coi", c.U, c.V)

    def rank_one(self, name: str) -> tuple[Tensor, Tensor]:
        c = self.comp(name)
        return c.U.detach().clone(), c.V.detach().clone()


def random_routes(modules: Iterable[str], shape: torch.Size, generator: torch.Generator, device: Any
                  ) -> dict[str, Tensor]:
    """Uniform-k subset routing: per token, k ~ U{1..L} and a uniformly random k of the L modules. -> name ->
    [shape] bool."""
    names = list(modules)
    L = len(names)
    k = torch.randint(1, L + 1, tuple(shape), generator=generator)  # (...)
    order = torch.rand(*shape, L, generator=generator).argsort(-1).argsort(-1)  # (..., L) a random rank
    chosen = order < k[..., None]
    return {n: chosen[..., i].to(device) for i, n in enumerate(names)}


def stochastic_masks(ci: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """m = g + (1 − g) r with r ~ U(0, 1) independently per entry (reparametrised: gradients reach g)."""
    out = {}
    for name, g in ci.items():
        r = torch.rand(g.shape, generator=generator).to(g.device, g.dtype)
        out[name] = g + (1 - g) * r
    return out


def spd_losses(cm: ComponentModel, target: Target, batch: Any, cfg: SPDConfig, generator: torch.Generator
               ) -> tuple[Tensor, dict[str, float]]:
    """The total SPD loss of one batch and its terms (as floats)."""
    target_out, inputs = cm.target_run(target, batch)
    lower, upper = cm.causal_importances(inputs)
    valid = target.token_mask(batch)
    terms: dict[str, Tensor] = {"faithfulness": cm.faithfulness(target)}
    imp = sum(u.pow(cfg.pnorm).sum(-1) for u in upper.values())  # (...) summed over layers and C
    terms["importance_minimality"] = masked_mean(imp, valid)
    sr = srl = torch.zeros((), device=target_out.device)
    for _ in range(cfg.n_mask_samples):
        masks = stochastic_masks(lower, generator)
        if cfg.stochastic_recon_coeff > 0:
            sr = sr + target.loss(cm.forward_with(target.forward, batch, masks), target_out, batch)
        if cfg.layerwise_recon_coeff > 0:
            if cfg.routing == "layerwise":
                parts = [target.loss(cm.forward_with(target.forward, batch, {n: masks[n]}), target_out, batch)
                         for n in cm.modules_]
                srl = srl + sum(parts) / len(parts)
            else:
                shape = next(iter(masks.values())).shape[:-1]
                routes = random_routes(cm.modules_, shape, generator, target_out.device)
                srl = srl + target.loss(cm.forward_with(target.forward, batch, masks, routes), target_out, batch)
    terms["stochastic_recon"] = sr / cfg.n_mask_samples
    terms["layerwise_recon"] = srl / cfg.n_mask_samples
    total = (cfg.faithfulness_coeff * terms["faithfulness"] + cfg.stochastic_recon_coeff * terms["stochastic_recon"]
             + cfg.layerwise_recon_coeff * terms["layerwise_recon"]
             + cfg.importance_minimality_coeff * terms["importance_minimality"])
    if cfg.ci_recon_coeff > 0:
        terms["ci_recon"] = target.loss(cm.forward_with(target.forward, batch, lower), target_out, batch)
        total = total + cfg.ci_recon_coeff * terms["ci_recon"]
    return total, {k: float(v.detach()) for k, v in terms.items()}


def faithfulness_warmup(cm: ComponentModel, target: Target, steps: int, lr: float) -> float:
    """Fit Σ_c U_c V_cᵀ to W alone (AdamW, weight decay 0.1, as spd-main); returns the final L_faith."""
    params = list(cm.components.parameters())
    if steps == 0 or not params:
        return float(cm.faithfulness(target).detach())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    for _ in range(steps):
        loss = cm.faithfulness(target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(cm.faithfulness(target).detach())


def run_spd(target: Target, config: SPDConfig | None = None,
            progress: Callable[..., Iterable[int]] | None = None) -> Decomposition:
    """Decompose ``target`` with SPD; deterministic in ``config.seed`` (one generator for init, data and masks).

    ``progress(iterable, total=...)`` wraps the step loop (default: a tqdm bar when ``config.progress``).
    Checkpoints go to ``config.checkpoint_path`` every ``config.checkpoint_every`` steps and at the end.
    """
    cfg = config or SPDConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(iter(target.weights().values())).device
    cm = ComponentModel(target, cfg)
    cm.init_(gen)
    cm.to(device)
    history: list[dict[str, float]] = []
    warm = faithfulness_warmup(cm, target, cfg.faithfulness_warmup_steps, cfg.faithfulness_warmup_lr)
    if cfg.faithfulness_warmup_steps:
        history.append({"step": -1, "faithfulness": warm})
    opt = torch.optim.Adam(cm.trainable(), lr=cfg.lr)
    clip = list(cm.components.parameters()) if cfg.grad_clip is not None else None
    return optimise(cm, target, cfg, "spd", opt, lambda batch, g: spd_losses(cm, target, batch, cfg, g), gen,
                    progress, history, clip)
