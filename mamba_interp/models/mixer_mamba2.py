"""Mamba-2 mixer (Dao & Gu 2024, arXiv 2405.21060, §7 "Mamba-2 architecture"), hooked at every internal.

One ``in_proj`` gives z ∥ xBC ∥ dt ("parallel projections"); the conv runs over x, B and C together; the
decay is a scalar per head; the output goes through the gated RMSNorm before ``out_proj``.
Parameter names match mamba_ssm / transformers (``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``,
``norm``, ``out_proj``). Index letters: see ``models/config.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba_interp.models.config import MambaConfig
from mamba_interp.models.hooks import HookPoint
from mamba_interp.models.init import init_layers, inverse_softplus_dt
from mamba_interp.models.norms import GatedRMSNorm
from mamba_interp.models.ops.dispatch import choose_scan
from mamba_interp.models.state import LayerState, initial_ssm_state, mixer_conv
from mamba_interp.models.state_hooks import states_with_substitution


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, h, gn = cfg.d_inner, cfg.nheads, cfg.ngroups * cfg.d_state
        self.in_proj = nn.Linear(cfg.d_model, 2 * e + 2 * gn + h, bias=cfg.bias)  # z ∥ x ∥ B ∥ C ∥ dt
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(e if cfg.D_has_hdim else h))
        self.norm = GatedRMSNorm(e, group_size=e // cfg.ngroups, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(e, cfg.d_model, bias=cfg.bias)
        # hook points, in execution order
        self.hook_in_x = HookPoint()  # (b, l, e + 2gn) the x, B, C part of in_proj
        self.hook_in_z = HookPoint()  # (b, l, e)
        self.hook_conv_state = HookPoint(lazy=True)  # (b, k-1, e + 2gn) conv inputs before the first token
        self.hook_conv = HookPoint()  # (b, l, e + 2gn) before SiLU
        self.hook_x = HookPoint()  # (b, l, h, p)
        self.hook_dt = HookPoint()  # (b, l, h) Δ after bias, softplus and clamp
        self.hook_B = HookPoint()  # (b, l, g, n)
        self.hook_C = HookPoint()  # (b, l, g, n)
        self.hook_dA = HookPoint(lazy=True)  # (b, l, h) exp(ΔA)
        self.hook_h0 = HookPoint(lazy=True)  # (b, h, p, n) state before the first token
        self.hook_ssm_state = HookPoint(lazy=True)  # (b, l, h, p, n)
        self.hook_y = HookPoint()  # (b, l, h, p) C·h + D·x
        self.hook_gate = HookPoint()  # (b, l, e) silu(z)
        self.hook_gated = HookPoint()  # (b, l, e) gated RMSNorm output
        self.hook_out = HookPoint()  # (b, l, d)
        self.scan_impl = "auto"
        self.last_scan = ""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's Mamba2 initialisation (A = U(A_init_range), Δ log-uniform via dt_bias)."""
        cfg, h = self.cfg, self.cfg.nheads
        init_layers(self.in_proj, self.out_proj, self.conv1d)
        self.dt_bias.copy_(inverse_softplus_dt(h, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        lo, hi = cfg.A_init_range
        self.A_log.copy_(torch.log(torch.empty(h).uniform_(lo, hi)))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, state: LayerState | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, LayerState]:
        """hidden [b, l, d] (normalised residual), mask [b, l] or None -> [b, l, d]; with the layer's inference
        ``state``, -> ([b, l, d], the state after the last token)."""
        cfg, dtype = self.cfg, hidden.dtype
        b, l, _ = hidden.shape
        e, h, p, g, n = cfg.d_inner, cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        if mask is not None:  # as transformers: zero padding before in_proj and after the conv
            hidden = hidden * mask[..., None].to(dtype)
        z, xBC, dt_raw = self.in_proj(hidden).split([e, cfg.conv_dim, h], dim=-1)
        xBC, z = self.hook_in_x(xBC), self.hook_in_z(z)
        conv, window = mixer_conv(xBC, self.conv1d, self.hook_conv_state, state, self.scan_impl)
        xBC = F.silu(self.hook_conv(conv))  # (b, l, e + 2gn)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        x, B, C = xBC.split([e, g * n, g * n], dim=-1)
        x = self.hook_x(x.reshape(b, l, h, p))
        dt = F.softplus(dt_raw + self.dt_bias).clamp(*cfg.dt_limit)  # (b, l, h)
        dt = self.hook_dt(dt)
        B, C = self.hook_B(B.reshape(b, l, g, n)), self.hook_C(C.reshape(b, l, g, n))
        y, h_last = self.ssm(x, dt, B, C, state)
        y = self.hook_y(y.to(dtype))  # (b, l, h, p)
        gate = self.hook_gate(F.silu(z))  # (b, l, e)
        gated = self.hook_gated(self.norm(y.reshape(b, l, e), gate))
        out = self.hook_out(self.out_proj(gated.to(dtype)))
        return out if state is None else (out, LayerState(window, h_last))

    def ssm(
        self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: LayerState | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SSD scan with the lazily computed hooks, from the state's h (or zeros); returns y = C·H + D·x
        [b, l, h, p] and the last state [b, h, p, n], both float32."""
        cfg = self.cfg
        A = -torch.exp(self.A_log.float())  # (h,)
        D = self.D.float().view(cfg.nheads, cfg.headdim) if cfg.D_has_hdim else self.D.float()
        b, _, h, p = x.shape
        materialise = self.hook_dA.active or self.hook_ssm_state.active
        if materialise:  # hooks run in table order: dA, h0, ssm_state
            x32, dt32 = x.float(), dt.float()
            dA = self.hook_dA(torch.exp(dt32 * A))  # (b, l, h)
        h0 = initial_ssm_state(self.hook_h0, state, (b, h, p, cfg.d_state), x.device)
        if not materialise:
            self.last_scan, scan = choose_scan("mamba2", self.scan_impl, x.device, h0 is not None)
            return scan(x, dt, A, B, C, D, h0)
        self.last_scan = "materialised"
        heads_per_group = h // cfg.ngroups
        Bh = B.float().repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
        Ch = C.float().repeat_interleave(heads_per_group, dim=2)
        dBx = torch.einsum("blh,blhp,blhn->blhpn", dt32, x32, Bh)  # (b, l, h, p, n)
        states = states_with_substitution(dA[..., None, None], dBx, h0, self.hook_ssm_state)
        y = torch.einsum("blhpn,blhn->blhp", states, Ch)
        return y + x32 * (D if D.dim() == 2 else D[:, None]), states[:, -1]
