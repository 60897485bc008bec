"""temporal_jacobian equals torch.autograd.functional.jacobian (every scan implementation, both architectures);
score gradients, several sources, hooked targets, non-HookedMamba modules; memory horizon on planted decays."""

from __future__ import annotations

import math

import pytest
import torch

from mamba_interp import HookedMamba, HookError, MambaConfig
from mamba_interp.temporal_causality import answer_logprob, influence_profile, memory_horizon, temporal_jacobian
from tests.models.helpers import CPU_KERNEL_EXPECTED, perturb, rel_err

L, V = 9, 11
IMPLS = {"mamba1": ["reference", *(["compiled"] if CPU_KERNEL_EXPECTED else []), "loop", "parallel"],
         "mamba2": ["reference", "chunked"]}


@pytest.fixture(scope="module", params=list(IMPLS))
def model(request):
    extra = {} if request.param == "mamba1" else {"headdim": 8}
    torch.manual_seed(0)
    m = HookedMamba(MambaConfig(arch=request.param, d_model=16, n_layer=2, vocab_size=V, d_state=4, **extra)).eval()
    perturb(m, 1)
    return m


def ids(b: int = 2):
    return torch.randint(0, V, (b, L), generator=torch.Generator().manual_seed(5))


def functional_jacobian(model, tokens, out_fn=lambda logits: logits):
    """torch.autograd.functional.jacobian of embeddings [b, s, d] -> out_fn(logits), on the reference scan."""
    model.set_scan_impl("reference")
    emb = model.embed(tokens).detach()

    def f(e):
        return out_fn(model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda t, hook: e)]))

    return torch.autograd.functional.jacobian(f, emb)


def test_jacobian_norm_equals_functional_jacobian_for_every_scan(model):
    tokens = ids()
    J = functional_jacobian(model, tokens)  # (b, t, v, b', s, d): sequences never interact, keep b' = b
    ref = torch.stack([J[i, :, :, i] for i in range(2)]).square().sum(dim=(2, 4)).sqrt()  # (b, t, s)
    for impl in IMPLS[model.cfg.arch]:
        model.set_scan_impl(impl)
        got = temporal_jacobian(model, tokens)
        assert model.last_scans == [impl, impl]
        assert got.shape == (2, L, L) and rel_err(got, ref) <= 1e-4, impl
        assert float(got.triu(1).abs().max()) == 0.0  # no influence from the future
    model.set_scan_impl("auto")
    raw = temporal_jacobian(model, tokens, [8, 3], reduce="none")  # (b, T, F, l, d): the whole Jacobian rows
    assert rel_err(raw, torch.stack([J[i, [8, 3], :, i] for i in range(2)])) <= 1e-4
    with pytest.raises(ValueError, match="max_features"):
        temporal_jacobian(model, tokens, [8], max_features=4)


def test_score_gradient_sources_and_reductions(model):
    tokens = ids()
    answers = torch.tensor([3, 7])
    tpos = torch.tensor([8, 5])
    rows = torch.arange(2)
    J = functional_jacobian(model, tokens, lambda lg: torch.log_softmax(lg, -1)[rows, tpos, answers])  # (b, b', s, d)
    own = torch.stack([J[i, i] for i in range(2)])  # (b, s, d)
    model.set_scan_impl("auto")
    got = temporal_jacobian(model, tokens, tpos, source=["hook_embed", "blocks.1.hook_resid_pre"],
                            score=answer_logprob(answers), reduce="none")
    assert rel_err(got["hook_embed"][:, 0], own) <= 1e-4
    norms = temporal_jacobian(model, tokens, tpos, score=answer_logprob(answers))
    assert rel_err(norms[:, 0], own.norm(dim=-1)) <= 1e-4
    gxi = temporal_jacobian(model, tokens, tpos, score=answer_logprob(answers), reduce="input_x_grad")
    assert rel_err(gxi[:, 0], (own * model.embed(tokens)).sum(-1).detach()) <= 1e-4
    later = got["blocks.1.hook_resid_pre"]
    assert later.shape == (2, 1, L, 16) and float(later.abs().sum()) > 0


def test_hooked_target_and_unused_source(model):
    tokens = ids(1)
    emb_to_res = temporal_jacobian(model, tokens, [4], target="blocks.0.hook_resid_post")
    assert emb_to_res.shape == (1, 1, L) and float(emb_to_res[0, 0, 5:].abs().max()) == 0.0
    later = temporal_jacobian(model, tokens, [4], source="blocks.1.mixer.hook_x", target="blocks.0.hook_resid_post")
    assert float(later.abs().max()) == 0.0  # the source runs after the target: no path


def test_errors_are_clear(model):
    tokens = ids(1)
    with pytest.raises(ValueError, match="needs a score"):
        temporal_jacobian(model, tokens, reduce="input_x_grad")
    with pytest.raises(ValueError, match="reduce"):
        temporal_jacobian(model, tokens, reduce="max")
    with pytest.raises(HookError, match="did you mean"):
        temporal_jacobian(model, tokens, source="hook_embd")


def test_embedding_module_path_for_a_transformer():
    """Issue 12's transformer comparison: the embedding module as ``source`` on the zoo's GPT-2 baseline."""
    from mamba_interp.tasks.baseline import TransformerBaseline

    torch.manual_seed(0)
    model = TransformerBaseline.build(vocab_size=V, d_model=16, n_layer=1, n_head=2, n_positions=16).eval()
    wte = model.hf_model.transformer.wte
    tokens = ids()
    answers = torch.tensor([1, 2])
    got = temporal_jacobian(model, tokens, [L - 1], source=wte, score=answer_logprob(answers), reduce="none")
    emb = wte(tokens).detach()

    def f(e):
        handle = wte.register_forward_hook(lambda mod, args, out: e)
        try:
            return torch.log_softmax(model(tokens), -1)[torch.arange(2), -1, answers]
        finally:
            handle.remove()

    J = torch.autograd.functional.jacobian(f, emb)  # (b, b, s, d)
    assert rel_err(got[:, 0], torch.stack([J[i, i] for i in range(2)])) <= 1e-4
    with pytest.raises(TypeError, match="embedding module"):
        temporal_jacobian(model, tokens, source="hook_embed")


# ---- memory horizon ------------------------------------------------------------------------------------
def test_memory_horizon_on_a_planted_exponential_decay():
    """One channel, constant Δ and |A|: I(τ) = Δ·exp(−Δ|A|τ), so the horizon at threshold ε is
    ⌊ln(1/ε)/(Δ|A|)⌋."""
    dt, a, l = 0.3, 0.5, 64
    t = torch.arange(l, dtype=torch.float64)
    tau = t[:, None] - t[None, :]
    infl = torch.where(tau >= 0, dt * torch.exp(-dt * a * tau.clamp_min(0)), torch.zeros(()))[None]  # (1, l, l)
    for eps in (0.1, 0.01):
        expect = torch.clamp(torch.full((l,), math.floor(math.log(1 / eps) / (dt * a))), max=t)
        assert torch.equal(memory_horizon(infl, eps)[0], expect.long())
    rows = infl[:, [63, 10]]
    assert memory_horizon(rows, 0.1, target_positions=[63, 10]).tolist() == [[15, 10]]
    assert memory_horizon(torch.zeros(2, 1, 8), 0.5, torch.tensor([3, 7])).tolist() == [[0], [0]]
    with pytest.raises(ValueError, match="pass target_positions"):
        memory_horizon(rows, 0.1)


def test_influence_profile_averages_by_distance():
    infl = torch.tensor([[[1.0, 0.0, 3.0, 0.0]], [[0.0, 2.0, 2.0, 9.0]]])  # targets at 2 and 2
    prof = influence_profile(infl, torch.tensor([2, 2]))
    assert torch.allclose(prof, torch.tensor([(0.75 + 0.5) / 2, 0.5 / 2, 0.25 / 2, 0.0]))  # s > t ignored
