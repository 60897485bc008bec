"""In-place edits inside a hook: one rule on every hook point — a HookError that says to return a new tensor.

TransformerLens users write ``h[:, 10] = 0; return h``. Here that edit would silently give wrong numbers on some
hook points (on ``hook_ssm_state`` the recurrence would not see it), so every hook point refuses it the same way,
and the clone-then-edit form is the supported one.
"""

import pytest
import torch

from mamba_interp import HookedMamba, HookError, MambaConfig

CFGS = {
    "mamba1": MambaConfig(arch="mamba1", d_model=16, n_layer=2, vocab_size=11, d_state=4),
    "mamba2": MambaConfig(arch="mamba2", d_model=16, n_layer=2, vocab_size=11, d_state=4, headdim=8),
}
_MODELS: dict[str, HookedMamba] = {}


def _model(arch: str) -> HookedMamba:
    if arch not in _MODELS:
        torch.manual_seed(0)
        _MODELS[arch] = HookedMamba(CFGS[arch]).eval()
    return _MODELS[arch]


def _ids():
    return torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(0))


def _every_hook(arch):
    return [(arch, name) for name in _model(arch).hook_dict]


EVERY = _every_hook("mamba1") + _every_hook("mamba2")


def _edit_and_return(act, hook):
    act[:, 0] = act[:, 0] + 1.0  # the TransformerLens idiom
    return act


def _edit_only(act, hook):
    act.add_(1.0)


@pytest.mark.parametrize("arch, name", EVERY, ids=[f"{a}:{n}" for a, n in EVERY])
def test_in_place_edit_raises_on_every_hook_point(arch, name):
    model = _model(arch)
    for grad in (True, False):  # with autograd on, torch refuses some of these edits itself (views of splits)
        for fn in (_edit_and_return, _edit_only):
            with torch.set_grad_enabled(grad), pytest.raises(HookError, match=rf"{name}.*in place.*clone\(\)"):
                model.run_with_hooks(_ids(), fwd_hooks=[(name, fn)])
    assert not any(hp.active for hp in model.hook_dict.values())


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.parametrize("kind", ["blocks.0.hook_resid_pre", "blocks.1.mixer.hook_dt",
                                  "blocks.1.mixer.hook_ssm_state", "blocks.1.mixer.hook_h0"])
def test_in_place_edit_raises_under_inference_mode(arch, kind):
    """Inference tensors have no version counter: the check compares values instead."""
    model = _model(arch)
    with torch.inference_mode(), pytest.raises(HookError, match="in place"):
        model.run_with_hooks(_ids(), fwd_hooks=[(kind, _edit_and_return)])
    with torch.inference_mode():  # reading and returning a new tensor stay allowed
        out = model.run_with_hooks(_ids(), fwd_hooks=[(kind, lambda a, h: a + 0.0)])
    assert torch.allclose(out, model(_ids()), atol=1e-5)


def test_reading_hooks_and_new_tensors_are_unaffected():
    model = _model("mamba1")
    seen = []
    logits, cache = model.run_with_cache(_ids(), fwd_hooks=[(lambda n: True, lambda a, h: seen.append(h.name))])
    assert len(seen) == len(model.hook_dict) == len(cache)
    assert torch.allclose(logits, model(_ids()), atol=1e-5)
