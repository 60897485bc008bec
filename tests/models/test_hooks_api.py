"""Hook API: names and shapes (docs/hooks.md), filters, context-manager cleanup, cache helpers, errors."""

import pytest
import torch

from mamba_interp import HookedMamba, HookError, MambaConfig
from tests.models.helpers import CPU_M1_SCAN

B, L = 2, 6
M1 = MambaConfig(arch="mamba1", d_model=16, n_layer=2, vocab_size=11, d_state=4, dt_rank=3)
M2 = MambaConfig(arch="mamba2", d_model=16, n_layer=2, vocab_size=11, d_state=4, headdim=8, ngroups=2)


def _shapes(cfg):
    b, l, d, e, n = B, L, cfg.d_model, cfg.d_inner, cfg.d_state
    if cfg.arch == "mamba1":
        r = cfg.dt_rank_value
        mixer = dict(in_x=(b, l, e), in_z=(b, l, e), conv_state=(b, cfg.d_conv - 1, e), conv=(b, l, e), x=(b, l, e),
                     dt_low=(b, l, r), dt=(b, l, e),
                     B=(b, l, n), C=(b, l, n), dA=(b, l, e, n), h0=(b, e, n), ssm_state=(b, l, e, n), y=(b, l, e),
                     gate=(b, l, e), gated=(b, l, e), out=(b, l, d))
    else:
        h, p, g = cfg.nheads, cfg.headdim, cfg.ngroups
        xbc = e + 2 * g * n
        mixer = dict(in_x=(b, l, xbc), in_z=(b, l, e), conv_state=(b, cfg.d_conv - 1, xbc), conv=(b, l, xbc),
                     x=(b, l, h, p), dt=(b, l, h),
                     B=(b, l, g, n), C=(b, l, g, n), dA=(b, l, h), h0=(b, h, p, n), ssm_state=(b, l, h, p, n),
                     y=(b, l, h, p), gate=(b, l, e), gated=(b, l, e), out=(b, l, d))
    shapes = {"hook_embed": (b, l, d), "hook_norm_final": (b, l, d)}
    for i in range(cfg.n_layer):
        shapes.update({f"blocks.{i}.hook_resid_pre": (b, l, d), f"blocks.{i}.hook_norm": (b, l, d),
                       f"blocks.{i}.hook_resid_post": (b, l, d)})
        shapes.update({f"blocks.{i}.mixer.hook_{k}": v for k, v in mixer.items()})
    return shapes


@pytest.fixture(params=[M1, M2], ids=["mamba1", "mamba2"])
def model(request):
    torch.manual_seed(0)
    return HookedMamba(request.param)


def ids():
    return torch.randint(0, 11, (B, L), generator=torch.Generator().manual_seed(0))


def test_hook_names_and_shapes_match_design_table(model):
    _, cache = model.run_with_cache(ids())
    expected = _shapes(model.cfg)
    assert set(model.hook_dict) == set(expected)
    for name, value in cache.items():
        assert tuple(value.shape) == expected[name], name


def test_hook_dict_is_in_execution_order(model):
    order = []
    model.run_with_hooks(ids(), fwd_hooks=[(lambda n: True, lambda t, h: order.append(h.name))])
    assert order == list(model.hook_dict)


def test_lazy_hooks_are_computed_only_when_asked(model):
    model(ids())
    assert set(model.last_scans) == {CPU_M1_SCAN if model.cfg.arch == "mamba1" else "chunked"}
    _, cache = model.run_with_cache(ids(), names_filter="blocks.*.mixer.hook_dt")
    assert list(cache) == ["blocks.0.mixer.hook_dt", "blocks.1.mixer.hook_dt"]
    assert "materialised" not in model.last_scans
    model.run_with_cache(ids(), names_filter="blocks.1.mixer.hook_ssm_state")
    assert model.last_scans[1] == "materialised" and model.last_scans[0] != "materialised"


@pytest.mark.parametrize(
    "names_filter, expected",
    [
        ("blocks.0.mixer.hook_B", ["blocks.0.mixer.hook_B"]),
        (["blocks.1.hook_resid_post", "hook_embed"], ["hook_embed", "blocks.1.hook_resid_post"]),
        ("blocks.*.hook_resid_pre", ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]),
        (lambda n: n.endswith("hook_C"), ["blocks.0.mixer.hook_C", "blocks.1.mixer.hook_C"]),
    ],
    ids=["name", "list", "glob", "predicate"],
)
def test_names_filter_forms(model, names_filter, expected):
    _, cache = model.run_with_cache(ids(), names_filter=names_filter)
    assert list(cache) == expected


def test_unknown_hook_name_suggests_nearest(model):
    with pytest.raises(HookError, match="did you mean 'blocks.0.mixer.hook_dt'"):
        model.run_with_cache(ids(), names_filter="blocks.0.mixer.hook_dtt")
    with pytest.raises(HookError, match="matches no hook point"):
        model.run_with_hooks(ids(), fwd_hooks=[("blocks.*.mixer.hook_nothing", lambda t, h: None)])


def test_returned_tensor_replaces_activation(model):
    def zero_out(t, hook):
        return torch.zeros_like(t)

    logits = model.run_with_hooks(ids(), fwd_hooks=[("hook_norm_final", zero_out)])
    assert torch.count_nonzero(logits) == 0
    assert torch.count_nonzero(model(ids())) > 0  # removed after the call


@pytest.mark.parametrize("bad", ["shape", "dtype", "type"])
def test_bad_hook_output_raises_clear_error(model, bad):
    def hook(t, h):
        return {"shape": t[:, :1], "dtype": t.double(), "type": t.tolist()}[bad]

    with pytest.raises(HookError, match="blocks.0.mixer.hook_dt"):
        model.run_with_hooks(ids(), fwd_hooks=[("blocks.0.mixer.hook_dt", hook)])
    assert not any(hp.active for hp in model.hook_dict.values())


def test_hooks_removed_when_forward_raises(model):
    def boom(t, h):
        raise KeyError("inside hook")

    with pytest.raises(KeyError):
        with model.hooks(fwd_hooks=[("blocks.*.mixer.hook_x", boom)]):
            model(ids())
    assert not any(hp.active for hp in model.hook_dict.values())


def test_cache_helpers(model):
    _, cache = model.run_with_cache(ids(), names_filter=lambda n: "resid" in n or n == "hook_norm_final")
    resid, labels = cache.accumulated_resid(return_labels=True)
    assert resid.shape == (model.cfg.n_layer + 1, B, L, model.cfg.d_model)
    assert labels == ["resid_pre 0", "resid_pre 1", "final_post"]
    normed = cache.accumulated_resid(apply_ln=True)
    assert torch.allclose(normed[-1], cache["hook_norm_final"], atol=1e-6)
    assert cache.stack("blocks.*.hook_resid_post").shape == (2, B, L, model.cfg.d_model)
    assert torch.equal(cache["resid_post", 1], cache["blocks.1.hook_resid_post"])
    assert torch.equal(cache.stack_activation("resid_pre"), cache.stack("blocks.*.hook_resid_pre"))
    assert cache.to("cpu")["resid_pre", 0].device.type == "cpu"
    with pytest.raises(KeyError, match="names_filter"):
        cache["dt", 0]


def test_cache_device_argument_and_detach(model):
    x = ids()
    _, cache = model.run_with_cache(x, names_filter="hook_embed", device="cpu")
    assert not cache["hook_embed"].requires_grad
    _, cache = model.run_with_cache(x, names_filter="hook_embed", detach=False)
    assert cache["hook_embed"].requires_grad


def test_run_with_cache_records_patched_values(model):
    name = "blocks.0.mixer.hook_gate"
    _, cache = model.run_with_cache(ids(), names_filter=name, fwd_hooks=[(name, lambda t, h: t * 0)])
    assert torch.count_nonzero(cache[name]) == 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torch.tensor([[1, 2, 11]]), "outside the vocabulary"),
        (lambda: torch.tensor([[-1, 2]]), "outside the vocabulary"),
        (lambda: torch.zeros(1, 0, dtype=torch.long), "empty"),
        (lambda: torch.zeros(1, 2, 3, dtype=torch.long), r"\[batch, seq_len\]"),
        (lambda: torch.zeros(1, 3), "integer token ids"),
        (lambda: [[1, 2]], "torch.Tensor"),
    ],
    ids=["too-large", "negative", "empty", "3d", "float", "list"],
)
def test_bad_inputs_raise_clear_errors(model, make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model(make())


def test_bad_attention_mask(model):
    x = ids()
    with pytest.raises(ValueError, match="match input_ids"):
        model(x, attention_mask=torch.ones(B, L + 1))
    with pytest.raises(ValueError, match="only 0"):
        model(x, attention_mask=torch.full((B, L), 2))


def test_one_dimensional_input_is_a_batch_of_one(model):
    x = ids()[0]
    assert torch.equal(model(x), model(x[None]))


def test_stop_at_layer_returns_residual(model):
    x = ids()
    _, cache = model.run_with_cache(x, names_filter="blocks.1.hook_resid_pre")
    assert torch.equal(model(x, stop_at_layer=1), cache["resid_pre", 1])
    with pytest.raises(ValueError, match="out of range"):
        model(x, stop_at_layer=5)


def test_config_validation():
    with pytest.raises(ValueError, match="headdim"):
        MambaConfig(arch="mamba2", d_model=16, headdim=7)
    with pytest.raises(ValueError, match="ngroups"):
        MambaConfig(arch="mamba2", d_model=16, headdim=8, ngroups=3)
    with pytest.raises(ValueError, match="arch"):
        MambaConfig(arch="mamba3")
    with pytest.raises(ValueError, match="d_model"):
        MambaConfig(d_model=0)
    with pytest.raises(ValueError, match="unknown MambaConfig fields"):
        MambaConfig.from_dict({"d_modle": 3})
    cfg = MambaConfig(arch="mamba2", d_model=32, headdim=16, dt_limit=(0.0, float("inf")))
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg
