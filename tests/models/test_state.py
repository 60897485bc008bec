"""The inference state: a sequence processed in pieces equals the sequence processed whole."""

import random

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from tests.models.helpers import needs_cpu_kernel, perturb

TOL = 1e-5  # max |Δ logit|, float32
CFGS = {
    "mamba1": MambaConfig(arch="mamba1", d_model=16, n_layer=2, vocab_size=23, d_state=4, bias=True),
    "mamba2": MambaConfig(arch="mamba2", d_model=16, n_layer=2, vocab_size=23, d_state=4, headdim=8, ngroups=2,
                          chunk_size=8),
}
SCANS = [("mamba1", "reference"), pytest.param("mamba1", "compiled", marks=needs_cpu_kernel), ("mamba1", "loop"),
         ("mamba1", "parallel"),
         ("mamba2", "reference"), ("mamba2", "chunked")]  # every scan that takes an initial state (kernels: CUDA)
L = 23
_MODELS: dict[str, HookedMamba] = {}


def _model(arch: str) -> HookedMamba:
    if arch not in _MODELS:
        torch.manual_seed(1)
        _MODELS[arch] = HookedMamba(CFGS[arch]).eval()
        perturb(_MODELS[arch], seed=1)
    return _MODELS[arch]


def _ids(b=3, length=L, seed=0):
    return torch.randint(0, 23, (b, length), generator=torch.Generator().manual_seed(seed))


def _cuts(n_pieces: int, seed: int) -> list[int]:
    """Piece boundaries, including pieces of one token and pieces shorter than the conv window."""
    cuts = sorted(random.Random(seed).sample(range(1, L), n_pieces - 1))
    return [0, *cuts, L]


def _in_pieces(model, ids, cuts, mask=None, **kw):
    state, parts = model.init_state(ids.shape[0]), []
    for a, b in zip(cuts[:-1], cuts[1:]):
        m = None if mask is None else mask[:, a:b]
        logits, state = model(ids[:, a:b], attention_mask=m, state=state, **kw)
        parts.append(logits)
    return torch.cat(parts, dim=1), state


@pytest.mark.parametrize("arch, scan", SCANS)
@pytest.mark.parametrize("n_pieces", [2, 3, 5])
def test_pieces_equal_whole(arch, scan, n_pieces):
    model = _model(arch)
    model.set_scan_impl(scan)
    try:
        ids = _ids()
        with torch.no_grad():
            whole, whole_state = model(ids, state=model.init_state(3))
            ref = model(ids)
            pieces, state = _in_pieces(model, ids, _cuts(n_pieces, seed=n_pieces))
    finally:
        model.set_scan_impl("auto")
    assert (whole - ref).abs().max() <= TOL
    assert (pieces - ref).abs().max() <= TOL
    assert state.offset == L
    for s, w in zip(state.layers, whole_state.layers):
        assert (s.conv - w.conv).abs().max() <= TOL and (s.ssm - w.ssm).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_pieces_equal_whole_on_the_materialised_path_and_with_left_padding(arch):
    model = _model(arch)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :9] = 0, 0  # left padding, longer than the first piece for row 2
    hooks = [("blocks.*.mixer.hook_ssm_state", lambda s, h: None)]  # per-token states: the materialised scan
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        with model.hooks(hooks):
            pieces, _ = _in_pieces(model, ids, _cuts(4, seed=7), mask=mask)
    keep = mask.bool()
    assert (pieces[keep] - ref[keep]).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_state_hooks_see_and_set_the_state(arch):
    """hook_conv_state holds the previous piece's last k-1 rows of hook_in_x, hook_h0 its last SSM state; setting
    both in a stateless forward continues the sequence exactly as the state does."""
    model = _model(arch)
    ids, k = _ids(), model.cfg.d_conv
    with torch.no_grad():
        _, cache = model.run_with_cache(ids[:, :10], names_filter=lambda n: "hook_in_x" in n or "ssm_state" in n)
        _, state = model(ids[:, :10], state=model.init_state(3))
        seen = {}
        record = [(f"blocks.*.mixer.hook_{h}", lambda t, hook: seen.__setitem__(hook.name, t))
                  for h in ("conv_state", "h0")]
        continued, _ = model.run_with_hooks(ids[:, 10:], state=state, fwd_hooks=record)
        for i in range(model.cfg.n_layer):
            assert torch.allclose(seen[f"blocks.{i}.mixer.hook_conv_state"], cache["in_x", i][:, 10 - (k - 1):10])
            assert torch.allclose(seen[f"blocks.{i}.mixer.hook_h0"], cache["ssm_state", i][:, -1], atol=1e-6)
        set_state = []
        for i, layer in enumerate(state.layers):
            set_state += [(f"blocks.{i}.mixer.hook_conv_state", lambda t, h, v=layer.conv: v.clone()),
                          (f"blocks.{i}.mixer.hook_h0", lambda t, h, v=layer.ssm: v.clone())]
        stateless = model.run_with_hooks(ids[:, 10:], fwd_hooks=set_state)
        whole = model(ids)
    assert (continued - whole[:, 10:]).abs().max() <= TOL
    assert (stateless - whole[:, 10:]).abs().max() <= TOL


def test_a_state_is_never_changed_by_a_forward():
    model = _model("mamba2")
    ids = _ids()
    with torch.no_grad():
        _, state = model(ids[:, :8], state=model.init_state(3))
        before = [(s.conv.clone(), s.ssm.clone()) for s in state.layers]
        a, _ = model(ids[:, 8:], state=state)
        b, _ = model(ids[:, 8:], state=state)  # continued twice from the same state: the same result
    assert torch.equal(a, b)
    assert all(torch.equal(s.conv, c) and torch.equal(s.ssm, h) for s, (c, h) in zip(state.layers, before))
    assert torch.equal(state.select([0, 2]).layers[0].ssm, state.layers[0].ssm[[0, 2]])
    assert state.batch_size == 3 and state.select([1]).batch_size == 1 and state.offset == 8
    moved = state.to("cpu")
    assert moved.offset == 8 and torch.equal(moved.layers[1].conv, state.layers[1].conv)


def test_state_errors_are_one_line():
    model = _model("mamba1")
    ids = _ids()
    with pytest.raises(ValueError, match=r"for a batch of 3; use model.init_state\(3\)"):
        model(ids, state=model.init_state(2))
    with pytest.raises(TypeError, match="InferenceState"):
        model(ids, state={"conv": None})
    with pytest.raises(ValueError, match="stop_at_layer cannot be combined with state"):
        model(ids, state=model.init_state(3), stop_at_layer=1)
    with pytest.raises(ValueError, match="batch_size"):
        model.init_state(0)


@pytest.mark.parametrize("hook", ["hook_h0", "hook_conv_state"])
def test_an_in_place_edit_of_the_state_raises_and_leaves_the_state_intact(hook):
    from mamba_interp import HookError

    model = _model("mamba1")
    ids = _ids()
    with torch.no_grad():
        _, state = model(ids[:, :8], state=model.init_state(3))
        before = [(s.conv.clone(), s.ssm.clone()) for s in state.layers]
        with pytest.raises(HookError, match="in place"):
            model.run_with_hooks(ids[:, 8:], state=state,
                                 fwd_hooks=[(f"blocks.0.mixer.{hook}", lambda t, h: t.zero_())])
    assert all(torch.equal(s.conv, c) and torch.equal(s.ssm, h) for s, (c, h) in zip(state.layers, before))
