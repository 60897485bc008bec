"""Mamba-1 mixer (Gu & Dao 2023, arXiv 2312.00752, §3 and Algorithm 2), hooked at every internal.

Parameter names match mamba_ssm and transformers (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``,
``D``, ``out_proj``), so loading a checkpoint is a key rename. Index letters: see ``models/config.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mamba_interp.models.config import MambaConfig
from mamba_interp.models.hooks import HookPoint
from mamba_interp.models.init import init_layers, inverse_softplus_dt
from mamba_interp.models.norms import RMSNorm
from mamba_interp.models.ops.dispatch import choose_scan
from mamba_interp.models.state import LayerState, initial_ssm_state, mixer_conv
from mamba_interp.models.state_hooks import states_with_substitution


class Mamba1Mixer(nn.Module):
    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank_value
        self.in_proj = nn.Linear(cfg.d_model, 2 * e, bias=cfg.bias)  # x ∥ z
        self.conv1d = nn.Conv1d(e, e, cfg.d_conv, groups=e, padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False)  # δ ∥ B ∥ C
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.empty(e, n))
        self.D = nn.Parameter(torch.empty(e))
        self.out_proj = nn.Linear(e, cfg.d_model, bias=cfg.bias)
        self.bcdt_norm = RMSNorm(1, cfg.bcdt_rms_eps, weight=False) if cfg.bcdt_rms_eps is not None else None
        # hook points, in execution order
        self.hook_in_x = HookPoint()  # (b, l, e)
        self.hook_in_z = HookPoint()  # (b, l, e)
        self.hook_conv_state = HookPoint(lazy=True)  # (b, k-1, e) conv inputs before the first token
        self.hook_conv = HookPoint()  # (b, l, e) conv output before SiLU
        self.hook_x = HookPoint()  # (b, l, e) SSM input u
        self.hook_dt_low = HookPoint()  # (b, l, r)
        self.hook_dt = HookPoint()  # (b, l, e) Δ
        self.hook_B = HookPoint()  # (b, l, n)
        self.hook_C = HookPoint()  # (b, l, n)
        self.hook_dA = HookPoint(lazy=True)  # (b, l, e, n) exp(ΔA)
        self.hook_h0 = HookPoint(lazy=True)  # (b, e, n) state before the first token
        self.hook_ssm_state = HookPoint(lazy=True)  # (b, l, e, n) state after token t
        self.hook_y = HookPoint()  # (b, l, e) C·h + D·u
        self.hook_gate = HookPoint()  # (b, l, e) silu(z)
        self.hook_gated = HookPoint()  # (b, l, e) y·gate
        self.hook_out = HookPoint()  # (b, l, d)
        self.scan_impl = "auto"
        self.last_scan = ""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's initialisation (S4D-real A, Δ log-uniform in [dt_min, dt_max] via the dt_proj bias)."""
        cfg, e, n, r = self.cfg, self.cfg.d_inner, self.cfg.d_state, self.cfg.dt_rank_value
        init_layers(self.in_proj, self.x_proj, self.out_proj, self.conv1d)
        nn.init.uniform_(self.dt_proj.weight, -(r**-0.5), r**-0.5)
        self.dt_proj.bias.copy_(inverse_softplus_dt(e, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand(e, n))
        self.D.fill_(1.0)

    def _rms(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.bcdt_norm is None else self.bcdt_norm(t)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, state: LayerState | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, LayerState]:
        """hidden [b, l, d] (normalised residual), mask [b, l] or None -> [b, l, d]; with the layer's inference
        ``state``, -> ([b, l, d], the state after the last token)."""
        cfg, dtype = self.cfg, hidden.dtype
        if mask is not None:  # padding is zeroed before in_proj and after the conv, as in transformers
            hidden = hidden * mask[..., None].to(dtype)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (b, l, e) each
        x, z = self.hook_in_x(x), self.hook_in_z(z)
        conv, window = mixer_conv(x, self.conv1d, self.hook_conv_state, state, self.scan_impl)
        u = F.silu(self.hook_conv(conv))  # (b, l, e)
        if mask is not None:
            u = u * mask[..., None].to(u.dtype)
        u = self.hook_x(u)
        dt_low, B, C = self.x_proj(u).split([cfg.dt_rank_value, cfg.d_state, cfg.d_state], dim=-1)
        dt_low, B, C = self.hook_dt_low(self._rms(dt_low)), self._rms(B), self._rms(C)
        dt = self.hook_dt(F.softplus(self.dt_proj(dt_low)))  # (b, l, e)
        B, C = self.hook_B(B), self.hook_C(C)  # (b, l, n)
        y, h_last = self.ssm(u, dt, B, C, state)
        y = self.hook_y(y.to(dtype))  # (b, l, e)
        gate = self.hook_gate(F.silu(z))
        gated = self.hook_gated(y * gate)
        out = self.hook_out(self.out_proj(gated))
        return out if state is None else (out, LayerState(window, h_last))

    def ssm(
        self, u: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: LayerState | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Selective scan with the lazily computed hooks, from the state's h (or zeros); returns
        y = C·h + D·u [b, l, e] and the last state [b, e, n], both float32."""
        A = -torch.exp(self.A_log.float())  # (e, n)
        b, _, e = u.shape
        materialise = self.hook_dA.active or self.hook_ssm_state.active
        if materialise:  # hooks run in table order: dA, h0, ssm_state
            u32, dt32 = u.float(), dt.float()
            dA = self.hook_dA(torch.exp(torch.einsum("ble,en->blen", dt32, A)))  # (b, l, e, n)
        h0 = initial_ssm_state(self.hook_h0, state, (b, e, self.cfg.d_state), u.device)
        if not materialise:
            self.last_scan, scan = choose_scan("mamba1", self.scan_impl, u.device, h0 is not None, u.dtype)
            return scan(u, dt, A, B, C, self.D, h0)
        self.last_scan = "materialised"
        dBu = torch.einsum("ble,bln->blen", dt32 * u32, B.float())  # (b, l, e, n)
        states = states_with_substitution(dA, dBu, h0, self.hook_ssm_state)  # (b, l, e, n)
        return torch.einsum("blen,bln->ble", states, C.float()) + u32 * self.D.float(), states[:, -1]
