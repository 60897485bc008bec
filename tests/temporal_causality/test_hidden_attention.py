"""Hidden attention reconstructs the mixer (both architectures, padding, odd lengths), is causal, matches the
product form of Ali et al.; its row/chunked/reduced paths agree; knockout equals a brute-force shadow scan."""

from __future__ import annotations

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.models.ops.ssd import segsum, segsum_unstable
from mamba_interp.temporal_causality import attention_weights, hidden_attention, knockout, segsum_rows, ssm_inputs
from tests.models.helpers import perturb, rel_err

CONFIGS = {
    "mamba1": dict(arch="mamba1", d_model=16, n_layer=2, vocab_size=11, d_state=4),
    "mamba2": dict(arch="mamba2", d_model=16, n_layer=2, vocab_size=11, d_state=4, headdim=8),
    "mamba2_groups": dict(arch="mamba2", d_model=16, n_layer=2, vocab_size=11, d_state=4, headdim=4, ngroups=2,
                          D_has_hdim=True),
}
L = 21  # not a multiple of the CPU SSD chunk (16)


def make(name: str, dtype=torch.float64, seed: int = 0) -> HookedMamba:
    torch.manual_seed(seed)
    model = HookedMamba(MambaConfig(**CONFIGS[name])).eval()
    perturb(model, seed)
    return model.to(dtype)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return make(request.param)


def batch(b: int = 3, length: int = L, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    return ids, mask


def mixer_output(model, ids, mask, layer):
    """y − D·u of the mixer, from its own hook (the default scan, not the materialised path)."""
    _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=f"blocks.{layer}.mixer.hook_y")
    inp = ssm_inputs(model, ids, [layer], mask)[layer]
    return cache["y", layer].to(inp.u.dtype) - inp.skip(), inp, cache["y", layer]


def reconstruct(alpha, inp):
    eq = "bets,bse->bte" if inp.arch == "mamba1" else "bhts,bshp->bthp"
    return torch.einsum(eq, alpha, inp.u)


@pytest.mark.parametrize("layer", [0, 1])
def test_hidden_attention_reconstructs_the_mixer_and_is_causal(model, layer):
    ids, mask = batch()
    target, inp, _ = mixer_output(model, ids, mask, layer)
    alpha = hidden_attention(model, ids, layer, attention_mask=mask)
    assert alpha.shape == (3, inp.units, L, L)
    assert rel_err(reconstruct(alpha, inp), target) <= 1e-5
    assert float(alpha.triu(1).abs().max()) == 0.0  # α = 0 above the diagonal, exactly


@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_float32_reconstruction_to_the_output_scale(name):
    """In float32 y − D·u is a small difference of rounded numbers; relative to y itself the error is 1e-5."""
    model = make(name, torch.float32, seed=3)
    ids, mask = batch(seed=3)
    target, inp, y = mixer_output(model, ids, mask, 1)
    err = (reconstruct(hidden_attention(model, ids, 1, attention_mask=mask), inp) - target).abs().max()
    assert float((err / y.abs().max()).detach()) <= 1e-5


def test_mamba1_alpha_equals_the_product_form():
    """α[e, t, s] = Σ_n C_t[n] (Π_{k=s+1..t} exp(Δ_k A[e, n])) Δ_s B_s[n] (Ali et al. 2024), with loops."""
    model = make("mamba1")
    ids, _ = batch(b=1, length=7)
    inp = ssm_inputs(model, ids, [0])[0]
    alpha = hidden_attention(model, ids, 0)[0]
    dA = torch.exp(torch.einsum("le,en->len", inp.dt[0], inp.A))
    ref = torch.zeros_like(alpha)
    for t in range(7):
        for s in range(t + 1):
            prod = torch.ones_like(inp.A)
            for k in range(s + 1, t + 1):
                prod = prod * dA[k]
            ref[:, t, s] = (inp.C[0, t] * prod * inp.dt[0, s, :, None] * inp.B[0, s]).sum(-1)
    assert rel_err(alpha, ref) <= 1e-12


def test_rows_reductions_and_chunks_agree(model):
    ids, mask = batch()
    full = hidden_attention(model, ids, 1, attention_mask=mask)
    q = torch.tensor([[20, 7], [3, 3], [0, 20]])
    rows = hidden_attention(model, ids, 1, attention_mask=mask, query_positions=q)
    assert torch.allclose(rows, full[torch.arange(3)[:, None], :, q].permute(0, 2, 1, 3), rtol=0, atol=1e-14)
    tiny = 3 * L  # forces one sequence and one unit per block
    mean = hidden_attention(model, ids, 1, attention_mask=mask, reduce="mean_abs", chunk_elements=tiny)
    norm = hidden_attention(model, ids, 1, attention_mask=mask, reduce="norm", chunk_elements=tiny)
    assert torch.allclose(mean, full.abs().mean(1), atol=1e-14) and torch.allclose(norm, full.norm(dim=1), atol=1e-14)
    pick = hidden_attention(model, ids, 1, attention_mask=mask, channels=[2, 0])
    assert torch.equal(pick, full[:, [2, 0]])
    shared = hidden_attention(model, ids, 1, attention_mask=mask, query_positions=[-1])
    assert torch.allclose(shared[:, :, 0], full[:, :, -1], atol=1e-14)


def test_segsum_rows_are_rows_of_segsum_and_stay_stable_at_long_length():
    a = -torch.rand(2, 3, 12, dtype=torch.float64)
    rows = torch.tensor([[11, 4, 0], [6, 6, 9]])
    got = segsum_rows(a, rows)
    ref = segsum(a)[torch.arange(2)[:, None], :, rows].permute(0, 2, 1, 3)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.allclose(got[torch.isfinite(got)], ref[torch.isfinite(ref)], atol=1e-14)
    # float32 at l = 4096 with large steps: the direct sum keeps the last row's short segments exact
    x = -(torch.rand(1, 1, 4096, generator=torch.Generator().manual_seed(0)) * 5 + 1)
    exact = segsum_rows(x.double(), torch.tensor([[4095]]))[0, 0, 0, -8:]
    stable = segsum_rows(x, torch.tensor([[4095]]))[0, 0, 0, -8:].double()
    unstable = segsum_unstable(x)[0, 0, -1, -8:].double()
    assert float((stable - exact).abs().max()) < 1e-5 < float((unstable - exact).abs().max())


def test_bad_arguments_fail_clearly(model):
    ids, _ = batch()
    with pytest.raises(ValueError, match="out of range"):
        hidden_attention(model, ids, 5)
    with pytest.raises(ValueError, match="reduce"):
        hidden_attention(model, ids, 0, reduce="max")
    with pytest.raises(ValueError, match="indices must lie"):
        hidden_attention(model, ids, 0, channels=[10_000])
    with pytest.raises(ValueError, match="must lie in"):
        hidden_attention(model, ids, 0, query_positions=[L])


# ---- knockout -------------------------------------------------------------------------------------------
def shadow_scan(inp, b: int, src: set[int]) -> torch.Tensor:
    """Sequence b's scan with the writes at ``src`` skipped (mamba-knockout's ZERO_ATTENTION shadow state)."""
    u, dt, B, C, A = inp.u[b], inp.dt[b], inp.B[b], inp.C[b], inp.A
    out = []
    if inp.arch == "mamba1":
        h = torch.zeros(u.shape[1], A.shape[1], dtype=u.dtype)
        for t in range(u.shape[0]):
            h = torch.exp(dt[t, :, None] * A) * h + (t not in src) * (dt[t] * u[t])[:, None] * B[t]
            out.append(h @ C[t])
    else:
        heads, per = u.shape[1], u.shape[1] // B.shape[1]
        h = torch.zeros(heads, u.shape[2], B.shape[2], dtype=u.dtype)
        for t in range(u.shape[0]):
            Bh, Ch = B[t].repeat_interleave(per, 0), C[t].repeat_interleave(per, 0)  # (h, n)
            write = (dt[t, :, None, None] * u[t, :, :, None] * Bh[:, None, :])
            h = torch.exp(dt[t] * A)[:, None, None] * h + (t not in src) * write
            out.append(torch.einsum("hpn,hn->hp", h, Ch))
    return torch.stack(out) + inp.skip()[b]


def brute_force_knockout(model, ids, mask, layer, src, dst):
    inp = ssm_inputs(model, ids, [layer], mask)[layer]

    def replace(y, hook):
        y = y.clone()
        for b in range(ids.shape[0]):
            shadow = shadow_scan(inp, b, set(src[b]))
            for t in set(dst[b]):
                y[b, t] = shadow[t].to(y.dtype)
        return y

    return model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(f"blocks.{layer}.mixer.hook_y", replace)])


@pytest.mark.parametrize("layer", [0, 1])
def test_knockout_equals_a_brute_force_shadow_scan(model, layer):
    ids, mask = batch()
    src = torch.tensor([[6, 9], [2, 2], [0, 15]])
    dst = torch.tensor([[20, 12], [5, 20], [15, 15]])  # a duplicate destination knocks out once
    got = knockout(model, ids, layer, src, dst, attention_mask=mask)
    ref = brute_force_knockout(model, ids, mask, layer, src.tolist(), dst.tolist())
    clean = model(ids, attention_mask=mask)
    assert rel_err(got, ref) <= 1e-10 and rel_err(got, clean) > 1e-6


def test_knockout_of_every_other_source_leaves_the_diagonal_term(model):
    """Knocking out every source s ≠ t for target t leaves y_t = α[t, t] u_t + D u_t."""
    ids, _ = batch(b=1)
    inp = ssm_inputs(model, ids, [1])[1]
    t = 13
    diag = hidden_attention(model, ids, 1)[0, :, t, t]
    expect = (diag * inp.u[0, t] if inp.arch == "mamba1" else diag[:, None] * inp.u[0, t]) + inp.skip()[0, t]

    def only_diagonal(y, hook):
        y = y.clone()
        y[0, t] = expect.to(y.dtype)
        return y

    ref = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.mixer.hook_y", only_diagonal)])
    assert rel_err(knockout(model, ids, 1, [s for s in range(L) if s != t], [t]), ref) <= 1e-10
    # sources after the destination carry nothing: the logits do not move
    assert torch.equal(knockout(model, ids, 1, [15, 16], [14]), model(ids))


def test_knockout_is_differentiable(model):
    ids, _ = batch(b=1)
    emb = model.embed(ids).detach().requires_grad_(True)
    with model.hooks(fwd_hooks=[("hook_embed", lambda t, hook: emb)]):
        knockout(model, ids, 0, [3], [L - 1])[0, -1].sum().backward()
    assert emb.grad is not None and float(emb.grad.abs().sum()) > 0


def test_attention_weights_validates_units():
    model = make("mamba2")
    inp = ssm_inputs(model, batch()[0], [0])[0]
    with pytest.raises(ValueError, match="head indices"):
        attention_weights(inp, units=[inp.units])
