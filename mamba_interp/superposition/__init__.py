"""Superposition: the toy models of Elhage et al. 2022 and their geometry measures, also for SAE decoders.

Toy Models of Superposition (arXiv 2209.10652; the released notebook):

    h = W x,  x' = ReLU(Wᵀ W x + b),  W ∈ R^{m×n}  (m hidden dimensions, n features)
    x_i ~ U[0, 1) with probability p = 1 − S (S is the sparsity), else 0, independently per feature
    L = mean_{batch, i} I_i (x_i − x'_i)²,  AdamW (lr 1e-3, weight decay 0.01), batch 1024

Geometry (notebook cells 18–19): feature i is represented when ‖W_i‖ ≈ 1; dimensions per feature D* = m / ‖W‖_F²;
feature dimensionality D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)² (the sum includes j = i), equal to 1 for a dedicated
dimension and k/N for a feature on a uniform polytope of N vertices in k dimensions (antipodal pair 1/2, triangle
2/3, tetrahedron 3/4, pentagon 2/5, square antiprism 3/8); interference Σ_{j≠i} (Ŵ_i · W_j)².

Index letters: n features (columns of W), m hidden dimensions (rows of W), i instances (models trained together).
"""

from mamba_interp.superposition.geometry import (
    NORM_EPS,
    POLYTOPE_DIMENSIONALITY,
    DecoderGeometry,
    ToyGeometry,
    angle_gaps_deg,
    decoder_geometry,
    dimensions_per_feature,
    feature_dimensionality,
    feature_norms,
    interference,
    polytope,
    tegum_product,
    toy_geometry,
)
from mamba_interp.superposition.plots import (
    plot_decoder_geometry,
    plot_dimensionality,
    plot_feature_arrows,
    plot_interference,
)
from mamba_interp.superposition.toy_model import (
    ToyModels,
    importance_vector,
    sample_toy_batch,
    toy_forward,
    train_toy_model,
    train_toy_models,
)

__all__ = [
    "NORM_EPS",
    "POLYTOPE_DIMENSIONALITY",
    "DecoderGeometry",
    "ToyGeometry",
    "ToyModels",
    "angle_gaps_deg",
    "decoder_geometry",
    "dimensions_per_feature",
    "feature_dimensionality",
    "feature_norms",
    "importance_vector",
    "interference",
    "plot_decoder_geometry",
    "plot_dimensionality",
    "plot_feature_arrows",
    "plot_interference",
    "polytope",
    "sample_toy_batch",
    "tegum_product",
    "toy_forward",
    "toy_geometry",
    "train_toy_model",
    "train_toy_models",
]
