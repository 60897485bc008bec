"""Probing: which dimensions of which layer and hook carry a variable, and does the model use them.

Modules (each usable from a notebook with tensors, or a model and a ``TaskBatch``):

* ``probes`` — :func:`fit_probe` (k-sparse, lasso, elastic-net, L1 / L2 logistic, ridge; held-out score on
  groups never used to fit or choose the regularisation), :class:`Probe`, :func:`sparsity_curve`, and the control
  task of Hewitt & Liang (:func:`control_labels`, :func:`selectivity`);
* ``scores`` — the grouped split, balanced accuracy / R², and bootstrap CIs over groups (sequences);
* ``erasure`` — LEACE (:func:`erase_concept`) and amnesic probing (:func:`amnesic_effect`, :func:`amnesic_test`);
* ``variables`` — the probed tokens of each ground-truth variable (:func:`prepare_variables`);
* ``search`` — :func:`probe_model`: every probe of every variable at every layer and hook (step 4's core),
  returning a :class:`ProbeReport`;
* ``states`` — :func:`probe_states`: which channels (Mamba-1) or heads (Mamba-2) of the SSM state hold a variable.

    >>> from mamba_interp.probing import fit_probe, probe_model
    >>> probe = fit_probe(X, y, "ksparse", k=5, groups=sequence_of_each_row)   # X [N, d], y [N]
    >>> probe.score, probe.support, probe.score_estimate()                     # held-out score, dims, CI
"""

from mamba_interp.probing.erasure import (
    AmnesicEffect,
    AmnesicTest,
    ModelRun,
    amnesic_effect,
    amnesic_test,
    erase_concept,
    erasing_hook,
    run_model,
)
from mamba_interp.probing.probes import (
    DEFAULT_KS,
    METHODS,
    TASK_METHODS,
    Probe,
    control_labels,
    fit_probe,
    infer_task,
    selectivity,
    sparsity_curve,
)
from mamba_interp.probing.scores import CLASSIFICATION, REGRESSION, HeldOut, heldout_score, split_indices
from mamba_interp.probing.search import DEFAULT_METHODS, ProbeRecord, ProbeReport, probe_model, unit_scores
from mamba_interp.probing.states import StateProbe, collect_states, probe_states
from mamba_interp.probing.variables import VariableData, prepare_variables

__all__ = [
    "CLASSIFICATION", "DEFAULT_KS", "DEFAULT_METHODS", "METHODS", "REGRESSION", "TASK_METHODS", "AmnesicEffect",
    "AmnesicTest", "HeldOut", "ModelRun", "Probe", "ProbeRecord", "ProbeReport", "StateProbe", "VariableData",
    "amnesic_effect", "amnesic_test", "collect_states", "control_labels", "erase_concept", "erasing_hook",
    "fit_probe", "heldout_score", "infer_task", "prepare_variables", "probe_model", "probe_states", "run_model",
    "selectivity", "sparsity_curve", "split_indices", "unit_scores",
]
