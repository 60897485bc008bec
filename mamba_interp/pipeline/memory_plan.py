"""The memory plan of a run: each step's peak memory, disk use and CPU time, estimated before any work.

:func:`make_plan` estimates, from the run config and the model's dimensions, what each planned step holds at
its peak: the process baseline (interpreter, libraries and the model's weights: the resident memory measured when
the plan is made), the data earlier steps keep in memory (step 2's activations when they are held in memory),
and the step's own working set (one forward pass of a batch, hook buffers, statistics chunks, SAE buffers, the
logits of the positions a metric scores). The runner prints it at the start of every run and on ``--dry-run``
(plan only, nothing written), and refuses a run whose step cannot fit the available RAM (or GPU memory) even with
the disk-backed activation store, with a one-line error naming the option that makes it fit.

The working-set formulas count the tensors a no-grad forward pass holds at once (``forward_bytes``) with
coefficients measured on this project's CPU implementation (``bench/bench_scale.py --calibrate``); the time
estimate converts the forward pass's multiply-adds at the matrix-multiply rate measured when the plan is made,
so it is indicative (±2×). Steps without an estimator of their own get the generic estimate of a step that runs
forward passes of one batch (``generic``); a step can register one with :func:`register_estimator`.

Peak memory of each step is measured too: the runner resets the kernel's peak-RSS counter (``VmHWM``, Linux) when a
step starts and records the step's peak as ``peak_rss_mb`` in its ``result.json``, next to ``duration_s``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamba_interp.pipeline.resources import MiB, available_memory, current_rss, disk_free, matmul_rate
from mamba_interp.sparse_autoencoder.model import EVAL_BATCH

GiB = 2**30
AUTO_MEMORY_LIMIT = 2 * GiB
"""``--activation-store auto`` holds activations in memory up to this size (and a quarter of the free memory)."""
STATE_BATCH_BYTES = 1 * GiB
"""Hooks on the SSM state materialise [b, l, e, n] (Mamba-2: [b, l, h, p, n]) tensors: step 2 runs its forward
passes in micro-batches of at most this many bytes of them (a constant, so numbers do not depend on the machine)."""
LOGIT_CHUNK = 512
"""Scored positions whose full-vocabulary logits exist at once (``pipeline/logits.py``)."""
SAFETY = 0.9
"""A step "fits" when its peak is below this fraction of the available memory."""
# Measured peaks of one no-grad forward pass of this project's CPU scans, in float32 elements (bench/bench_scale.py
# --calibrate: d_model 256–768, b·l 2k–4k tokens): Mamba-1's loop scan holds about one [b, l, e, n] tensor and two
# [b, l, e]; Mamba-2's chunked SSD about 5.3 [b, c, h, p, n] chunk-state tensors (c = ceil(l / chunk)) and two
# [b, l, e]. A hook on the SSM state materialises [b, l, state] tensors, this many more.
FORWARD_PER_TOKEN = {"mamba1": (2.0, 1.0), "mamba2": (2.0, 0.0)}
"""(per e, per e·n) elements held per token."""
CHUNK_STATES = {"mamba1": 0.0, "mamba2": 5.3}
STATE_PER_ELEMENT = {"mamba1": 3.4, "mamba2": 2.8}


# ---- sizes -------------------------------------------------------------------------------------------
def hook_width(cfg: Any, short: str) -> int:
    """Flattened width k of a short hook (``pipeline/config.HOOK_CHOICES``)."""
    d, e, n = cfg.d_model, cfg.d_inner, cfg.d_state
    if cfg.arch == "mamba1":
        widths = {"in_x": e, "in_z": e, "conv": e, "x": e, "dt_low": cfg.dt_rank_value, "dt": e, "B": n, "C": n,
                  "y": e, "gate": e, "gated": e, "out": d, "state_norm": e}
    else:
        gn, h = cfg.ngroups * n, cfg.nheads
        widths = {"in_x": e + 2 * gn, "in_z": e, "conv": e + 2 * gn, "x": e, "dt": h, "B": gn, "C": gn, "y": e,
                  "gate": e, "gated": e, "out": d, "state_norm": h}
    return widths.get(short, d)  # resid_pre, resid_post, norm


def state_elements(cfg: Any) -> int:
    """Elements of one token's SSM state: e·n (Mamba-1) or h·p·n (Mamba-2)."""
    return cfg.d_inner * cfg.d_state


def activation_bytes(cfg: Any, hooks: Sequence[str], layers: Sequence[int], sequences: int, seq_len: int) -> int:
    """float32 bytes of step 2's activations: sequences × seq_len × Σ hook widths × layers × 4."""
    return sequences * seq_len * sum(hook_width(cfg, h) for h in hooks) * len(layers) * 4


def forward_bytes(cfg: Any, batch: int, seq_len: int, states: bool = False) -> int:
    """Working set of one no-grad forward pass of [batch, seq_len] tokens, bytes (the constants above): one layer's
    mixer tensors, Mamba-2's chunk states, the residual stream, and when a hook reads the SSM state its
    materialised [b, l, state] tensors."""
    from mamba_interp.models.ops.ssd import cpu_chunk

    tokens = batch * seq_len
    per_e, per_state = FORWARD_PER_TOKEN[cfg.arch]
    out = tokens * (per_e * cfg.d_inner + per_state * state_elements(cfg) + 6 * cfg.d_model)
    out += CHUNK_STATES[cfg.arch] * batch * math.ceil(seq_len / cpu_chunk(cfg.headdim, cfg.d_state)) * state_elements(
        cfg)
    if states:
        out += STATE_PER_ELEMENT[cfg.arch] * tokens * state_elements(cfg)
    return int(4 * out)


def logits_bytes(cfg: Any, positions: int) -> int:
    """Full-vocabulary logits of at most ``LOGIT_CHUNK`` scored positions at a time (logits, log-softmax, one
    temporary)."""
    return 3 * min(positions, LOGIT_CHUNK) * cfg.padded_vocab_size * 4


ATTRIBUTION_GRAPH_BYTES = 512 * MiB
"""Step 3's attribution pass (forward and backward through the blocks after the first SAE's layer) runs as many
sequences at a time as keep its autograd graph below this (``attribution_batch``; at least one)."""
# Measured autograd graph of the attribution pass per token (bench/bench_scale.py --calibrate-graph on the 130M
# configurations, model weights frozen as ``latent_attribution`` runs it), float32 elements: per block 11.6 per e
# (d_inner), plus Mamba-2's chunk states, about 4 copies of [l / T, h, p, n] (T = the SSD chunk) per sequence;
# per latent of the spliced SAEs (recorded latents, pre-activations, reconstruction inputs). The log-odds chunks
# add about ATTRIBUTION_LOGIT_COPIES logit chunks [ATTRIBUTION_LOGIT_CHUNK, v] whatever the batch.
GRAPH_PER_E = 11.6
GRAPH_CHUNK_STATES = 4.0
GRAPH_PER_LATENT = {"mamba1": 3.7, "mamba2": 7.5}
ATTRIBUTION_LOGIT_COPIES = 5
ATTRIBUTION_LOGIT_CHUNK = 128
"""Target positions whose full-vocabulary logits the attribution pass forms at once (checkpointed, so each chunk's
logits exist during its own forward and backward only; smaller than ``LOGIT_CHUNK`` since several copies live)."""


def attribution_graph_bytes(cfg: Any, blocks: int, seq_len: int, sequences: int, latents: Sequence[int]) -> int:
    """Autograd graph of the attribution pass over ``sequences`` × ``seq_len`` tokens through ``blocks`` blocks with
    SAEs of ``latents`` (d_sae each) spliced in, bytes (without the log-odds chunks)."""
    from mamba_interp.models.ops.ssd import cpu_chunk

    per_block = GRAPH_PER_E * cfg.d_inner
    if cfg.arch == "mamba2":  # the chunk states [c, h, p, n], c = l / T per sequence
        per_block += GRAPH_CHUNK_STATES * state_elements(cfg) / min(cpu_chunk(cfg.headdim, cfg.d_state), seq_len)
    per_token = blocks * per_block + GRAPH_PER_LATENT[cfg.arch] * sum(latents)
    return int(4 * sequences * seq_len * per_token)


def attribution_batch(cfg: Any, blocks: int, seq_len: int, latents: Sequence[int], batch_size: int) -> int:
    """Sequences per forward/backward of the attribution pass: ``batch_size``, lowered so that its graph stays
    below ``ATTRIBUTION_GRAPH_BYTES`` (at least one)."""
    per_sequence = attribution_graph_bytes(cfg, blocks, seq_len, 1, latents)
    return int(max(1, min(batch_size, ATTRIBUTION_GRAPH_BYTES // max(per_sequence, 1))))


def collection_batch(cfg: Any, seq_len: int, hooks: Sequence[str], batch_size: int) -> int:
    """Sequences per forward pass when collecting ``hooks``: ``batch_size``, lowered so that materialised SSM
    states (``state_norm``) stay below ``STATE_BATCH_BYTES``."""
    from mamba_interp.pipeline.activation_stats import STATE_NORM

    if STATE_NORM not in hooks:
        return batch_size
    per_sequence = STATE_PER_ELEMENT[cfg.arch] * seq_len * state_elements(cfg) * 4
    return max(1, min(batch_size, int(STATE_BATCH_BYTES // per_sequence)))


def decide_store(requested: str, nbytes: int, available: int | None) -> str:
    """``memory`` or ``disk`` for ``--activation-store requested`` and activations of ``nbytes``."""
    if requested in ("memory", "disk"):
        return requested
    limit = AUTO_MEMORY_LIMIT if available is None else min(AUTO_MEMORY_LIMIT, available // 4)
    return "memory" if nbytes <= limit else "disk"


SCAN_COST = {"mamba1": 400.0, "mamba2": 40.0}
"""Matmul-equivalent operations per state element and token of the scan. Measured: Mamba-1's loop scan of
[16, 256, 1536, 16] takes 0.13 s on 2 threads where the matmul rate is 332 GFLOP/s, about 430 per element (it is
memory-bound); Mamba-2's chunked SSD is matmul-based."""


def forward_flops(cfg: Any, tokens: int, layers: int, head_positions: int = 0) -> float:
    """Multiply-adds ×2 of a forward pass of ``tokens`` through ``layers`` blocks, plus the unembedding at
    ``head_positions``; the scan counts ``SCAN_COST`` operations per state element (it runs far below the matmul
    rate)."""
    d, e, n = cfg.d_model, cfg.d_inner, cfg.d_state
    if cfg.arch == "mamba1":
        r = cfg.dt_rank_value
        per_layer = 2 * (d * 2 * e + e * (r + 2 * n) + r * e + e * d + e * cfg.d_conv)
    else:
        gn, h = cfg.ngroups * n, cfg.nheads
        per_layer = 2 * (d * (2 * e + 2 * gn + h) + e * d + (e + 2 * gn) * cfg.d_conv)
    per_layer += SCAN_COST[cfg.arch] * state_elements(cfg)  # the scan runs far below the matmul rate
    return tokens * layers * per_layer + 2.0 * head_positions * d * cfg.padded_vocab_size


# ---- the plan ----------------------------------------------------------------------------------------
@dataclass
class StepEstimate:
    """One step's estimated peak resident memory (the whole process), disk use and CPU time."""

    number: int
    name: str
    peak_bytes: int
    disk_bytes: int = 0
    cpu_seconds: float | None = None
    parts: dict[str, int] = field(default_factory=dict)
    """The working set by item (bytes), on top of the baseline."""
    fix: str = ""
    """The option that lowers this step's peak the most (named when it does not fit)."""

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.number, "name": self.name, "peak_mb": round(self.peak_bytes / MiB, 1),
                "disk_mb": round(self.disk_bytes / MiB, 1),
                "cpu_seconds": None if self.cpu_seconds is None else round(self.cpu_seconds, 1),
                "parts_mb": {k: round(v / MiB, 1) for k, v in self.parts.items()}}


@dataclass
class PlanInputs:
    """What the estimators read: the config, the model's dimensions and what the run will do."""

    config: Any
    cfg: Any  # MambaConfig
    layers: tuple[int, ...]
    options: dict[int, Any]
    sequences: int
    seq_len: int
    datasets: int
    """Datasets step 1 evaluates (prompt sets of a language model)."""
    heldout: bool
    """Step 1 provides held-out sequences (steps 3, 4 collect activations of them)."""
    baseline: int
    available: int | None
    store: str
    flops: float
    """Matmul rate of this process, FLOP/s."""

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(self.config.hooks)

    @property
    def held_activations(self) -> int:
        """Bytes of step 2's activations that later steps hold in memory (0 with the disk store)."""
        nbytes = activation_bytes(self.cfg, self.hooks, self.layers, self.sequences, self.seq_len)
        return nbytes if self.store == "memory" else 0

    def seconds(self, flops: float) -> float:
        return flops / self.flops


Estimator = Callable[[PlanInputs], StepEstimate]
ESTIMATORS: dict[int, Estimator] = {}


def register_estimator(number: int) -> Callable[[Estimator], Estimator]:
    """Register the memory/time estimator of step ``number`` (``fn(PlanInputs) -> StepEstimate``)."""

    def deco(fn: Estimator) -> Estimator:
        ESTIMATORS[number] = fn
        return fn

    return deco


def _estimate(p: PlanInputs, number: int, name: str, parts: dict[str, int], disk: int = 0,
              cpu: float | None = None, fix: str = "", phases: Sequence[Sequence[str]] = ()) -> StepEstimate:
    """The peak is the baseline plus every part, except that the parts named in ``phases`` are alive only during
    their phase (the phases run one after another): of those, only the largest phase's sum counts."""
    parts = {k: int(v) for k, v in parts.items() if v}
    phased = {k for phase in phases for k in phase}
    peak = sum(v for k, v in parts.items() if k not in phased)
    peak += max((sum(parts.get(k, 0) for k in phase) for phase in phases), default=0)
    return StepEstimate(number, name, p.baseline + peak, disk, cpu, parts, fix)


def generic(p: PlanInputs, number: int, name: str) -> StepEstimate:
    """A step that runs forward passes of one batch and scores the logits at its positions."""
    b = min(p.config.batch_size, p.sequences)
    parts = {"step 2 activations held": p.held_activations, "forward pass": forward_bytes(p.cfg, b, p.seq_len),
             "logits": logits_bytes(p.cfg, b * p.seq_len)}
    return _estimate(p, number, name, parts, fix="--batch-size")


@register_estimator(0)
def _setup(p: PlanInputs) -> StepEstimate:
    from mamba_interp.pipeline.steps.s00_setup import CHECK_BATCH, CHECK_LEN

    tokens = CHECK_BATCH * CHECK_LEN
    every_hook = sum(hook_width(p.cfg, h) for h in ("resid_pre", "norm", "in_x", "in_z", "conv", "x", "dt", "B",
                                                     "C", "y", "gate", "gated", "out", "resid_post"))
    cache = tokens * p.cfg.n_layer * (every_hook + 2 * state_elements(p.cfg)) * 4
    return _estimate(p, 0, "setup", {"cache of every hook": cache,
                                     "logits": 2 * tokens * p.cfg.padded_vocab_size * 4},
                     cpu=p.seconds(2 * forward_flops(p.cfg, tokens, p.cfg.n_layer, tokens)))


@register_estimator(1)
def _tasks(p: PlanInputs) -> StepEstimate:
    b = min(p.config.batch_size, p.sequences)
    tokens = p.sequences * p.seq_len * p.datasets
    parts = {"forward pass": forward_bytes(p.cfg, b, p.seq_len), "logits": logits_bytes(p.cfg, b * p.seq_len),
             "datasets": 3 * 8 * tokens}
    return _estimate(p, 1, "tasks", parts, cpu=p.seconds(forward_flops(p.cfg, tokens, p.cfg.n_layer, tokens)),
                     fix="--batch-size")


@register_estimator(2)
def _activations(p: PlanInputs) -> StepEstimate:
    from mamba_interp.pipeline.activation_stats import CHUNK_BYTES, QUANTILE_TOKENS

    b = collection_batch(p.cfg, p.seq_len, p.hooks, min(p.config.batch_size, p.sequences))
    total = activation_bytes(p.cfg, p.hooks, p.layers, p.sequences, p.seq_len)
    widest = max(hook_width(p.cfg, h) for h in p.hooks)
    batch_out = activation_bytes(p.cfg, p.hooks, p.layers, b, p.seq_len)
    dt_width = hook_width(p.cfg, "dt") if "dt" in p.hooks else 0
    tokens = p.sequences * p.seq_len
    parts = {
        "activations" if p.store == "memory" else "one batch of activations": total if p.store == "memory"
        else batch_out,
        "forward pass": forward_bytes(p.cfg, b, p.seq_len, states="state_norm" in p.hooks),
        "statistics chunk (float64)": 5 * 2 * CHUNK_BYTES + 8 * widest * 16,
        "Δ quantile sample": 3 * 8 * min(tokens, QUANTILE_TOKENS) * dt_width,
    }
    disk = total if (p.store == "disk" or p.config.save_activations) else 0
    stop = max(p.layers) + 1
    cpu = p.seconds(forward_flops(p.cfg, tokens, stop)) + total / 4 / 5e7  # statistics: ~5e7 entries/s
    return _estimate(p, 2, "activations", parts, disk, cpu, fix="--batch-size")


@register_estimator(3)
def _sae(p: PlanInputs) -> StepEstimate:
    from mamba_interp.pipeline.datasets import budget_sequences
    from mamba_interp.pipeline.sae_support import CONSTANT_ABLATION_HOOKS
    from mamba_interp.pipeline.steps.s03_sae import Options

    opts = p.options.get(3) or Options()
    layers = opts.layers if opts.layers is not None else p.layers
    widths = [hook_width(p.cfg, h) for h in opts.hooks]
    n_eval = p.sequences if p.heldout else max(1, round(opts.eval_fraction * p.sequences))
    n_train = p.sequences - (0 if p.heldout else n_eval)
    tok_train, tok_eval = n_train * p.seq_len, n_eval * p.seq_len
    widest = max(widths)
    buffer_rows = min(tok_train, shuffle_rows(opts, widest))
    m = opts.expansion * widest
    b = min(p.config.batch_size, n_eval)
    parts = {
        "step 2 activations held": p.held_activations,
        "held-out activations": (activation_bytes(p.cfg, opts.hooks, layers, n_eval, p.seq_len)
                                 if p.heldout and p.store == "memory" else 0),
        "training rows (shuffle buffer)": 2 * buffer_rows * widest * 4,
        "held-out rows": 2 * tok_eval * widest * 4,
        # one SAE's latents at a time (HeldOutLatents), and their [N_eval, m] live-latent mask (bool)
        "latents of the held-out tokens (one SAE)": tok_eval * m * 5,
        # sae_metrics / encode_activations: pre-activations, the top-k output, x̂ and its float64 sums per batch
        "evaluation batch": 5 * min(EVAL_BATCH, tok_eval) * m * 4,
        "SAE, Adam, batch": 4 * 4 * (2 * widest * m) + 12 * opts.batch_size * m * 4,
        "loss passes": forward_bytes(p.cfg, b, p.seq_len) + logits_bytes(p.cfg, b * p.seq_len),
        # the residual stream entering each SAE layer, and the clean final-normed one
        "layer inputs (cached)": (len(layers) + 1) * n_eval * p.seq_len * p.cfg.d_model * 4,
    }
    # one after another per SAE: training, evaluation (metrics, latents, correlations), the loss passes; then the
    # dashboards, which re-encode one SAE's latents beside their passes
    phases = [("training rows (shuffle buffer)", "SAE, Adam, batch"),
              ("evaluation batch", "latents of the held-out tokens (one SAE)"), ("loss passes",)]
    last, first = p.cfg.n_layer, min(layers)
    n_sub = budget_sequences(opts.dashboard_sequences, opts.dashboard_tokens, p.seq_len, n_eval)
    if opts.dashboards:
        latents = [opts.expansion * w for w in widths] * len(layers)
        micro = attribution_batch(p.cfg, last - first, p.seq_len, latents, min(p.config.batch_size, n_sub))
        parts["attribution pass"] = (attribution_graph_bytes(p.cfg, last - first, p.seq_len, micro, latents)
                                     + ATTRIBUTION_LOGIT_COPIES * ATTRIBUTION_LOGIT_CHUNK * p.cfg.padded_vocab_size
                                     * 4)
        phases += [("latents of the held-out tokens (one SAE)", "attribution pass"),
                   ("latents of the held-out tokens (one SAE)", "loss passes")]
    train_flops = sum(math.ceil(opts.epochs * tok_train / opts.batch_size) * opts.batch_size * 2 * w
                      * opts.expansion * w * 8 for w in widths) * len(layers)
    # every pass starts at its SAE's layer from the cached inputs: the clean one, then zero / mean / spliced per SAE
    # (a residual-stream hook's zero and mean ablations take one sequence: sae_support.constant_ablation_loss)
    per_layer = sum(1 if h in CONSTANT_ABLATION_HOOKS else 3 for h in opts.hooks)
    passes = forward_flops(p.cfg, tok_eval, last - first, tok_eval) + sum(
        forward_flops(p.cfg, tok_eval, i, 0) + per_layer * forward_flops(p.cfg, tok_eval, last - i, tok_eval)
        for i in layers)
    if opts.dashboards:  # attribution (forward and backward: ~3 passes), one ablated pass per SAE
        tok_sub = n_sub * p.seq_len
        passes += 3 * forward_flops(p.cfg, tok_sub, last - first, tok_sub) + len(widths) * sum(
            forward_flops(p.cfg, tok_sub, last - i, tok_sub) for i in layers)
    collect = forward_flops(p.cfg, tok_eval, max(layers) + 1) if p.heldout else 0.0
    disk = (activation_bytes(p.cfg, opts.hooks, layers, n_eval, p.seq_len) if p.heldout and p.store == "disk"
            else 0) + sum(2 * w * opts.expansion * w * 4 for w in widths) * len(layers)
    return _estimate(p, 3, "sae", parts, disk, p.seconds(train_flops + passes + collect), fix="--samples",
                     phases=phases)


AMNESIC_VARIABLES = 4
"""Step 4's estimate assumes this many amnesic tests (one per probed variable; the variables are known only once
step 1's data exist): a language model's token, previous token and position, plus one task variable."""


@register_estimator(4)
def _probes(p: PlanInputs) -> StepEstimate:
    from mamba_interp.pipeline.datasets import budget_sequences
    from mamba_interp.pipeline.steps.s04_probes import Options

    opts = p.options.get(4) or Options()
    hooks = [h for h in (opts.hooks or p.hooks) if h != "state_norm"]
    b = min(p.config.batch_size, p.sequences)
    widest = max((hook_width(p.cfg, h) for h in hooks), default=p.cfg.d_model)
    n_amnesic = (budget_sequences(opts.amnesic_sequences, opts.amnesic_tokens, p.seq_len, p.sequences)
                 if opts.amnesic else 0)
    first = min(p.layers)
    parts = {
        "step 2 activations held": p.held_activations,
        # a state probe reads hook_ssm_state of one layer: the forward pass materialises [b, l, state]
        "forward pass": forward_bytes(p.cfg, collection_batch(p.cfg, p.seq_len, ("state_norm",), b), p.seq_len,
                                      states=True),
        "logits": logits_bytes(p.cfg, b * p.seq_len),
        # the probed tokens' activations as float64 (and one copy), and their SSM states as float32
        "probe features (float64)": 2 * 8 * opts.max_tokens * widest,
        "states of the probed tokens": 4 * opts.state_max_tokens * state_elements(p.cfg),
        "layer inputs (cached)": n_amnesic * p.seq_len * p.cfg.d_model * 4,
    }
    tokens, tok_amnesic = p.sequences * p.seq_len, n_amnesic * p.seq_len
    flops = forward_flops(p.cfg, tokens, max(p.layers) + 1)  # the state probes' passes
    if n_amnesic:  # the cached inputs, the clean run, then an erased and a control run per variable
        flops += forward_flops(p.cfg, tok_amnesic, first) + (1 + 2 * AMNESIC_VARIABLES) * forward_flops(
            p.cfg, tok_amnesic, p.cfg.n_layer - first, tok_amnesic)
    return _estimate(p, 4, "probes", parts, cpu=p.seconds(flops), fix="--batch-size")


def shuffle_rows(opts: Any, width: int) -> int:
    """Rows of the SAE shuffle buffer: ``shuffle_buffer_mb`` of float32 rows of ``width``."""
    return max(1, int(getattr(opts, "shuffle_buffer_mb", 512) * MiB // (4 * width)))


@dataclass
class MemoryPlan:
    """Estimates of every planned step, and what the machine offers."""

    steps: list[StepEstimate]
    baseline_bytes: int
    available_bytes: int | None
    disk_free_bytes: int | None
    store: str
    activation_bytes: int
    device: str
    flops: float
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> StepEstimate:
        return max(self.steps, key=lambda s: s.peak_bytes)

    @property
    def disk_bytes(self) -> int:
        return sum(s.disk_bytes for s in self.steps)

    def problems(self) -> list[str]:
        """One-line reasons the run cannot fit (empty when it fits or the machine's limits are unknown)."""
        out = []
        if self.available_bytes is not None:
            limit = SAFETY * self.available_bytes
            for s in self.steps:
                if s.peak_bytes > limit:
                    item = max(s.parts, key=s.parts.get) if s.parts else "baseline"
                    out.append(f"step {s.number} ({s.name}) needs about {_fmt(s.peak_bytes)} at its peak "
                               f"({item}: {_fmt(s.parts.get(item, 0))}) but {_fmt(self.available_bytes)} of "
                               f"{'GPU ' if self.device.startswith('cuda') else ''}memory is available; "
                               f"{_advice(s, item)}")
        if self.disk_free_bytes is not None and self.disk_bytes > SAFETY * self.disk_free_bytes:
            out.append(f"the run needs about {_fmt(self.disk_bytes)} of disk (activations) but "
                       f"{_fmt(self.disk_free_bytes)} is free; lower --samples, --layer or --hooks (or pass "
                       f"--no-save-activations with a run that fits in memory)")
        return out

    def format(self) -> str:
        avail = "unknown" if self.available_bytes is None else _fmt(self.available_bytes)
        disk = "unknown" if self.disk_free_bytes is None else _fmt(self.disk_free_bytes)
        lines = [f"memory plan: baseline {_fmt(self.baseline_bytes)} (process with the model loaded); available "
                 f"{avail}; activations {_fmt(self.activation_bytes)} held {'in memory' if self.store == 'memory' else 'on disk'}; "
                 f"disk free {disk}",
                 f"  {'step':<18} {'peak':>9} {'disk':>9} {'time':>10}  largest item"]
        for s in self.steps:
            item = max(s.parts, key=s.parts.get) if s.parts else ""
            cpu = "" if s.cpu_seconds is None else _fmt_time(s.cpu_seconds)
            lines.append(f"  {s.number:>2} {s.name:<15} {_fmt(s.peak_bytes):>9} {_fmt(s.disk_bytes):>9} {cpu:>10}  "
                         + (f"{item} {_fmt(s.parts[item])}" if item else ""))
        total = sum(s.cpu_seconds or 0 for s in self.steps)
        lines.append(f"  time (wall clock on this run's threads) at the measured {self.flops / 1e9:.0f} GFLOP/s matmul "
                     f"rate: about {_fmt_time(total)} in all (indicative, ±2x)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"baseline_mb": round(self.baseline_bytes / MiB, 1),
                "available_mb": None if self.available_bytes is None else round(self.available_bytes / MiB, 1),
                "disk_free_mb": None if self.disk_free_bytes is None else round(self.disk_free_bytes / MiB, 1),
                "store": self.store, "activation_mb": round(self.activation_bytes / MiB, 1), "device": self.device,
                "gflops": round(self.flops / 1e9, 1), "steps": [s.to_dict() for s in self.steps],
                "notes": self.notes}


FIXES = {
    "forward pass": "lower --batch-size (the forward pass scales with it) or --seq-len",
    "logits": "lower --batch-size",
    "datasets": "lower --samples or --seq-len",
    "activations": "use --activation-store disk (or auto), or lower --samples, --layer or --hooks",
    "step 2 activations held": "use --activation-store disk (or auto), or lower --samples, --layer or --hooks",
    "held-out activations": "use --activation-store disk (or auto), or lower --samples",
    "one batch of activations": "lower --batch-size, --layer or --hooks",
    "latents of the held-out tokens (one SAE)": "lower --samples, or the SAE hooks / expansion "
                                                "(--option sae.hooks=resid_post, --option sae.expansion=2)",
    "loss passes": "lower --batch-size",
    "layer inputs (cached)": "lower --samples or --seq-len",
    "attribution pass": "lower --seq-len, or turn the feature dashboards off (--option sae.dashboards=0)",
    "probe features (float64)": "lower --option probes.max_tokens",
    "states of the probed tokens": "lower --option probes.state_max_tokens",
    "training rows (shuffle buffer)": "lower --option sae.shuffle_buffer_mb",
    "held-out rows": "lower --samples",
    "SAE, Adam, batch": "lower --option sae.expansion or sae.batch_size",
    "evaluation batch": "lower the SAE hooks / expansion (--option sae.hooks=resid_post, --option sae.expansion=2)",
}
"""The option that shrinks each item of a step's working set (named when a step does not fit)."""


def _advice(s: StepEstimate, item: str) -> str:
    if item in FIXES:
        return FIXES[item]
    return "lower --batch-size or --samples" if not s.fix else f"lower {s.fix}"


def _fmt(nbytes: float) -> str:
    for unit, size in (("TB", 2**40), ("GB", GiB), ("MB", MiB)):
        if nbytes >= size or unit == "MB":
            return f"{nbytes / size:.1f} {unit}" if unit != "MB" else f"{nbytes / size:.0f} MB"
    return f"{nbytes} B"


def _fmt_time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def sequence_count(config: Any, source: Any) -> tuple[int, int, int, bool]:
    """(sequences, seq_len, datasets step 1 evaluates, held-out sequences?) of a run, without building them."""
    from mamba_interp.pipeline.datasets import DEFAULT_LM_LEN

    params = getattr(source, "task_params", None) or {}
    seq_len = config.seq_len or params.get("seq_len") or DEFAULT_LM_LEN
    if config.corpus:
        sequences = config.samples if config.tokens is None else max(1, config.tokens // seq_len)
        return sequences, seq_len, 3, False
    datasets = 1 if source.task is not None else 3
    return config.samples, seq_len, datasets, True


def make_plan(config: Any, source: Any, layers: tuple[int, ...], planned: Sequence[int], options: dict[int, Any],
              device: Any, out_dir: str | Path) -> MemoryPlan:
    """The plan of a prepared run (model loaded, nothing computed yet)."""
    from mamba_interp.pipeline.registry import get_step

    cfg = source.model.cfg
    sequences, seq_len, datasets, heldout = sequence_count(config, source)
    available = available_memory(device)
    nbytes = activation_bytes(cfg, config.hooks, layers, sequences, seq_len)
    store = decide_store(config.activation_store, nbytes, available)
    baseline = current_rss() or 0
    if getattr(device, "type", str(device)) == "cuda":
        baseline = sum(t.numel() * t.element_size() for t in source.model.parameters())
    inputs = PlanInputs(config, cfg, layers, options, sequences, seq_len, datasets, heldout, baseline, available,
                        store, matmul_rate(device))
    steps = []
    for n in planned:
        step = get_step(n)
        fn = ESTIMATORS.get(n)
        steps.append(fn(inputs) if fn is not None else generic(inputs, n, step.name))
    notes = []
    b2 = collection_batch(cfg, seq_len, config.hooks, min(config.batch_size, sequences))
    if 2 in planned and b2 < min(config.batch_size, sequences):
        notes.append(f"step 2 runs {b2} sequence(s) per forward pass: the state_norm hook materialises the SSM "
                     f"states ({_fmt(STATE_PER_ELEMENT[cfg.arch] * seq_len * state_elements(cfg) * 4)} per "
                     f"sequence)")
    missing = [n for n in planned if n not in ESTIMATORS]
    if missing:
        notes.append(f"steps {', '.join(map(str, missing))} have no estimator of their own: generic estimate (a "
                     f"forward pass of one batch)")
    return MemoryPlan(steps, baseline, available, disk_free(out_dir), store, nbytes, str(device), inputs.flops,
                      notes)
