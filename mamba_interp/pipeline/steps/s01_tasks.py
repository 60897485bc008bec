"""Step 1 (tasks): build the datasets every later step analyses, and score the model on them.

A task model (zoo model, or a folder with a training log/card) gets fresh test-split batches of its task with
ground truth (``mamba_interp.tasks``); a language model gets repeated-random-token sequences (induction on
repeated tokens, Olsson et al. 2022) and, when a tokenizer loads offline, the IOI and factual-recall prompt sets.

Each set is scored against chance (``datasets.score_set``): accuracy, IOI's logit difference IO − S (Wang et al.
2022), factual recall's log p(answer) (Meng et al. 2022), each with a bootstrap CI over prompts. A model above
chance on no set (a random init) gets ``metrics["chance_warning"]`` (a string; null otherwise) at the top of the
reading. With a tokenizer, prompts, answers and predictions are shown as text (``answer=" Mary"``).

Data for later steps (``ctx.data(1)``): ``batch`` (the primary dataset, a ``TaskBatch``), ``sets`` (all by name),
``primary``, ``task`` (the Task object or None), ``heldout`` (fresh sequences of the primary task), ``kind``.
"""

from __future__ import annotations

import numpy as np
import torch

from mamba_interp.models.tokens import to_string, token_label
from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.datasets import batch_tensors, build_datasets, chance_warning, evaluate, score_set
from mamba_interp.pipeline.registry import register_step
from mamba_interp.stats import estimate


def _datasets(ctx: StepContext):
    return build_datasets(ctx.source, ctx.config.samples, ctx.config.seq_len, ctx.seed % (2**31),
                          corpus=ctx.config.corpus, tokens=ctx.config.tokens)


def load(ctx: StepContext) -> dict:
    """Sampling is deterministic in the seed, so a resumed run rebuilds the identical batches."""
    return _datasets(ctx).as_dict()


def _figure(ctx: StepContext, name: str, batch, ev: dict, chance: float | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(16, len(batch))
    tokens = batch.tokens[:rows].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [2.2, 1]}, layout="constrained")
    ax = axes[0]
    im = ax.imshow(tokens, aspect="auto", cmap="viridis", interpolation="nearest")
    scored = batch.eval_mask[:rows].numpy()
    ys, xs = np.nonzero(scored)
    ax.scatter(xs, ys, s=14, facecolors="none", edgecolors="red", linewidths=0.8, label="scored position")
    if batch.attention_mask is not None:
        pad = batch.attention_mask[:rows].numpy() == 0
        ax.imshow(np.ma.masked_where(~pad, pad), aspect="auto", cmap="Greys", alpha=0.6, interpolation="nearest")
    ax.set(title=f"{name}: first {rows} sequences (token ids)", xlabel="position", ylabel="sequence")
    ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax = axes[1]
    ax.hist(ev["p_correct"].numpy(), bins=30, range=(0, 1), color="tab:blue")
    ax.set(title=f"model: accuracy {ev['accuracy']:.3f}", xlabel="p(correct token), mean over scored positions",
           ylabel="sequences")
    if chance is not None:
        ax.axvline(chance, color="grey", ls="--", lw=1, label=f"chance {chance:.3f}")
        ax.legend(fontsize=7)
    return fig


def _by_distance(batch, ev: dict) -> dict | None:
    """Accuracy by how far back the answer lies (tasks whose metadata has ``distance``, e.g. induction)."""
    dist = batch.metadata.get("distance")
    if dist is None or dist.dim() != 1:
        return None
    d = dist.numpy()
    ok = ev["example_correct"].numpy()
    edges = np.unique(np.quantile(d, [0, 0.25, 0.5, 0.75, 1.0]).round().astype(int))
    out = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        last = hi == edges[-1]
        sel = (d >= lo) & ((d <= hi) if last else (d < hi))
        if sel.any():
            out[f"{lo}-{hi if last else hi - 1}"] = float(ok[sel].mean())
    return out


def _examples(tok, batch, ev: dict, n: int = 3) -> list[dict] | None:
    """The first prompts decoded, with the answer and the model's prediction named by their text."""
    answer = batch.metadata.get("answer")
    if tok is None or not isinstance(answer, torch.Tensor) or answer.dim() != 1:
        return None
    out = []
    for i in range(min(n, len(batch))):
        ids = batch.tokens[i] if batch.attention_mask is None else batch.tokens[i][batch.attention_mask[i].bool()]
        row = {"prompt": to_string(tok, ids), "answer": token_label(tok, answer[i]),
               "prediction": token_label(tok, ev["prediction"][i])}
        if isinstance(batch.metadata.get("wrong"), torch.Tensor):
            row["wrong"] = token_label(tok, batch.metadata["wrong"][i])
        out.append(row)
    return out


def _set_metrics(ctx: StepContext, name: str, batch, ev: dict, score, tok) -> dict:
    m = {
        "sequences": len(batch),
        "seq_len": batch.seq_len,
        "scored_positions": ev["scored_positions"],
        "accuracy": ev["accuracy"],
        "loss": ev["loss"],
        "example_accuracy": float(ev["example_correct"].float().mean()),
        "padded": batch.attention_mask is not None,
        "score": score.to_dict(),
    }
    if "logit_diff" in ev["scores"]:  # IOI: the IO − S logit difference, and how often IO beats S
        ld = ev["scores"]["logit_diff"]
        m["logit_diff"] = estimate(ld, seed=ctx.seed).to_dict()
        m["io_over_s"] = estimate((ld > 0).double(), seed=ctx.seed).to_dict()
    if name == "factual_recall":
        m["answer_logprob"] = estimate(ev["logprob"], seed=ctx.seed).to_dict()
    examples = _examples(tok, batch, ev)
    if examples:
        m["examples"] = examples
    return m


def _lm_reading(sets_metrics: dict, scores: dict, notes: list[str]) -> str:
    parts = []
    for n, m in sets_metrics.items():
        sc = scores[n]
        extra = f", accuracy {m['accuracy']:.3f}" if sc.name != "accuracy" else ""
        if "io_over_s" in m:
            extra += f", IO above S in {m['io_over_s']['value']:.0%} of prompts"
        parts.append(f"{n}: {sc}{extra} on {m['sequences']} prompts")
    reading = (
        f"Language-model prompt sets ({'; '.join(parts)}; 95% bootstrap CIs over prompts). On repeated random "
        "tokens, copying from the first copy is the only way to predict the second, so high accuracy there means "
        "working induction."
    )
    ex = next((m["examples"][0] for m in sets_metrics.values() if m.get("examples")), None)
    if ex is not None:
        reading += f" For example, {ex['prompt']!r} → answer {ex['answer']}, the model predicts {ex['prediction']}."
    if notes:
        reading += " " + " ".join(notes) + "."
    return reading


@register_step(1, "tasks", requires=(0,), title="Datasets: task batches with ground truth, or prompt sets", load=load,
               reads=("samples", "seq_len", "batch_size", "figures", "corpus", "tokens"), version=2)
def run(ctx: StepContext) -> StepResult:
    ds = _datasets(ctx)
    chance = getattr(ds.task, "chance", None) if ds.kind == "task" else None
    tok = ctx.source.tokenizer() if ds.kind == "lm" else None
    vocab = ctx.model.cfg.vocab_size
    sets_metrics: dict[str, dict] = {}
    scores = {}
    for name, batch in ds.sets.items():
        task = ds.tasks.get(name)
        scorers = {"logit_diff": task.logit_diff} if hasattr(task, "logit_diff") else None
        ev = evaluate(ctx.model, batch, ctx.batch_size, progress=lambda it, n=name: ctx.progress(it, desc=n),
                      scorers=scorers)
        scores[name] = score_set(name, task, ev, vocab, seed=ctx.seed)
        tensors, meta = batch_tensors(batch)
        if tok is not None and isinstance(batch.metadata.get("answer"), torch.Tensor) \
                and batch.metadata["answer"].dim() == 1:
            meta["answer_label"] = [token_label(tok, a) for a in batch.metadata["answer"]]
        ctx.save_tensors(f"dataset_{name}", tensors)
        ctx.save_json(f"dataset_{name}_metadata", meta)
        m = _set_metrics(ctx, name, batch, ev, scores[name], tok)
        if name == ds.primary:
            by_dist = _by_distance(batch, ev)
            if by_dist:
                m["accuracy_by_distance"] = by_dist
            if ctx.config.figures:
                ctx.save_figure(_figure(ctx, name, batch, ev, chance), f"dataset_{name}")
        sets_metrics[name] = m
    primary = sets_metrics[ds.primary]
    card_acc = ctx.source.card.get("accuracy") if ctx.source.card else None
    warning = chance_warning(scores)
    metrics = {
        "kind": ds.kind,
        "primary": ds.primary,
        "task": ctx.source.task,
        "task_params": getattr(ds.task, "params", None) if ds.task is not None else None,
        "chance": chance,
        "card_accuracy": card_acc,
        "datasets": sets_metrics,
        "notes": ds.notes,
        "data": f"corpus {ctx.config.corpus}" if ds.primary == "corpus" else f"synthetic ({ds.primary})",
        "chance_warning": warning,
    }
    if ds.heldout is not None:
        metrics["heldout_sequences"] = len(ds.heldout)
    if ds.kind == "task":
        vs_card = ""
        if isinstance(card_acc, (int, float)):
            vs_card = f" (its card reports {card_acc:.3f})"
        verdict = ("solves it" if chance is not None and primary["accuracy"] > 0.9 else
                   "is above chance on it" if scores[ds.primary].above_chance else
                   "does not solve it")
        reading = (
            f"{primary['sequences']} fresh test sequences of the {ds.primary!r} task (length {primary['seq_len']}, "
            f"{primary['scored_positions']} scored positions) with ground-truth metadata. The model {verdict}: "
            f"accuracy {primary['accuracy']:.3f}{vs_card}"
            + (f" against chance {chance:.3f}" if chance is not None else "")
            + f", loss {primary['loss']:.3f}; per-sequence {scores[ds.primary]}."
        )
        if isinstance(card_acc, (int, float)) and primary["accuracy"] < card_acc - 0.05:
            reading += (" That is well below the card's accuracy: check that the model and the task parameters "
                        "belong together (or the sample is small).")
        by_dist = primary.get("accuracy_by_distance") or {}
        if by_dist and max(by_dist.values()) - min(by_dist.values()) > 0.05:
            worst = min(by_dist.items(), key=lambda kv: kv[1])
            best = max(by_dist.items(), key=lambda kv: kv[1])
            reading += (f" Per-sequence accuracy depends on how far back the answer lies: {worst[1]:.3f} at "
                        f"{worst[0]} tokens, {best[1]:.3f} at {best[0]}.")
    else:
        reading = _lm_reading(sets_metrics, scores, ds.notes)
        if ds.primary == "corpus":
            c = sets_metrics["corpus"]
            reading = (f"Later steps analyse natural text from the corpus: {c['sequences']} windows of "
                       f"{c['seq_len']} tokens, next-token accuracy {c['accuracy']:.3f}, loss {c['loss']:.3f}. "
                       + reading)
    if warning:  # the numbers follow in the reading; the metric holds them too, for the report's banner
        reading = ("Warning: no dataset is above chance, so the model behaves like an untrained one and later steps "
                   "describe its random weights. " + reading)
    return StepResult(metrics=metrics, reading=reading, data=ds.as_dict())
