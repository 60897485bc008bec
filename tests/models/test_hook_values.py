"""Every hook's value equals an independent computation from the weights (naive per-token loops, float64)."""

import pytest
import torch
import torch.nn.functional as F

from mamba_interp import HookedMamba, MambaConfig
from tests.models.helpers import perturb


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 if w is None else w)


def reference_hooks(model: HookedMamba, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Recompute every hook point with explicit loops over positions (no code shared with the model)."""
    cfg = model.cfg
    P = {k: v.detach().double() for k, v in model.state_dict().items()}
    b, L = ids.shape
    out = {}
    resid = P["embed.weight"][ids]
    out["hook_embed"] = resid
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}."
        m = pre + "mixer."
        out[pre + "hook_resid_pre"] = resid
        normed = _rms(resid, P[pre + "norm.weight"], cfg.norm_eps)
        out[pre + "hook_norm"] = normed
        proj = normed @ P[m + "in_proj.weight"].T
        if cfg.bias:
            proj = proj + P[m + "in_proj.bias"]
        e, n, k = cfg.d_inner, cfg.d_state, cfg.d_conv
        if cfg.arch == "mamba1":
            xin, z = proj[..., :e], proj[..., e:]
        else:
            z, xin = proj[..., :e], proj[..., e:e + cfg.conv_dim]
            dt_raw = proj[..., e + cfg.conv_dim:]
        out[m + "hook_in_x"], out[m + "hook_in_z"] = xin, z
        out[m + "hook_conv_state"] = torch.zeros(b, k - 1, xin.shape[-1], dtype=torch.float64)  # no state given
        W = P[m + "conv1d.weight"][:, 0]  # (c, k)
        conv = torch.zeros_like(xin)
        for t in range(L):
            for j in range(k):  # tap j reads position t - (k - 1 - j)
                s = t - (k - 1 - j)
                if s >= 0:
                    conv[:, t] += W[:, j] * xin[:, s]
        if cfg.conv_bias:
            conv = conv + P[m + "conv1d.bias"]
        out[m + "hook_conv"] = conv
        act = F.silu(conv)
        if cfg.arch == "mamba1":
            u = act
            r = cfg.dt_rank_value
            dbc = u @ P[m + "x_proj.weight"].T
            dt_low, B, C = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
            dt = F.softplus(dt_low @ P[m + "dt_proj.weight"].T + P[m + "dt_proj.bias"])
            A = -torch.exp(P[m + "A_log"])  # (e, n)
            h = torch.zeros(b, e, n, dtype=torch.float64)
            dAs, states, ys = [], [], []
            for t in range(L):
                dA = torch.exp(dt[:, t, :, None] * A)
                h = dA * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
                dAs.append(dA)
                states.append(h)
                ys.append((h * C[:, t, None, :]).sum(-1) + P[m + "D"] * u[:, t])
            y = torch.stack(ys, 1)
            gate = F.silu(z)
            gated = y * gate
            out.update({m + "hook_x": u, m + "hook_dt_low": dt_low, m + "hook_dt": dt, m + "hook_B": B, m + "hook_C": C,
                        m + "hook_dA": torch.stack(dAs, 1), m + "hook_h0": torch.zeros(b, e, n, dtype=torch.float64),
                        m + "hook_ssm_state": torch.stack(states, 1), m + "hook_y": y, m + "hook_gate": gate,
                        m + "hook_gated": gated})
        else:
            H, p, g = cfg.nheads, cfg.headdim, cfg.ngroups
            x = act[..., :e].reshape(b, L, H, p)
            B = act[..., e:e + g * n].reshape(b, L, g, n)
            C = act[..., e + g * n:].reshape(b, L, g, n)
            dt = F.softplus(dt_raw + P[m + "dt_bias"]).clamp(*cfg.dt_limit)
            A = -torch.exp(P[m + "A_log"])
            D = P[m + "D"].reshape(H, p) if cfg.D_has_hdim else P[m + "D"][:, None].expand(H, p)
            hs = torch.zeros(b, H, p, n, dtype=torch.float64)
            dAs, states, ys = [], [], []
            for t in range(L):
                dA = torch.exp(dt[:, t] * A)  # (b, H)
                new = torch.empty_like(hs)
                y_t = torch.empty(b, H, p, dtype=torch.float64)
                for head in range(H):
                    grp = head // (H // g)
                    new[:, head] = dA[:, head, None, None] * hs[:, head] + \
                        (dt[:, t, head, None] * x[:, t, head])[:, :, None] * B[:, t, grp, None, :]
                    y_t[:, head] = (new[:, head] * C[:, t, grp, None, :]).sum(-1) + D[head] * x[:, t, head]
                hs = new
                dAs.append(dA)
                states.append(hs)
                ys.append(y_t)
            y = torch.stack(ys, 1)
            gate = F.silu(z)
            yg = (y.reshape(b, L, e) * gate).reshape(b, L, g, e // g)
            gated = _rms(yg, None, cfg.norm_eps).reshape(b, L, e) * P[m + "norm.weight"]
            out.update({m + "hook_x": x, m + "hook_dt": dt, m + "hook_B": B, m + "hook_C": C,
                        m + "hook_dA": torch.stack(dAs, 1), m + "hook_h0": torch.zeros(b, H, p, n, dtype=torch.float64),
                        m + "hook_ssm_state": torch.stack(states, 1), m + "hook_y": y, m + "hook_gate": gate,
                        m + "hook_gated": gated})
        mix = out[m + "hook_gated"] @ P[m + "out_proj.weight"].T
        if cfg.bias:
            mix = mix + P[m + "out_proj.bias"]
        out[m + "hook_out"] = mix
        resid = resid + mix
        out[pre + "hook_resid_post"] = resid
    out["hook_norm_final"] = _rms(resid, P["norm_f.weight"], cfg.norm_eps)
    out["logits"] = out["hook_norm_final"] @ P["lm_head.weight"].T
    return out


CONFIGS = [
    MambaConfig(arch="mamba1", d_model=16, n_layer=2, vocab_size=13, d_state=4, dt_rank=3, bias=True),
    MambaConfig(arch="mamba1", d_model=24, n_layer=1, vocab_size=9, d_state=8, d_conv=3, tie_embeddings=False),
    MambaConfig(arch="mamba2", d_model=16, n_layer=2, vocab_size=13, d_state=4, headdim=8, ngroups=2),
    MambaConfig(arch="mamba2", d_model=16, n_layer=1, vocab_size=13, d_state=8, headdim=4, ngroups=1, D_has_hdim=True,
                dt_limit=(0.05, 0.8), bias=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.arch}-d{c.d_model}-n{c.d_state}")
def test_every_hook_equals_independent_computation(cfg):
    torch.manual_seed(0)
    model = HookedMamba(cfg)
    perturb(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    logits, cache = model.run_with_cache(ids)
    ref = reference_hooks(model, ids)
    assert set(cache.keys()) == set(ref) - {"logits"} == set(model.hook_dict)
    for name, value in cache.items():
        assert value.shape == ref[name].shape, name
        scale = ref[name].abs().max().clamp_min(1e-3)
        err = (value.double() - ref[name]).abs().max() / scale
        assert err < 2e-5, f"{name}: relative error {err:.2e}"
    assert ((logits.double() - ref["logits"]).abs().max() / ref["logits"].abs().max()) < 2e-5
