"""Sizes and recipes of the planted-feature tests (shared by the fixtures and the tests)."""

D, N_TRUE, L0, WIDTH = 64, 128, 3, 256

# recipes of the planted-feature tests: the shortest runs that cleared their thresholds with margin on seeds 0-2
RECIPES = {
    "topk": dict(architecture="topk", k=3, steps=2000),
    "relu": dict(architecture="relu", l1_coefficient=3.0, steps=2000),
    "batchtopk": dict(architecture="batchtopk", k=3, steps=3000),
    "jumprelu": dict(architecture="jumprelu", l1_coefficient=3.0, steps=3000),
}
