"""Sparse autoencoders: one core for ReLU/L1, TopK, BatchTopK and JumpReLU SAEs, metrics, analysis, I/O, and
SAEs spliced into the model (``run_with_saes``, latent ablation and steering, latent attribution)."""

from mamba_interp.sparse_autoencoder.analysis import (
    FeatureCorrelation,
    TopExamples,
    encode_activations,
    feature_variable_correlation,
    one_hot_variables,
    top_activating_examples,
)
from mamba_interp.sparse_autoencoder.config import ARCHITECTURES, SAEConfig
from mamba_interp.sparse_autoencoder.io import load_sae, save_sae
from mamba_interp.sparse_autoencoder.metrics import (
    FVUAccumulator,
    LossRecovered,
    RecoveryMetrics,
    SAEMetrics,
    cosine_matrix,
    dictionary_recovery,
    fvu,
    kl_score,
    loss_recovered,
    mmcs,
    sae_metrics,
)
from mamba_interp.sparse_autoencoder.model import SparseAutoencoder
from mamba_interp.sparse_autoencoder.plots import (
    plot_feature_density,
    plot_feature_variable_matches,
    plot_training_history,
)
from mamba_interp.sparse_autoencoder.splice import (
    SAESplice,
    ablate_latents,
    latent_attribution,
    run_with_saes,
    saes_spliced,
    steer_latents,
    steering_hook,
)
from mamba_interp.sparse_autoencoder.synthetic import PlantedData, planted_features
from mamba_interp.sparse_autoencoder.training import ActivationChunks, TrainHistory, geometric_median, train_sae

__all__ = [
    "ARCHITECTURES",
    "ActivationChunks",
    "FVUAccumulator",
    "FeatureCorrelation",
    "LossRecovered",
    "PlantedData",
    "RecoveryMetrics",
    "SAEConfig",
    "SAESplice",
    "SAEMetrics",
    "SparseAutoencoder",
    "TopExamples",
    "TrainHistory",
    "ablate_latents",
    "cosine_matrix",
    "dictionary_recovery",
    "encode_activations",
    "feature_variable_correlation",
    "fvu",
    "geometric_median",
    "kl_score",
    "latent_attribution",
    "load_sae",
    "loss_recovered",
    "mmcs",
    "one_hot_variables",
    "planted_features",
    "plot_feature_density",
    "plot_feature_variable_matches",
    "plot_training_history",
    "run_with_saes",
    "sae_metrics",
    "saes_spliced",
    "save_sae",
    "steer_latents",
    "steering_hook",
    "top_activating_examples",
    "train_sae",
]
