"""Attribution-based Parameter Decomposition (Braun, Bushnaq, Heimersheim, Mendel & Sharkey 2025, arXiv 2501.14926,
§2 and App. A "top-k formulation"), the method SPD replaced.

C parameter components P_c, each spanning every decomposed matrix, stored per matrix as P_{c,l} = A_{c,l} B_{c,l}
(A [C, i, k], B [C, k, o]; the matrix is W^l ≈ Σ_c P_{c,l}ᵀ). One step:

* attributions (the released code's gradient form): for every output dimension o of the **target** model, the
  gradient of Σ_tokens f_o with respect to each matrix's output y^l; score_c = Σ_o (Σ_l ∂f_o/∂y^l · (a^l P_{c,l}))²
  (``attribution_output="top_logit"`` attributes only the target's top logit at each position: one backward pass
  instead of d_out, for language models);
* batch top-k: keep the ``int(topk · n_tokens)`` largest scores of the [n_tokens, C] matrix (s_c ∈ {0, 1}), one mask
  shared by every matrix;
* L_faith = Σ_l ‖W^l − Σ_c P_{c,l}‖² / N;  L_min = D(f(x | Σ_c s_c P_c), f(x | W));
  L_simp = Σ_tokens Σ_c s_c Σ_l Σ_m ((Σ_i A²)(Σ_j B²) + 1e-16)^{p/2} / (N · n_tokens)   (Schatten-p surrogate);
* L = L_faith + β L_min + α L_simp;  AdamW (weight decay 0).

Known failure modes (APD paper §5, SPD paper §1): very sensitive to the top-k fraction and the loss coefficients;
components die or shrink (TMS 5-2 ML2R 0.89 in the paper); C full copies of the parameters; d_out backward passes
per step; fails on TMS + identity and on deeper residual MLPs. Report its figures as measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mamba_interp.parameter_decomposition.components import resolve_linear
from mamba_interp.parameter_decomposition.decomposition import (
    DecomposedModel,
    Decomposition,
    Target,
    check_C,
    check_common,
    key,
    optimise,
)

ATTRIBUTION_OUTPUTS = ("all", "top_logit")
ATTRIBUTION_SOURCES = ("target", "apd")


@dataclass(frozen=True)
class APDConfig:
    """Hyperparameters of APD; defaults are the APD paper's TMS 5-2 settings (App. B)."""

    C: int = 5
    rank: int | None = None
    """k, the rank of each component in each matrix; None: min(d_in, d_out) of that matrix (the code's default)."""
    topk: float = 0.211
    """Components kept per token on average (batch top-k over the [n_tokens, C] scores)."""
    steps: int = 20_000
    batch_size: int = 2048
    lr: float = 0.03
    lr_schedule: str = "constant"
    lr_warmup: float = 0.05
    lr_final_frac: float = 0.0
    faithfulness_coeff: float = 1.0
    minimality_coeff: float = 1.0
    simplicity_coeff: float = 0.7
    schatten_p: float = 1.0
    attribution_output: str = "all"
    attributions_from: str = "target"
    """"target" (the released code) or "apd" (the APD model with every component on; the paper used this for
    TMS 5-2)."""
    seed: int = 0
    log_every: int = 500
    checkpoint_every: int | None = None
    checkpoint_path: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        check_common(self)
        check_C(self.C, ("all",))
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive integer or None")
        if not 0 < self.topk <= self.C:
            raise ValueError(f"topk={self.topk!r} must be in (0, C={self.C}]")
        for name in ("faithfulness_coeff", "minimality_coeff", "simplicity_coeff"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not self.schatten_p > 0:
            raise ValueError(f"schatten_p={self.schatten_p!r} must be > 0")
        if self.attribution_output not in ATTRIBUTION_OUTPUTS:
            raise ValueError(f"attribution_output={self.attribution_output!r}; use one of {ATTRIBUTION_OUTPUTS}")
        if self.attributions_from not in ATTRIBUTION_SOURCES:
            raise ValueError(f"attributions_from={self.attributions_from!r}; use one of {ATTRIBUTION_SOURCES}")

    def replace(self, **changes: Any) -> APDConfig:
        return dataclasses.replace(self, **changes)


class RankKComponents(nn.Module):
    """C components of one matrix W [o, i], each of rank ≤ k: W ≈ Σ_c (A_c B_c)ᵀ, A [C, i, k], B [C, k, o].

    ``tied_to``: the transpose of another matrix's components (A = sourceᵀ's B, B = source's Aᵀ), sharing storage.
    """

    def __init__(self, d_in: int, d_out: int, C: int, k: int, generator: torch.Generator | None = None,
                 tied_to: RankKComponents | None = None) -> None:
        super().__init__()
        self.d_in, self.d_out, self.C, self.k = d_in, d_out, C, k
        object.__setattr__(self, "_source", tied_to)
        if tied_to is not None:
            if (tied_to.d_in, tied_to.d_out, tied_to.C, tied_to.k) != (d_out, d_in, C, k):
                raise ValueError("tied APD components need the transposed shape and the same C and k")
            self._A = self._B = None
        else:
            self._A = nn.Parameter(torch.empty(C, d_in, k))
            self._B = nn.Parameter(torch.empty(C, k, d_out))
            nn.init.xavier_normal_(self._A, generator=generator)
            nn.init.xavier_normal_(self._B, generator=generator)

    @property
    def A(self) -> Tensor:  # [C, i, k]
        return self._source.B.transpose(1, 2) if self._source is not None else self._A

    @property
    def B(self) -> Tensor:  # [C, k, o]
        return self._source.A.transpose(1, 2) if self._source is not None else self._B

    def matrices(self) -> Tensor:
        """[C, o, i]: each component as a matrix in the weight's layout."""
        return torch.einsum("cik,cko->coi", self.A, self.B)

    def weight(self) -> Tensor:
        return torch.einsum("cik,cko->oi", self.A, self.B)

    def component_outputs(self, x: Tensor) -> Tensor:
        """x [..., i] -> each component's output [..., C, o]."""
        return torch.einsum("...ck,cko->...co", torch.einsum("...i,cik->...ck", x, self.A), self.B)

    def apply(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """Σ_c m_c (x A_c) B_c: x [..., i], mask [..., C] or None -> [..., o]."""
        inner = torch.einsum("...i,cik->...ck", x, self.A)
        if mask is not None:
            inner = inner * mask[..., None]
        return torch.einsum("...ck,cko->...o", inner, self.B)

    def schatten(self, p: float) -> Tensor:
        """[C]: Σ_m ((Σ_i A²)(Σ_j B²) + 1e-16)^{p/2}, the factorised Schatten-p surrogate."""
        S = self.A.pow(2).sum(1) * self.B.pow(2).sum(2)  # (C, k)
        return (S + 1e-16).pow(0.5 * p).sum(-1)


class APDModel(DecomposedModel):
    """APD's components for the decomposed Linears of a target."""

    def __init__(self, target: Target, config: APDConfig, generator: torch.Generator | None = None) -> None:
        super().__init__(target)
        self.config = config
        for name in self.modules_:
            if name not in target.tied:
                lin = resolve_linear(target.model, name)
                k = config.rank or min(lin.in_features, lin.out_features)
                self.components[key(name)] = RankKComponents(lin.in_features, lin.out_features, config.C, k,
                                                             generator)
        for name, source in target.tied.items():
            lin = resolve_linear(target.model, name)
            src = self.components[key(source)]
            self.components[key(name)] = RankKComponents(lin.in_features, lin.out_features, config.C, src.k,
                                                         tied_to=src)

    def component_matrices(self, name: str) -> Tensor:
        return self.comp(name).matrices()

    def norms(self, name: str) -> Tensor:
        return self.component_matrices(name).detach().flatten(1).norm(dim=1)

    def rank_one(self, name: str) -> tuple[Tensor, Tensor]:
        """The best rank-one approximation of each component: U_c = σ_1 u_1, V_c = v_1."""
        u, s, vh = torch.linalg.svd(self.component_matrices(name).detach())
        return (u[:, :, 0] * s[:, :1]).clone(), vh[:, 0, :].clone()

    def attributions(self, target: Target, batch: Any) -> tuple[Tensor, Tensor]:
        """(score [..., C], target output). Gradients of the chosen outputs w.r.t. every matrix's output, through
        the target (or, with ``attributions_from="apd"``, the APD model with every component on)."""
        cfg = self.config
        inputs: dict[str, Tensor] = {}
        probes: dict[str, Tensor] = {}
        masks = {n: None for n in self.modules_} if cfg.attributions_from == "apd" else None
        with torch.enable_grad():
            out = self.forward_with(target.forward, batch, masks=masks, record=inputs, probes=probes)
            if cfg.attribution_output == "top_logit":
                top = out.detach().argmax(-1, keepdim=True)
                outputs = [out.gather(-1, top).sum()]
            else:
                outputs = [out[..., o].sum() for o in range(out.shape[-1])]
            names = list(probes)
            acts = {n: self.comp(n).component_outputs(inputs[n].detach()).detach() for n in names}  # (..., C, o)
            score = torch.zeros(acts[names[0]].shape[:-1], device=out.device)
            for i, f in enumerate(outputs):
                grads = torch.autograd.grad(f, [probes[n] for n in names], retain_graph=i < len(outputs) - 1)
                attr = sum(torch.einsum("...o,...co->...c", g, acts[n]) for g, n in zip(grads, names))
                score = score + attr.pow(2)
        if cfg.attributions_from == "apd":
            with torch.no_grad():
                out = self.forward_with(target.forward, batch)
        return score, out.detach()

    def topk_mask(self, score: Tensor, valid: Tensor | None) -> Tensor:
        """Batch top-k: the ``int(topk · n_tokens)`` largest entries of score [..., C] over the valid tokens."""
        flat = score.reshape(-1, score.shape[-1])
        n_tokens = flat.shape[0]
        if valid is not None:
            keep = valid.reshape(-1).to(flat.device)
            flat = torch.where(keep[:, None], flat, torch.full_like(flat, -1.0))
            n_tokens = int(keep.sum())
        k = max(1, int(self.config.topk * n_tokens))
        idx = flat.flatten().topk(k).indices
        mask = torch.zeros(flat.numel(), device=flat.device)
        mask[idx] = 1.0
        return mask.view(score.shape)

    def importances(self, target: Target, batch: Any) -> dict[str, Tensor]:
        """Attribution scores divided by their per-token maximum, the same [..., C] for every module (APD has no
        causal-importance function; this is its analogue for the CI metrics)."""
        score, _ = self.attributions(target, batch)
        norm = score / score.amax(-1, keepdim=True).clamp_min(1e-30)
        return {n: norm for n in self.modules_}

    def eval_masks(self, target: Target, batch: Any) -> dict[str, Tensor]:
        score, _ = self.attributions(target, batch)
        mask = self.topk_mask(score, target.token_mask(batch))
        return {n: mask for n in self.modules_}


def apd_losses(model: APDModel, target: Target, batch: Any, cfg: APDConfig) -> tuple[Tensor, dict[str, float]]:
    score, target_out = model.attributions(target, batch)
    valid = target.token_mask(batch)
    s = model.topk_mask(score, valid)  # (..., C)
    n_tokens = s.reshape(-1, s.shape[-1]).shape[0] if valid is None else int(valid.sum())
    terms: dict[str, Tensor] = {"faithfulness": model.faithfulness(target)}
    masks = {n: s for n in model.modules_}
    terms["minimality"] = target.loss(model.forward_with(target.forward, batch, masks), target_out, batch)
    schatten = sum(model.comp(n).schatten(cfg.schatten_p) for n in model.modules_)  # (C,)
    terms["simplicity"] = (s.reshape(-1, s.shape[-1]).sum(0) * schatten).sum() / (target.n_params * n_tokens)
    total = (cfg.faithfulness_coeff * terms["faithfulness"] + cfg.minimality_coeff * terms["minimality"]
             + cfg.simplicity_coeff * terms["simplicity"])
    out = {k: float(v.detach()) for k, v in terms.items()}
    out["active_per_token"] = float(s.sum()) / n_tokens
    return total, out


def run_apd(target: Target, config: APDConfig | None = None,
            progress: Callable[..., Iterable[int]] | None = None) -> Decomposition:
    """Decompose ``target`` with APD; deterministic in ``config.seed``."""
    cfg = config or APDConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    model = APDModel(target, cfg, gen)
    model.to(next(iter(target.weights().values())).device)
    opt = torch.optim.AdamW(model.trainable(), lr=cfg.lr, weight_decay=0.0)
    return optimise(model, target, cfg, "apd", opt, lambda batch, g: apd_losses(model, target, batch, cfg), gen,
                    progress)
