"""The methodology's analyzer, importable from a checkout: ``from experimental_framework import ExperimentConfig,
MambaMechanisticAnalyzer`` (the package module :mod:`mamba_interp.experimental_framework`, re-exported)."""

from mamba_interp.experimental_framework import ExperimentConfig, MambaMechanisticAnalyzer

__all__ = ["ExperimentConfig", "MambaMechanisticAnalyzer"]
