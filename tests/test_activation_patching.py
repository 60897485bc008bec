"""activation_patching: sweeps equal hand-written hook loops (both architectures, every hook, both directions), state
semantics equal step loops, AtP equals autograd's first-order term, transformers' MambaForCausalLM gives the same
residual-patching effects, ablations, streaming memory, metrics and the result object."""

from __future__ import annotations

import json

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.activation_patching import (
    ablate,
    attribution_patch,
    base_run,
    correct,
    custom_metric,
    derangement,
    kl_to_clean,
    logit_diff,
    logprob,
    patch_sweep,
    patched_metric,
    Patch,
)
from mamba_interp.activation_patching.engine import hook_shapes
from mamba_interp.activation_patching.sites import flat_features, resolve_hooks
from tests.models.helpers import perturb

V, B, L = 13, 4, 12
CFGS = {
    "mamba1": MambaConfig(arch="mamba1", d_model=16, n_layer=2, vocab_size=V, d_state=4),
    "mamba2": MambaConfig(arch="mamba2", d_model=16, n_layer=2, vocab_size=V, d_state=4, headdim=8, ngroups=2),
}
ALL_HOOKS = ["resid_pre", "norm", "in_x", "in_z", "conv", "x", "dt_low", "dt", "B", "C", "dA", "ssm_state", "y",
             "gate", "gated", "out", "resid_post", "embed", "norm_final"]


def _model(arch: str) -> HookedMamba:
    torch.manual_seed(0)
    m = HookedMamba(CFGS[arch])
    perturb(m, seed=1, scale=0.5)
    return m.eval()


@pytest.fixture(scope="module", params=list(CFGS))
def setup(request):
    model = _model(request.param)
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, V, (B, L), generator=g)
    corrupt = clean.clone()
    flip = torch.randint(2, L - 4, (B,), generator=g)  # one corrupted token per example, at a different position
    corrupt[torch.arange(B), flip] = (clean[torch.arange(B), flip] + 1 + torch.randint(0, V - 1, (B,), generator=g)) % V
    answer = torch.randint(0, V, (B,), generator=g)
    wrong = (answer + 1) % V
    classes = {"flip": flip, "after": flip + 2, "last": torch.full((B,), L - 1)}
    return model, clean, corrupt, logit_diff(answer, wrong), classes


def _hook_names(model):
    hooks = [h for h in ALL_HOOKS if not (h == "dt_low" and model.cfg.arch == "mamba2")]
    return resolve_hooks(model, hooks)


def _hand_sweep(model, clean, corrupt, metric, names, masks, direction, channel=None):
    """The reference: one full forward per site, a plain hook writing the source values (torch.where)."""
    src_ids, dst_ids = (clean, corrupt) if direction == "denoise" else (corrupt, clean)
    with torch.no_grad():
        lc, cc = model.run_with_cache(clean)
        lk, _ = model.run_with_cache(corrupt)
        _, src = model.run_with_cache(src_ids)
        mc, mk = metric(lc).double(), metric(lk).double()
        out = {}
        for name in names:
            rows = []
            for mask in masks:
                def hook(x, hook, mask=mask, name=name):
                    sel = mask.view(*mask.shape, *([1] * (x.dim() - 2))).expand_as(x).clone()
                    if channel is not None:
                        keep = torch.zeros_like(sel)
                        keep[:, :, channel] = True
                        sel &= keep
                    return torch.where(sel, src[name], x)

                mp = metric(model.run_with_hooks(dst_ids, fwd_hooks=[(name, hook)])).double()
                den = mc.mean() - mk.mean()
                rows.append((mp - mk.mean()) / den if direction == "denoise" else (mc.mean() - mp) / den)
            out[name] = torch.stack(rows, 1)
    return out


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_patch_sweep_equals_hand_written_loop(setup, direction):
    model, clean, corrupt, metric, classes = setup
    names = _hook_names(model)
    classes = {k: classes[k] for k in ("after", "last")}
    res = patch_sweep(model, clean, corrupt, metric, hooks=names, positions=classes, direction=direction)
    ref = _hand_sweep(model, clean, corrupt, metric, names, [torch.zeros(B, L, dtype=torch.bool).scatter_(
        1, v[:, None], True) for v in classes.values()], direction)
    assert res.positions == list(classes)
    for name in names:
        assert torch.allclose(res.per_example[name].double(), ref[name], atol=2e-5), name
        assert torch.allclose(res.effect[name].double(), ref[name].mean(0), atol=2e-5), name
    assert res.meta["windowed"]  # position suffixes were used
    assert res.meta["forwards"] < len(names) * len(classes)  # unchanged examples / sites were skipped


def test_absolute_positions_and_per_channel(setup):
    model, clean, corrupt, metric, _ = setup
    name = "blocks.1.mixer.hook_x"
    res = patch_sweep(model, clean, corrupt, metric, hooks=[name], positions=[5, -1], per_channel=True)
    masks = [torch.zeros(B, L, dtype=torch.bool) for _ in range(2)]
    masks[0][:, 5] = masks[1][:, L - 1] = True
    for c in (0, 3):
        ref = _hand_sweep(model, clean, corrupt, metric, [name], masks, "denoise", channel=c)[name]
        assert torch.allclose(res.per_example[name][:, :, c].double(), ref, atol=2e-5)
    assert res.positions == [5, L - 1] and res.effect[name].shape == (2, hook_shapes(model)[name][0])


def test_attention_mask_and_streaming_give_the_same_effects(setup):
    model, clean, corrupt, metric, classes = setup
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:2, :2] = 0  # left padding on two examples
    names = resolve_hooks(model, ["resid_pre", "y", "ssm_state"])
    a = patch_sweep(model, clean, corrupt, metric, hooks=names, positions=classes, attention_mask=mask)
    b = patch_sweep(model, clean, corrupt, metric, hooks=names, positions=classes, attention_mask=mask, stream=True,
                    window=False, batch_size=4)
    for name in names:
        assert torch.allclose(a.per_example[name], b.per_example[name], atol=2e-5), name
    # streaming holds the two caches of one hook plus the residual stream entering its block, never more
    assert b.meta["streamed"] and not a.meta["streamed"]
    shapes = hook_shapes(model)
    numel = lambda n: B * L * int(torch.tensor(shapes[n]).prod())  # noqa: E731
    bound = max(4 * (2 * numel(n) + numel(f"blocks.{n.split('.')[1]}.hook_resid_pre")) for n in names)
    assert b.meta["peak_cache_bytes"] <= bound < a.meta["peak_cache_bytes"]


def _state_loop_y(model, layer, cache, overwrite):
    """y of ``layer`` from a step loop over cached u, Δ, B, C: h_t = Ā_t h_{t-1} + Δ_t u_t B_t, then
    (h_t, y_state_t) = overwrite(t, h_t): the state carried on and the state read out at t."""
    cfg, mixer = model.cfg, model.blocks[layer].mixer
    u, dt, Bm, Cm = (cache[k, layer].double() for k in ("x", "dt", "B", "C"))
    A = -torch.exp(mixer.A_log.detach().double())
    D = mixer.D.detach().double()
    if cfg.arch == "mamba2":
        k = cfg.nheads // cfg.ngroups
        Bm, Cm = Bm.repeat_interleave(k, 2), Cm.repeat_interleave(k, 2)
    h = torch.zeros(cache["ssm_state", layer].shape[:1] + cache["ssm_state", layer].shape[2:], dtype=torch.float64)
    ys = []
    for t in range(u.shape[1]):
        if cfg.arch == "mamba1":
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * Bm[:, t, None]
        else:
            h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * u[:, t])[..., None] * Bm[:, t, :, None, :]
        h, read = overwrite(t, h)
        if cfg.arch == "mamba1":
            ys.append((read * Cm[:, t, None]).sum(-1) + D * u[:, t])
        else:
            ys.append((read * Cm[:, t, :, None, :]).sum(-1) + D[:, None] * u[:, t])
    return torch.stack(ys, 1)


@pytest.mark.parametrize("mode", ["propagate", "readout"])
def test_state_patch_semantics_equal_step_loops(setup, mode):
    """propagate = a loop that overwrites h_t; readout = y_t from the patched h_t, the recurrence unpatched."""
    model, clean, corrupt, metric, classes = setup
    layer, name = 1, "blocks.1.mixer.hook_ssm_state"
    # not hook_conv_state: asking for it runs the conv from an explicit zero window (equal only to ~1e-8)
    layer_hooks = [f"blocks.1.mixer.hook_{h}" for h in ("x", "dt", "B", "C", "ssm_state", "y")]
    with torch.no_grad():
        _, cc = model.run_with_cache(clean, names_filter=layer_hooks)
        _, ck = model.run_with_cache(corrupt, names_filter=layer_hooks)
    pos = classes["after"]
    mask = torch.zeros(B, L, dtype=torch.bool).scatter_(1, pos[:, None], True)
    chans = [0, 2]
    feats = flat_features(hook_shapes(model)[name], chans)
    src = cc[name].double()

    def overwrite(t, h):
        new = h.clone()
        for i in range(B):
            if int(pos[i]) == t:
                new[i, chans] = src[i, t, chans]
        return (new, new) if mode == "propagate" else (h, new)

    y = _state_loop_y(model, layer, ck, overwrite).float()
    with torch.no_grad():
        ref = metric(model.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.mixer.hook_y", lambda x, hook: y.to(x.dtype))]))
        base = base_run(model, corrupt, metric, [name])
        got = patched_metric(model, base, [Patch(name, mask, cc[name], feats, state_mode=mode)], metric)
    assert torch.allclose(got, ref, atol=2e-5)
    # readout: only y at the patched token changes (every other position of the layer's y is bit-identical)
    if mode == "readout":
        with torch.no_grad():
            from mamba_interp.activation_patching.engine import patch_hooks

            hooks = patch_hooks(model, [Patch(name, mask, cc[name], feats, state_mode=mode)])
            _, patched = model.run_with_cache(corrupt, names_filter="blocks.1.mixer.hook_y", fwd_hooks=hooks)
        same = patched["y", 1] == ck["y", 1]
        assert bool(same.reshape(B, L, -1).all(-1)[~mask].all())


def _first_order(model, clean, corrupt, metric, name, mask, mode):
    """d/dα of the normalised denoising effect at α = 0, by autograd, with the patched entries set to
    a_corrupt + α (a_clean − a_corrupt) (for states: written into a step loop as in the exact patch)."""
    with torch.no_grad():
        lc, cc = model.run_with_cache(clean)
        lk, ck = model.run_with_cache(corrupt)
    den = float(metric(lc).double().mean() - metric(lk).double().mean())
    alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)
    if not name.endswith("hook_ssm_state"):
        delta = (cc[name] - ck[name]).double()

        def hook(x, hook):
            m = mask.view(*mask.shape, *([1] * (x.dim() - 2))).to(torch.float64)
            return (x.double() + alpha * delta * m).to(x.dtype)

        fwd = [(name, hook)]
    else:
        layer = int(name.split(".")[1])
        src, dst = cc[name].double(), ck[name].double()

        def overwrite(t, h):
            m = mask[:, t].view(-1, *([1] * (h.dim() - 1))).double()
            new = h * (1 - m) + m * (dst[:, t] + alpha * (src[:, t] - dst[:, t]))
            return (new, new) if mode == "propagate" else (h, new)

        with torch.enable_grad():
            y = _state_loop_y(model, layer, ck, overwrite)
        fwd = [(f"blocks.{layer}.mixer.hook_y", lambda x, hook: y.to(x.dtype))]
    with torch.enable_grad():
        value = metric(model.run_with_hooks(corrupt, fwd_hooks=fwd)).double().mean()
        (g,) = torch.autograd.grad(value, alpha)
    return float(g) / den


@pytest.mark.parametrize("mode", ["propagate", "readout"])
def test_atp_equals_autograd_first_order_term(setup, mode):
    model, clean, corrupt, metric, classes = setup
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.mixer.hook_dt", "blocks.1.mixer.hook_B", "blocks.1.mixer.hook_y",
             "blocks.0.mixer.hook_ssm_state", "blocks.1.mixer.hook_ssm_state"]
    positions = {"flip": classes["flip"], "after": classes["after"], "last": classes["last"],
                 "two": torch.stack([classes["flip"], classes["last"]], 1)}  # a class with two positions
    res = attribution_patch(model, clean, corrupt, metric, hooks=hooks, positions=positions, state_mode=mode)
    pairs = []
    for p, (label, pos) in enumerate(positions.items()):
        mask = torch.zeros(B, L, dtype=torch.bool).scatter_(1, pos.reshape(B, -1), True)
        for name in hooks:
            if mode == "readout" and not name.endswith("hook_ssm_state"):
                continue
            pairs.append((name, label, float(res.effect[name][p]), _first_order(model, clean, corrupt, metric, name,
                                                                                mask, mode)))
    # relative error against the largest first-order term of the test (float32 model, float64 reference)
    scale = max(abs(r) for *_, r in pairs)
    assert scale > 1e-3
    for name, label, got, ref in pairs:
        assert abs(got - ref) <= 1e-4 * scale, (name, label, got, ref)


def test_ig_with_one_step_is_atp_and_ig_moves_toward_exact(setup):
    model, clean, corrupt, metric, classes = setup
    hooks = ["blocks.0.mixer.hook_conv", "blocks.1.mixer.hook_gate"]
    atp = attribution_patch(model, clean, corrupt, metric, hooks=hooks, positions=classes)
    ig1 = attribution_patch(model, clean, corrupt, metric, hooks=hooks, positions=classes, method="ig", steps=1)
    for h in hooks:
        assert torch.allclose(atp.per_example[h], ig1.per_example[h], atol=1e-6)
    assert ig1.method == "ig" and atp.meta["steps"] == 1


def test_hf_mamba_residual_patch_gives_the_same_effects(tmp_path):
    """Our model saved with save_pretrained, loaded into transformers' MambaForCausalLM and patched with plain
    torch forward pre-hooks on each layer (its input is the residual stream), gives the same effects."""
    import transformers as tf

    model = _model("mamba1")
    model.save_pretrained(tmp_path)
    hf = tf.MambaForCausalLM.from_pretrained(tmp_path).eval()
    g = torch.Generator().manual_seed(9)
    clean = torch.randint(0, V, (B, L), generator=g)
    corrupt = torch.randint(0, V, (B, L), generator=g)
    with torch.no_grad():  # answer: the clean run's top token; wrong: the corrupted run's (a clear metric gap)
        answer, wrong = model(clean)[:, -1].argmax(-1), model(corrupt)[:, -1].argmax(-1)
    wrong = torch.where(wrong == answer, (answer + 1) % V, wrong)
    metric = logit_diff(answer, wrong)
    ours = patch_sweep(model, clean, corrupt, metric, hooks="resid_pre", positions="all")
    with torch.no_grad():
        resid = {}
        handles = [layer.register_forward_pre_hook(lambda mod, args, i=i: resid.__setitem__(i, args[0].clone()))
                   for i, layer in enumerate(hf.backbone.layers)]
        mc = metric(hf(clean).logits)
        for h in handles:
            h.remove()
        mk = metric(hf(corrupt).logits)
        for i, layer in enumerate(hf.backbone.layers):
            for t in range(L):
                def pre(mod, args, t=t, i=i):
                    x = args[0].clone()
                    x[:, t] = resid[i][:, t]
                    return (x, *args[1:])

                handle = layer.register_forward_pre_hook(pre)
                mp = metric(hf(corrupt).logits)
                handle.remove()
                ref = (mp.double().mean() - mk.double().mean()) / (mc.double().mean() - mk.double().mean())
                assert abs(float(ours.effect[f"blocks.{i}.hook_resid_pre"][t]) - float(ref)) <= 1e-5, (i, t)


def test_identity_checks(setup):
    model, clean, corrupt, metric, classes = setup
    # clean into clean changes nothing (and needs no forward pass)
    base = base_run(model, clean, metric, ["blocks.0.mixer.hook_y"])
    mask = torch.ones(B, L, dtype=torch.bool)
    same = patched_metric(model, base, [Patch("blocks.0.mixer.hook_y", mask, base.cache["blocks.0.mixer.hook_y"])],
                          metric)
    assert torch.equal(same, base.metric_values) and base.stats.get("forwards", 0) == 0
    # denoising the last residual stream everywhere restores everything, noising it destroys everything
    for direction in ("denoise", "noise"):
        res = patch_sweep(model, clean, corrupt, metric, hooks="blocks.1.hook_resid_post", positions={"all": mask},
                          direction=direction)
        assert abs(float(res.effect["blocks.1.hook_resid_post"][0]) - 1.0) < 1e-5


def test_ablate_matches_hand_written_hooks(setup):
    model, clean, corrupt, _, classes = setup
    name = "blocks.0.mixer.hook_x"
    pos = classes["after"]
    mask = torch.zeros(B, L, dtype=torch.bool).scatter_(1, pos[:, None], True)
    with torch.no_grad():
        _, cc = model.run_with_cache(clean, names_filter=name)
        _, ck = model.run_with_cache(corrupt, names_filter=name)
        mean = cc[name][mask].mean(0)
        m3 = mask.view(B, L, *([1] * (cc[name].dim() - 2)))
        refs = {
            "zero": model.run_with_hooks(clean, fwd_hooks=[(name, lambda x, h: torch.where(m3, 0.0, x))]),
            "mean": model.run_with_hooks(clean, fwd_hooks=[(name, lambda x, h: torch.where(m3, mean, x))]),
            "resample": model.run_with_hooks(clean, fwd_hooks=[(name, lambda x, h: torch.where(m3, ck[name], x))]),
        }
    for kind, ref in refs.items():
        got = ablate(model, clean, [(name, pos)], kind=kind, reference=corrupt if kind == "resample" else None)
        assert torch.allclose(got, ref, atol=1e-5), kind
    perm = derangement(B, seed=3)
    assert not bool((perm == torch.arange(B)).any()) and sorted(perm.tolist()) == list(range(B))
    with torch.no_grad():
        _, cp = model.run_with_cache(clean[perm], names_filter=name)
        ref = model.run_with_hooks(clean, fwd_hooks=[(name, lambda x, h: cp[name])])
    assert torch.allclose(ablate(model, clean, name, kind="resample", seed=3), ref, atol=1e-5)
    with pytest.raises(ValueError, match="kind"):
        ablate(model, clean, name, kind="noise")


def test_metrics_values_subsets_and_suffixes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 9, generator=g)
    answer, wrong = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 0, 0])
    pos = torch.tensor([5, 3, -1, 4])
    ld = logit_diff(answer, wrong, pos)
    rows = torch.arange(4)
    absolute = torch.tensor([5, 3, 5, 4])
    assert torch.allclose(ld(logits), logits[rows, absolute, answer] - logits[rows, absolute, wrong])
    assert torch.allclose(ld(logits[:, 3:], offset=3), ld(logits))  # a suffix of the sequence
    idx = torch.tensor([2, 0])
    assert torch.allclose(ld.subset(idx)(logits[idx]), ld(logits)[idx])
    lp = logprob(answer)
    assert torch.allclose(lp(logits), torch.log_softmax(logits[:, -1], -1)[rows, answer])
    kl = kl_to_clean(logits)
    assert torch.allclose(kl(logits), torch.zeros(4), atol=1e-6) and bool((kl(logits.flip(0)) > 0).all())
    acc = correct(logits[:, -1].argmax(-1))
    assert torch.equal(acc(logits), torch.ones(4))
    cm = custom_metric(lambda picked, answer: picked[:, 0].gather(-1, answer[:, None])[:, 0], -1, answer=answer)
    assert torch.allclose(cm(logits), logits[rows, -1, answer])
    assert ld.first_position(6) == 3
    with pytest.raises(ValueError, match="outside"):
        ld(logits[:, 4:], offset=4)


def test_patch_result_helpers(setup):
    model, clean, corrupt, metric, classes = setup
    res = patch_sweep(model, clean, corrupt, metric, hooks=["y", "resid_pre"], positions=classes)
    lo, hi = res.ci("blocks.0.mixer.hook_y", n_resamples=200)
    eff = res.effect["blocks.0.mixer.hook_y"]
    assert lo.shape == eff.shape and bool((lo <= eff + 1e-6).all()) and bool((eff <= hi + 1e-6).all())
    top = res.top(3)
    assert len(top) == 3 and abs(top[0]["effect"]) >= abs(top[-1]["effect"])
    d = res.to_dict(ci=True, n_resamples=100)
    json.dumps(d)
    assert d["positions"] == list(classes) and d["n_examples"] == B
    grid, layers = res.grid("y")
    assert grid.shape == (2, 3) and layers == [0, 1]
    fig = res.plot()
    assert len(fig.axes) >= 2


def test_bad_inputs_raise_clear_errors(setup):
    model, clean, corrupt, metric, _ = setup
    with pytest.raises(ValueError, match="direction"):
        patch_sweep(model, clean, corrupt, metric, hooks="y", direction="sideways")
    with pytest.raises(ValueError, match="same shape"):
        patch_sweep(model, clean, corrupt[:, :-1], metric, hooks="y")
    with pytest.raises(ValueError, match="layer 7"):
        patch_sweep(model, clean, corrupt, metric, hooks="y", layers=[7])
    with pytest.raises(ValueError, match="outside"):
        patch_sweep(model, clean, corrupt, metric, hooks="y", positions=[L])
    with pytest.raises(ValueError, match="method"):
        attribution_patch(model, clean, corrupt, metric, hooks="y", method="magic")
    with pytest.raises(ValueError, match="same on the clean"):
        patch_sweep(model, clean, clean, metric, hooks="y", positions=[1])


def test_top_level_module_reexports_the_package():
    import activation_patching as top

    import mamba_interp.activation_patching as pkg

    assert top.patch_sweep is pkg.patch_sweep and top.attribution_patch is pkg.attribution_patch
    assert set(pkg.__all__) <= set(dir(top))
