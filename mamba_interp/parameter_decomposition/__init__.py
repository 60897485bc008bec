"""Parameter decomposition: SPD and APD, the toy models with known mechanisms, and clusters of subcomponents.

* SPD — Stochastic Parameter Decomposition (Bushnaq, Braun & Sharkey 2025, arXiv 2506.20790): rank-one
  subcomponents per matrix with causal-importance functions and stochastic masks (``spd.py``, ``components.py``).
* APD — Attribution-based Parameter Decomposition (Braun et al. 2025, arXiv 2501.14926): full-rank components
  selected by gradient attributions and batch top-k (``apd.py``); the historical baseline.
* Toy models (``toy_models.py``): TMS 5-2 (a shipped pentagon), TMS 5-2 + identity, the residual MLP of compressed
  computation; ``decompose_tms(W, b, method="spd" | "apd", seed=0, **config) -> Decomposition``.
* Mamba (``mamba.py``): the mixers' Linears of a ``HookedMamba`` decomposed through its own modules, per-token
  importances, KL over all positions; ``decompose_mamba(model, sample, ...)``.
* Metrics (``metrics.py``): MMCS, norm-aware ML2R, identity- and dense-CI errors, alive counts, CI-L0.
* Clusters (``clusters.py``): greedy MDL merging of co-active subcomponents, size-matched random controls.

Example::

    from mamba_interp.parameter_decomposition import decompose_tms, tms_5_2
    W, b = tms_5_2()
    dec = decompose_tms(W, b, "spd", seed=0, steps=8000, batch_size=2048)
    dec.metrics()["mmcs"], dec.components["linear1"]      # (U [C, 2], V [C, 5])
"""

from mamba_interp.parameter_decomposition.apd import APDConfig, run_apd
from mamba_interp.parameter_decomposition.clusters import merge_by_mdl, stratified_random_like
from mamba_interp.parameter_decomposition.decomposition import Decomposition, Target, decompose, load_decomposition
from mamba_interp.parameter_decomposition.mamba import (
    decompose_mamba,
    evaluate_modes,
    mamba_modules,
    masked_logits,
    position_classes,
    task_sampler,
)
from mamba_interp.parameter_decomposition.metrics import decomposition_metrics, feature_match, identity_ci_error
from mamba_interp.parameter_decomposition.spd import SPDConfig, run_spd
from mamba_interp.parameter_decomposition.toy_models import (
    decompose_resid_mlp,
    decompose_tms,
    tms_5_2,
    tms_target,
    train_resid_mlp,
    train_tms,
)

__all__ = [
    "APDConfig", "Decomposition", "SPDConfig", "Target", "decompose", "decompose_mamba", "decompose_resid_mlp",
    "decompose_tms", "decomposition_metrics", "evaluate_modes", "feature_match", "identity_ci_error",
    "load_decomposition", "mamba_modules", "masked_logits", "merge_by_mdl", "position_classes", "run_apd",
    "run_spd", "stratified_random_like", "task_sampler", "tms_5_2", "tms_target", "train_resid_mlp", "train_tms",
]
