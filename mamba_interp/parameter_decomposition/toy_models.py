"""The toy models the parameter-decomposition papers decompose, with known ground truth, and their entry points.

* **TMS 5-2** (Elhage et al. 2022; APD paper §3.1, SPD paper §3.1): x̂ = ReLU(Wᵀ W x + b), W [2, 5], tied; each
  feature active with p = 0.05, value U[0, 1]. Ground truth: one rank-one mechanism W_{:,j} e_jᵀ per feature in W
  (and, tied, in Wᵀ), causally important iff feature j is active. ``TMS_5_2`` ships a trained pentagon.
* **TMS 5-2 + identity** (SPD paper §3.1): an untrained identity ``hidden_layers.0`` [2, 2] between the two; it should
  decompose into exactly 2 always-important subcomponents summing to I.
* **Residual MLP of compressed computation** (SPD paper §3.3, APD paper §3.2): y = W_U(W_E x + W_out ReLU(W_in W_E x)),
  100 features, d_resid 1000, 50 neurons; W_E fixed random with unit-norm rows, W_U = W_Eᵀ; trained on
  y_i = x_i + ReLU(x_i), p = 0.01, values U[−1, 1]. SPD should give 100 one-feature subcomponents in W_in and 50
  always co-active ones (one rank-50 mechanism) in W_out.

Module names follow the reference code (``linear1``, ``linear2``, ``hidden_layers.0``, ``layers.0.mlp_in``), so
checkpoints and figures compare one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba_interp.parameter_decomposition.decomposition import Decomposition, Target, decompose, mse_loss
from mamba_interp.superposition import sample_toy_batch, train_toy_model

# A TMS 5-2 target trained with ``train_tms(seed=0)`` (10k steps, batch 1024, AdamW lr 5e-3, weight decay 0.01,
# p = 0.05): a regular pentagon, column norms 1.13–1.14, angles 71–73° apart, biases ≈ −0.24.
TMS_5_2_W = (
    (1.1240956783294678, 0.49335429072380066, -0.8237684965133667, 0.20439159870147705, -0.9884454011917114),
    (-0.1479417234659195, 1.0226280689239502, 0.7803113460540771, -1.10917329788208, -0.5471958518028259),
)
TMS_5_2_B = (-0.2424403578042984, -0.2303655743598938, -0.24347881972789764, -0.23595404624938965,
             -0.234434112906456)
TMS_FEATURE_PROBABILITY = 0.05
MIN_FEATURE_NORM = 0.9  # a TMS target whose feature has ‖W_:,j‖ below this has a dead feature


def tms_5_2() -> tuple[Tensor, Tensor]:
    """The shipped pentagon: (W [2, 5], b [5])."""
    return torch.tensor(TMS_5_2_W), torch.tensor(TMS_5_2_B)


def train_tms(n_features: int = 5, n_hidden: int = 2, seed: int = 0, steps: int = 10_000,
              feature_probability: float = TMS_FEATURE_PROBABILITY) -> tuple[Tensor, Tensor]:
    """Train a TMS target with the SPD paper's settings (through ``superposition.train_toy_model``: batch 1024,
    AdamW lr 5e-3, weight decay 0.01, unit importance) and check it: every feature norm ≥ 0.9."""
    W, b = train_toy_model(n_features, n_hidden, feature_probability, 1.0, steps=steps, seed=seed,
                           batch_size=1024, lr=5e-3, weight_decay=0.01)
    check_tms_target(W)
    return W, b


def check_tms_target(W: Tensor) -> None:
    norms = W.norm(dim=0)
    dead = (norms < MIN_FEATURE_NORM).nonzero().flatten().tolist()
    if dead:
        raise ValueError(f"TMS target has dead features {dead} (‖W_:,j‖ < {MIN_FEATURE_NORM}); train with another "
                         "seed or use tms_5_2()")


class TMSModel(nn.Module):
    """x̂ = ReLU(linear2(hidden_layers(linear1(x)))): linear1 = W (no bias), linear2 = Wᵀ with bias b.

    The two Linears hold separate copies of W and Wᵀ; they are frozen, and the decomposition ties their
    subcomponents (``Target.tied``)."""

    def __init__(self, W: Tensor, b: Tensor, identity: bool = False) -> None:
        super().__init__()
        m, n = W.shape
        self.linear1 = nn.Linear(n, m, bias=False)
        self.linear2 = nn.Linear(m, n, bias=True)
        self.hidden_layers = nn.ModuleList([nn.Linear(m, m, bias=False)] if identity else [])
        with torch.no_grad():
            self.linear1.weight.copy_(W)
            self.linear2.weight.copy_(W.T)
            self.linear2.bias.copy_(b)
            for layer in self.hidden_layers:
                layer.weight.copy_(torch.eye(m))

    def forward(self, x: Tensor) -> Tensor:
        """x [b, n] -> x̂ [b, n]."""
        h = self.linear1(x)  # (b, m)
        for layer in self.hidden_layers:
            h = layer(h)
        return F.relu(self.linear2(h))


@dataclass
class ToyTruth:
    """Ground truth of a toy target, for ``metrics``: the features' matrix and which modules are identities."""

    kind: str  # "tms" or "resid_mlp"
    n_features: int
    feature_probability: float
    value_range: tuple[float, float]
    feature_module: str | None  # the matrix MMCS/ML2R are computed on (its columns are the features)
    identity_modules: tuple[str, ...] = ()  # modules that should be one dense mechanism
    dense_modules: dict[str, int] | None = None  # module -> k for a dense-k CI pattern


def _sample_features(n_features: int, p: float, value_range: tuple[float, float]):
    lo, hi = value_range

    def sample(batch_size: int, generator: torch.Generator) -> Tensor:
        x = sample_toy_batch(batch_size, torch.tensor([p]), n_features, generator)[:, 0]  # (b, n), U[0, 1)
        if (lo, hi) == (0.0, 1.0):
            return x
        return torch.where(x != 0, lo + (hi - lo) * x, x)

    return sample


def tms_target(W: Tensor, b: Tensor, identity: bool = False,
               feature_probability: float = TMS_FEATURE_PROBABILITY) -> Target:
    """The decomposition target of a TMS model (linear2 tied to linear1; + the identity when ``identity``)."""
    W, b = W.detach().float().cpu(), b.detach().float().cpu()
    model = TMSModel(W, b, identity=identity).eval()
    modules = ("linear1",) + (("hidden_layers.0",) if identity else ()) + ("linear2",)
    n = W.shape[1]
    truth = ToyTruth("tms", n, feature_probability, (0.0, 1.0), "linear1",
                     identity_modules=("hidden_layers.0",) if identity else (),
                     dense_modules={"hidden_layers.0": W.shape[0]} if identity else None)
    return Target(model, modules, _sample_features(n, feature_probability, (0.0, 1.0)), lambda m, x: m(x),
                  mse_loss, tied={"linear2": "linear1"}, toy=truth)


def decompose_tms(W: Tensor, b: Tensor, method: str = "spd", seed: int = 0, identity: bool = False,
                  **config: Any) -> Decomposition:
    """Decompose the TMS model x̂ = ReLU(Wᵀ W x + b), W [n_hidden, n_features] (tied).

    ``method`` "spd" (``SPDConfig``; defaults: the paper's TMS settings at 10k steps) or "apd" (``APDConfig``;
    defaults: the APD paper's TMS 5-2 settings). ``config`` overrides any field of that config, e.g.
    ``steps=8000, batch_size=2048``. ``.components["linear1"]`` is ``(U [C, n_hidden], V [C, n_features])``.
    """
    target = tms_target(W, b, identity=identity)
    return decompose(target, method, seed, config)


# ---- residual MLP of compressed computation ---------------------------------------------------------------
class ResidualMLP(nn.Module):
    """y = W_U(W_E x + Σ_layers W_out ReLU(W_in resid)) with fixed W_E [n, d_resid] (unit-norm rows), W_U = W_Eᵀ,
    no biases; ``layers.{i}.mlp_in`` / ``layers.{i}.mlp_out`` are the Linears to decompose."""

    def __init__(self, n_features: int = 100, d_resid: int = 1000, d_mlp: int = 50, n_layers: int = 1,
                 seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W_E = torch.randn(n_features, d_resid, generator=gen)
        self.register_buffer("W_E", W_E / W_E.norm(dim=1, keepdim=True))
        self.layers = nn.ModuleList()
        for _ in range(n_layers):
            layer = nn.Module()
            layer.mlp_in = nn.Linear(d_resid, d_mlp, bias=False)
            layer.mlp_out = nn.Linear(d_mlp, d_resid, bias=False)
            bound_in, bound_out = 1 / math.sqrt(d_resid), 1 / math.sqrt(d_mlp)
            with torch.no_grad():
                layer.mlp_in.weight.uniform_(-bound_in, bound_in, generator=gen)
                layer.mlp_out.weight.uniform_(-bound_out, bound_out, generator=gen)
            self.layers.append(layer)

    def forward(self, x: Tensor) -> Tensor:
        """x [b, n] -> y [b, n]."""
        resid = x @ self.W_E  # (b, d_resid)
        for layer in self.layers:
            resid = resid + layer.mlp_out(F.relu(layer.mlp_in(resid)))
        return resid @ self.W_E.T


RESID_FEATURE_PROBABILITY = 0.01


def train_resid_mlp(n_features: int = 100, d_resid: int = 1000, d_mlp: int = 50, n_layers: int = 1,
                    steps: int = 1000, batch_size: int = 2048, lr: float = 3e-3, seed: int = 0) -> ResidualMLP:
    """Train the target as the SPD paper: labels x + ReLU(x), AdamW (wd 0.01) with a cosine LR, p = 0.01."""
    from mamba_interp.parameter_decomposition.decomposition import lr_factor

    model = ResidualMLP(n_features, d_resid, d_mlp, n_layers, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    sample = _sample_features(n_features, RESID_FEATURE_PROBABILITY, (-1.0, 1.0))
    opt = torch.optim.AdamW(model.layers.parameters(), lr=lr, weight_decay=0.01)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, "cosine", 0.0, 0.0)
        x = sample(batch_size, gen)
        loss = (model(x) - (x + F.relu(x))).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def resid_mlp_target(model: ResidualMLP) -> Target:
    """Decompose every layer's mlp_in and mlp_out (the paper's target modules)."""
    names = tuple(f"layers.{i}.{m}" for i in range(len(model.layers)) for m in ("mlp_in", "mlp_out"))
    n, d_mlp = model.W_E.shape[0], model.layers[0].mlp_in.out_features
    truth = ToyTruth("resid_mlp", n, RESID_FEATURE_PROBABILITY, (-1.0, 1.0), None,
                     dense_modules={f"layers.{i}.mlp_out": d_mlp for i in range(len(model.layers))})
    return Target(model, names, _sample_features(n, RESID_FEATURE_PROBABILITY, (-1.0, 1.0)), lambda m, x: m(x),
                  mse_loss, toy=truth)


def decompose_resid_mlp(model: ResidualMLP, method: str = "spd", seed: int = 0, **config: Any) -> Decomposition:
    """Decompose a residual MLP; SPD defaults to the paper's 1-layer settings where ``config`` does not say."""
    if method == "spd":
        defaults = dict(C=100, importance_minimality_coeff=1e-5, pnorm=2.0, lr=2e-3, lr_schedule="constant",
                        steps=30_000, batch_size=2048)
        config = {**defaults, **config}
    return decompose(resid_mlp_target(model), method, seed, config)
