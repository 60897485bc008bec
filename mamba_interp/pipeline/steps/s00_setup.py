"""Step 0 (setup): seeding, device, instrumentation check, manifest.

The runner has already seeded every RNG, chosen the device and written ``manifest.json``; this step checks the
instrumentation the later steps rely on: every hook point of docs/hooks.md fires with its documented shape, and
caching every activation (the lazily computed ``hook_dA``/``hook_ssm_state`` included) leaves the logits
unchanged. Caching the states takes the materialised scan, which is the reference recurrence, so the cached logits
are compared with the logits of the plain model on the reference scan (equal up to rounding, in practice bit for
bit); the fast scan's own distance from the reference is reported beside it (``scan_logit_rel_diff``). Both are
rounding, which a deep model amplifies (a 24-layer random-init Mamba-1 turns float32 rounding into ~5e-5 relative
logit changes), so each bound is at least 10x the model's own rounding floor: the logit change when the embedding
is perturbed by float32's unit roundoff (``rounding_floor``). Its metrics open with a compact model summary (architecture, sizes, task, the card's accuracy); the
whole card (training config, evaluation, command, ...) goes to ``model_card.json``.
"""

from __future__ import annotations

import torch

from mamba_interp.pipeline.context import StepContext, StepResult
from mamba_interp.pipeline.registry import register_step

CHECK_BATCH, CHECK_LEN = 2, 12
CARD_FILE = "model_card"
SUMMARY_FIELDS = ("name", "kind", "spec", "path", "arch", "n_layer", "d_model", "d_inner", "d_state", "vocab_size",
                  "n_params", "task", "task_params")
# relative; cached vs plain logits, both on the reference recurrence
LOGIT_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}
# relative; the fast scan vs the reference recurrence: rounding, amplified by depth (a broken scan is off by O(1))
SCAN_TOLERANCE = {"float32": 1e-2, "bfloat16": 2e-1, "float16": 1e-1}
FLOOR_FACTOR = 10.0


def model_summary(describe: dict, fingerprint: str, card_file: str) -> dict:
    """The model in a few fields (``ModelSource.describe()`` without the card, plus the card's accuracy)."""
    card = describe.get("card") or {}
    out = {k: describe.get(k) for k in SUMMARY_FIELDS}
    out["fingerprint"] = fingerprint
    if card.get("accuracy") is not None:
        out["card_accuracy"] = card["accuracy"]
    if card.get("description"):
        out["description"] = card["description"]
    out["card_file"] = card_file or None
    return out


def expected_shapes(cfg, b: int, l: int) -> dict[str, tuple[int, ...]]:
    """Hook name -> shape from docs/hooks.md for a [b, l] input."""
    d, e, n = cfg.d_model, cfg.d_inner, cfg.d_state
    out: dict[str, tuple[int, ...]] = {"hook_embed": (b, l, d)}
    if cfg.arch == "mamba1":
        mixer = {"in_x": (b, l, e), "in_z": (b, l, e), "conv_state": (b, cfg.d_conv - 1, e), "conv": (b, l, e),
                 "x": (b, l, e),
                 "dt_low": (b, l, cfg.dt_rank_value), "dt": (b, l, e), "B": (b, l, n), "C": (b, l, n),
                 "dA": (b, l, e, n), "h0": (b, e, n), "ssm_state": (b, l, e, n), "y": (b, l, e),
                 "gate": (b, l, e), "gated": (b, l, e), "out": (b, l, d)}
    else:
        h, p, g = cfg.nheads, cfg.headdim, cfg.ngroups
        xbc = e + 2 * g * n
        mixer = {"in_x": (b, l, xbc), "in_z": (b, l, e), "conv_state": (b, cfg.d_conv - 1, xbc),
                 "conv": (b, l, xbc), "x": (b, l, h, p),
                 "dt": (b, l, h), "B": (b, l, g, n), "C": (b, l, g, n), "dA": (b, l, h), "h0": (b, h, p, n),
                 "ssm_state": (b, l, h, p, n), "y": (b, l, h, p), "gate": (b, l, e), "gated": (b, l, e),
                 "out": (b, l, d)}
    for i in range(cfg.n_layer):
        out[f"blocks.{i}.hook_resid_pre"] = (b, l, d)
        out[f"blocks.{i}.hook_norm"] = (b, l, d)
        for k, shape in mixer.items():
            out[f"blocks.{i}.mixer.hook_{k}"] = shape
        out[f"blocks.{i}.hook_resid_post"] = (b, l, d)
    out["hook_norm_final"] = (b, l, d)
    return out


def _reference_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, l, v] of the plain model on the reference scan (the recurrence the cache's scan computes)."""
    impl = model.scan_impl
    model.set_scan_impl("reference")
    try:
        return model(tokens)
    finally:
        model.set_scan_impl(impl)


def _rounding_floor(model, tokens: torch.Tensor, plain: torch.Tensor, seed: int) -> float:
    """Largest relative logit change over two draws of a unit-roundoff perturbation of the embeddings."""
    gen = torch.Generator(device=tokens.device).manual_seed(seed + 1)
    eps = torch.finfo(torch.float32).eps / 2

    def jitter(x: torch.Tensor, hook) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=torch.float32).to(x.dtype)
        return x * (1 + eps * noise)

    scale = float(plain.abs().max().clamp(min=1e-12))
    return max(float((model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", jitter)]) - plain).abs().max()) / scale
               for _ in range(2))


@register_step(0, "setup", title="Setup: seeding, device, instrumentation, manifest", load=lambda ctx: {},
               reads=("model", "layers"), version=3)
def run(ctx: StepContext) -> StepResult:
    model, cfg = ctx.model, ctx.model.cfg
    gen = torch.Generator().manual_seed(ctx.seed)
    vocab_lo = 1 if cfg.vocab_size > 1 else 0  # token 0 is padding in the synthetic tasks
    tokens = torch.randint(vocab_lo, cfg.vocab_size, (CHECK_BATCH, CHECK_LEN), generator=gen).to(ctx.device)
    with torch.no_grad():
        plain = model(tokens)
        scans = list(model.last_scans)
        cached, cache = model.run_with_cache(tokens, names_filter=None)
        reference = _reference_logits(model, tokens)
        floor = _rounding_floor(model, tokens, plain, ctx.seed)
    expected = expected_shapes(cfg, CHECK_BATCH, CHECK_LEN)
    fired = set(cache.keys())
    missing = sorted(set(expected) - fired)
    unexpected = sorted(fired - set(expected))
    wrong = {k: [list(cache[k].shape), list(s)] for k, s in expected.items()
             if k in fired and tuple(cache[k].shape) != s}
    scale = float(plain.abs().max().clamp(min=1e-12))
    logit_diff = float((cached - reference).abs().max()) / scale
    scan_diff = float((plain - reference).abs().max()) / scale
    active = [name for name, hp in model.hook_dict.items() if hp.active]
    tol = max(LOGIT_TOLERANCE[ctx.config.dtype], FLOOR_FACTOR * floor)
    scan_tol = max(SCAN_TOLERANCE[ctx.config.dtype], FLOOR_FACTOR * floor)
    ok = not missing and not wrong and not active and logit_diff <= tol and scan_diff <= scan_tol
    ctx.save_json("hook_shapes", {k: list(v.shape) for k, v in cache.items()})
    describe = ctx.source.describe()
    card_file = ctx.save_json(CARD_FILE, describe["card"]).name if describe.get("card") else ""
    metrics = {
        "model": model_summary(describe, model.fingerprint(), card_file),
        "device": str(ctx.device),
        "dtype": ctx.config.dtype,
        "seed": ctx.config.seed,
        "layers": list(ctx.layers),
        "scans": scans,
        "hook_points": len(model.hook_dict),
        "hooks_fired": len(fired),
        "hooks_missing": missing,
        "hooks_unexpected": unexpected,
        "hooks_wrong_shape": wrong,
        "hooks_left_attached": active,
        "cache_logit_rel_diff": logit_diff,
        "scan_logit_rel_diff": scan_diff,
        "rounding_floor": floor,
        "logit_tolerance": tol,
        "instrumentation_ok": ok,
    }
    if not ok:
        problems = []
        if missing:
            problems.append(f"{len(missing)} hook(s) never fired (e.g. {missing[0]})")
        if wrong:
            name = next(iter(wrong))
            problems.append(f"{len(wrong)} hook(s) have the wrong shape (e.g. {name}: {wrong[name][0]} "
                            f"vs {wrong[name][1]})")
        if active:
            problems.append(f"{len(active)} hook(s) stayed attached")
        if logit_diff > tol:
            problems.append(f"caching changed the logits by {logit_diff:.2e} (relative; bound {tol:.1e})")
        if scan_diff > scan_tol:
            problems.append(f"the {', '.join(sorted(set(scans)))} scan differs from the reference recurrence by "
                            f"{scan_diff:.2e} (relative logits; run with scan_impl='reference' to compare)")
        raise RuntimeError("instrumentation check failed: " + "; ".join(problems))
    desc = metrics["model"]
    task = (f", trained on {desc['task']}" + (f" to accuracy {desc['card_accuracy']:.3f}"
                                              if isinstance(desc.get("card_accuracy"), (int, float)) else "")
            if desc.get("task") else "")
    reading = (
        f"Model {desc['name']!r} ({desc['arch']}, {desc['n_layer']} layers, d_model {desc['d_model']}, "
        f"{desc['n_params']:,} parameters{task}, fingerprint {desc['fingerprint']}) runs on {ctx.device} in "
        f"{ctx.config.dtype} with the {', '.join(sorted(set(scans)))} scan. All {len(fired)} hook points fired with "
        f"the documented shapes, and caching every activation changed the logits by {logit_diff:.1e} "
        f"(relative, against the reference recurrence), so the hooks are transparent; the fast scan is "
        f"{scan_diff:.1e} from the reference (rounding). Analysed layers: {', '.join(map(str, ctx.layers))}; "
        f"seed {ctx.config.seed}."
    )
    return StepResult(metrics=metrics, reading=reading)
