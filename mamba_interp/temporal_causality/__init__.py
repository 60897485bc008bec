"""Inside the recurrence: hidden attention, knockout, temporal Jacobians, memory horizons and SSM dynamics.

    >>> from mamba_interp import zoo
    >>> from mamba_interp.temporal_causality import hidden_attention, temporal_jacobian, memory_horizon
    >>> model, task = zoo.load(), zoo.load_task()
    >>> batch = task.sample(8, seed=0)
    >>> alpha = hidden_attention(model, batch.tokens, layer=1, reduce="mean_abs")    # [b, l, l]
    >>> infl = temporal_jacobian(model, batch.tokens, target_positions=[63])          # [b, 1, l]
    >>> memory_horizon(infl, 0.1, target_positions=[63])                             # [b, 1]

Modules: ``hidden_attention`` (hidden attention and knockout), ``jacobian`` (temporal Jacobians, memory
horizon), ``lookup`` (per-layer lookup measures on a TaskBatch: induction score, knockout accuracy drop,
top-source hit), ``dynamics`` (timescales, Δ selectivity, state rank, attention sparsity, gates).
"""

from mamba_interp.temporal_causality.dynamics import (
    Timescales,
    cluster_decays,
    decay_timescales,
    delta_selectivity,
    effective_rank,
    gate_stats,
    participation_ratio,
    row_sparsity,
    tokens_for_mass,
)
from mamba_interp.temporal_causality.hidden_attention import (
    SSMInputs,
    attention_weights,
    hidden_attention,
    knockout,
    segsum_rows,
    ssm_inputs,
)
from mamba_interp.temporal_causality.jacobian import (
    answer_logprob,
    influence_profile,
    memory_horizon,
    temporal_jacobian,
)
from mamba_interp.temporal_causality.lookup import (
    Lookup,
    LookupAttention,
    answer_correct,
    class_shares,
    induction_score,
    influence_on_answer,
    knockout_accuracy_drop,
    lookup_attention,
    lookup_positions,
    mcnemar_greater,
    position_classes,
    proportion_ci,
    random_sources,
    top_source_hit,
    top_units,
)

__all__ = [
    "Lookup", "LookupAttention", "SSMInputs", "Timescales", "answer_correct", "answer_logprob", "attention_weights",
    "class_shares", "cluster_decays", "decay_timescales", "delta_selectivity", "effective_rank", "gate_stats",
    "hidden_attention", "induction_score", "influence_on_answer", "influence_profile", "knockout",
    "knockout_accuracy_drop", "lookup_attention", "lookup_positions", "mcnemar_greater", "memory_horizon",
    "participation_ratio", "position_classes", "proportion_ci", "random_sources", "row_sparsity", "segsum_rows",
    "ssm_inputs", "temporal_jacobian", "tokens_for_mass", "top_source_hit", "top_units",
]
