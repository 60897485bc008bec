"""generate(): greedy equals transformers' generate; hooks act at every token as a re-processing loop; sampling."""

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from tests.models.helpers import hf_and_ours, perturb

N_NEW = 12


def _prompt(vocab, b=2, length=9, seed=0):
    return torch.randint(0, vocab, (b, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["mamba1", "mamba2"])
def model(request):
    torch.manual_seed(2)
    cfg = MambaConfig(arch=request.param, d_model=16, n_layer=2, vocab_size=45, pad_vocab_size_multiple=16,
                      d_state=4, headdim=8)
    m = HookedMamba(cfg).eval()
    perturb(m, seed=2, scale=1.0)  # logits of a few units, so that a hook can change the argmax
    return m


@pytest.mark.parametrize("arch", ["mamba", "mamba2", "falcon_mamba"])
@pytest.mark.parametrize("seed", [3, 4])
def test_greedy_equals_transformers_generate(arch, seed):
    hf, ours = hf_and_ours(arch, seed=seed)
    ids = _prompt(hf.config.vocab_size, seed=seed)
    with torch.no_grad():
        # an explicit mask: transformers would otherwise take every id equal to pad_token_id for padding
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, N_NEW)
    assert torch.equal(got, ref)


def _shift(v):
    return lambda out, hook: out + v


def _reprocessing_loop(model, ids, n, hooks):
    """What generation with a hook means, computed the slow way: the whole sequence again at every step."""
    for _ in range(n):
        logits = model.run_with_hooks(ids, fwd_hooks=hooks)
        ids = torch.cat([ids, logits[:, -1, : model.cfg.vocab_size].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_hook_on_hook_out_changes_tokens_as_a_reprocessing_loop(model):
    ids = _prompt(45)
    v = 3.0 * torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    hooks = [("blocks.0.mixer.hook_out", _shift(v))]
    with torch.no_grad():
        plain = model.generate(ids, N_NEW)
        hooked = model.generate(ids, N_NEW, fwd_hooks=hooks)
        loop = _reprocessing_loop(model, ids, N_NEW, hooks)
    assert torch.equal(plain, _reprocessing_loop(model, ids, N_NEW, []))
    assert torch.equal(hooked, loop)
    assert not torch.equal(hooked, plain)  # the hook mattered
    assert not any(hp.active for hp in model.hook_dict.values())


def test_each_generated_token_is_one_forward_of_one_token(model):
    """Linear in the generated length: the prompt once, then [b, 1] per token, never the prefix again."""
    shapes = []
    model.generate(_prompt(45), N_NEW, fwd_hooks=[("hook_embed", lambda t, h: shapes.append(tuple(t.shape[:2])))])
    assert shapes == [(2, 9)] + [(2, 1)] * (N_NEW - 1)


def test_sampling_is_seeded_and_respects_top_k(model):
    ids = _prompt(45)
    a = model.generate(ids, N_NEW, greedy=False, temperature=1.5, seed=1)
    assert torch.equal(a, model.generate(ids, N_NEW, greedy=False, temperature=1.5, seed=1))
    assert not torch.equal(a, model.generate(ids, N_NEW, greedy=False, temperature=1.5, seed=2))
    assert torch.equal(model.generate(ids, N_NEW, greedy=False, top_k=1, seed=3), model.generate(ids, N_NEW))
    k = 3
    out = model.generate(ids, N_NEW, greedy=False, top_k=k, temperature=5.0, seed=4)
    with torch.no_grad():
        logits = model(out)[:, 8:-1, :45]  # the logits each generated token was drawn from
    top = logits.topk(k, dim=-1).indices
    assert (top == out[:, 9:, None]).any(-1).all()


def test_padding_rows_are_never_generated(model):
    """Only the real vocabulary (45 of the 48 embedding rows) is decoded, as in mamba_ssm."""
    big = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight[45:] = 100 * big[:3]  # padding rows would win every argmax
        try:
            assert model(_prompt(45))[..., 45:].amax() > model(_prompt(45))[..., :45].amax()
            out = model.generate(_prompt(45), N_NEW)
            sampled = model.generate(_prompt(45), N_NEW, greedy=False, seed=0)
        finally:
            model.lm_head.weight.copy_(big)
    assert int(out.max()) < 45 and int(sampled.max()) < 45


def test_eos_stops_rows_and_the_generation(model):
    ids = _prompt(45)
    plain = model.generate(ids, N_NEW)
    eos = int(plain[0, 9 + 2])  # row 0 produces it as its third new token
    out = model.generate(ids, N_NEW, eos_token_id=eos)
    row0 = out[0, 9:]
    assert (row0[2:] == eos).all()
    first = {r: int((out[r, 9:] == eos).nonzero()[0]) for r in range(2) if (out[r, 9:] == eos).any()}
    if len(first) == 2:  # both finished: the generation stopped at the later one
        assert out.shape[1] == 9 + max(first.values()) + 1


def test_return_state_continues_the_generation(model):
    ids = _prompt(45)
    tokens, state = model.generate(ids, 5, return_state=True)
    with torch.no_grad():
        logits, _ = model(tokens[:, -1:], state=state)
    assert torch.equal(logits[:, -1, :45].argmax(-1), model.generate(ids, 6)[:, -1])
    assert state.offset == 9 + 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=3, greedy=False, temperature=0.0), "temperature"),
    (dict(max_new_tokens=3, greedy=False, top_k=46), "top_k"),
])
def test_generate_errors(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(_prompt(45), **kwargs)
