"""Mamba-1 selective scan (Gu & Dao 2023, arXiv 2312.00752, Algorithm 2 / §3.3).

    h_t = exp(Δ_t A) ⊙ h_{t-1} + (Δ_t u_t) B_t          h: [b, e, n]
    y_t = h_t C_t + D ⊙ u_t

All implementations share one signature, ``scan(u, delta, A, B, C, D, h0=None) -> (y, h_last)``:

    u, delta  [b, l, e]     A [e, n]     B, C [b, l, n]     D [e]     h0 [b, e, n] | None
    y [b, l, e] (float32)   h_last [b, e, n] (float32)

* :func:`selective_scan_ref` — the reference: a step loop over tensors unbound once along l (slicing inside
  the loop would make the backward O(l²); see docs/performance.md).
* :func:`selective_scan_loop` — the CPU fast path: a blocked loop with a hand-written backward that never holds
  the [b, l, e, n] tensors, only per-block ones, recomputing each block's states from a checkpoint in the
  backward. Forward and backward are linear in l.
* :func:`selective_scan_parallel` — a Hillis–Steele scan over l (log-depth; the GPU path without mamba_ssm).
  It multiplies decays in [0, 1] only, so it is stable for any Δ.

:func:`linear_recurrence` runs ``h_t = a_t h_{t-1} + x_t`` on materialised tensors; it backs the paths where a
hook needs every per-token state (``hook_ssm_state``) or changes the decays (``hook_dA``).
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK = 16  # measured: 8-32 best on CPU (work buffers stay in cache)


def linear_recurrence(
    decay: torch.Tensor, inp: torch.Tensor, h0: torch.Tensor | None = None
) -> torch.Tensor:
    """All states of ``h_t = decay_t * h_{t-1} + inp_t``; ``decay`` broadcasts against ``inp`` [b, l, ...]."""
    decay = decay.expand_as(inp)
    h = torch.zeros_like(inp[:, 0]) if h0 is None else h0.to(inp.dtype)
    states = []
    for a_t, x_t in zip(decay.unbind(1), inp.unbind(1)):  # unbind once: linear-time backward
        h = a_t * h + x_t
        states.append(h)
    return torch.stack(states, dim=1)


def selective_scan_ref(u, delta, A, B, C, D, h0=None):
    """Reference step loop (materialises exp(ΔA) and ΔBu, [b, l, e, n])."""
    u, delta, A, B, C, D = (t.float() for t in (u, delta, A, B, C, D))
    dA = torch.exp(torch.einsum("ble,en->blen", delta, A))  # (b, l, e, n)
    dBu = torch.einsum("ble,bln->blen", delta * u, B)  # (b, l, e, n)
    h = torch.zeros_like(dA[:, 0]) if h0 is None else h0.float()
    ys = []
    for a_t, x_t, c_t in zip(dA.unbind(1), dBu.unbind(1), C.unbind(1)):
        h = a_t * h + x_t  # (b, e, n)
        ys.append(torch.einsum("ben,bn->be", h, c_t))
    y = torch.stack(ys, dim=1) + u * D  # (b, l, e)
    return y, h


# ---- CPU fast path ------------------------------------------------------------------------------
class _TimeMajor:
    """The scan's inputs laid out time-major and contiguous once, so each block is a contiguous slice, plus
    [s, b, e, n] work buffers reused by every block (a few MiB instead of [b, l, e, n])."""

    def __init__(self, u, delta, A, B, block):
        self.A = A
        self.d = delta.transpose(0, 1).contiguous()  # (l, b, e)
        self.du = (delta * u).transpose(0, 1).contiguous()  # (l, b, e)
        self.B = B.transpose(0, 1).contiguous()  # (l, b, n)
        length, b, e = self.d.shape
        self.T = min(block, length)
        shape = (self.T, b, e, A.shape[1])
        self.dA = torch.empty(shape, dtype=u.dtype, device=u.device)
        self.dBu = torch.empty(shape, dtype=u.dtype, device=u.device)
        self.states = torch.empty(shape, dtype=u.dtype, device=u.device)

    def blocks(self):
        length = self.d.shape[0]
        return [(t0, min(t0 + self.T, length)) for t0 in range(0, length, self.T)]

    def discretise(self, t0, t1):
        """exp(Δ_t A) and Δ_t u_t B_t of one block into the buffers: dA, dBu [s, b, e, n]."""
        s = t1 - t0
        dA, dBu = self.dA[:s], self.dBu[:s]
        torch.mul(self.d[t0:t1, :, :, None], self.A, out=dA).exp_()
        torch.mul(self.du[t0:t1, :, :, None], self.B[t0:t1, :, None, :], out=dBu)
        return dA, dBu

    def run(self, t0, t1, h):
        """States of one block from the state h before it; one fused op per step, written in place."""
        dA, dBu = self.discretise(t0, t1)
        states = self.states[: t1 - t0]
        for i in range(t1 - t0):
            h = torch.addcmul(dBu[i], dA[i], h, out=states[i])
        return dA, dBu, states


class _SelectiveScanLoop(torch.autograd.Function):
    """Blocked loop; the backward recomputes each block's states from a per-block checkpoint and runs the
    reverse scan  G_t = C_t gy_t + exp(Δ_{t+1} A) G_{t+1}  (G_t = dL/dh_t) with one fused op per step."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, h0, block):
        b, l, e = u.shape
        tm = _TimeMajor(u, delta, A, B, block)
        CT = C.transpose(0, 1).contiguous()  # (l, b, n)
        h = torch.zeros(b, e, A.shape[1], dtype=u.dtype, device=u.device) if h0 is None else h0
        yT = torch.empty(l, b, e, dtype=u.dtype, device=u.device)
        checkpoints = []
        for t0, t1 in tm.blocks():
            checkpoints.append(h)
            _, _, states = tm.run(t0, t1, h)
            torch.matmul(states, CT[t0:t1, :, :, None], out=yT[t0:t1, :, :, None])  # y_t = h_t C_t
            h = states[-1].clone()
        ctx.block = block
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(u, delta, A, B, C, D, torch.stack(checkpoints))
        return yT.transpose(0, 1) + u * D, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh_last):
        u, delta, A, B, C, D, checkpoints = ctx.saved_tensors
        tm = _TimeMajor(u, delta, A, B, ctx.block)
        CT = C.transpose(0, 1).contiguous()  # (l, b, n)
        gyT = gy.transpose(0, 1).contiguous()  # (l, b, e)
        G_buf = torch.empty_like(tm.dA)
        g_d, g_du = torch.empty_like(tm.d), torch.empty_like(tm.du)  # (l, b, e)
        g_B, g_C = torch.empty_like(tm.B), torch.empty_like(CT)  # (l, b, n)
        g_A = torch.zeros_like(A)
        carry = gh_last.clone()  # dL/dh at the end of the current block, from everything after it
        for i, (t0, t1) in reversed(list(enumerate(tm.blocks()))):
            s, h_start = t1 - t0, checkpoints[i]
            dA, scratch, states = tm.run(t0, t1, h_start)
            G = torch.mul(gyT[t0:t1, :, :, None], CT[t0:t1, :, None, :], out=G_buf[:s])  # (s, b, e, n)
            G[s - 1] += carry
            for j in range(s - 2, -1, -1):
                torch.addcmul(G[j], dA[j + 1], G[j + 1], out=G[j])
            carry = dA[0] * G[0]
            g_C[t0:t1] = torch.matmul(states.transpose(-1, -2), gyT[t0:t1, :, :, None]).squeeze(-1)
            g_du[t0:t1] = torch.matmul(G, tm.B[t0:t1, :, :, None]).squeeze(-1)
            g_B[t0:t1] = torch.matmul(G.transpose(-1, -2), tm.du[t0:t1, :, :, None]).squeeze(-1)
            # dL/d(Δ_t A) = G_t ⊙ h_{t-1} ⊙ exp(Δ_t A), built in the dBu buffer (no longer needed)
            P = torch.mul(G, dA, out=scratch)
            P[0] *= h_start
            P[1:] *= states[:-1]
            g_d[t0:t1] = torch.einsum("sben,en->sbe", P, A)
            g_A += torch.einsum("sben,sbe->en", P, tm.d[t0:t1])
        g_du = g_du.transpose(0, 1)  # (b, l, e)
        g_delta = g_d.transpose(0, 1) + g_du * u
        g_u = g_du * delta + gy * D
        g_D = (gy * u).sum(dim=(0, 1))
        return (g_u, g_delta, g_A, g_B.transpose(0, 1), g_C.transpose(0, 1), g_D,
                carry if ctx.has_h0 else None, None)


def selective_scan_loop(u, delta, A, B, C, D, h0=None, block: int = DEFAULT_BLOCK):
    """CPU fast path (see module docstring). Computes in float32, or float64 for float64 inputs."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    args = [t.to(dtype).contiguous() for t in (u, delta, A, B, C, D)]
    h0 = None if h0 is None else h0.to(dtype).contiguous()
    return _SelectiveScanLoop.apply(*args, h0, block)


# ---- parallel (GPU) path ------------------------------------------------------------------------
def hillis_steele(decay: torch.Tensor, inp: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Inclusive scan of ``h_t = decay_t h_{t-1} + inp_t`` (h_{-1} = 0) along ``dim`` in ⌈log2 l⌉ steps."""
    a, x = decay.expand_as(inp), inp
    length = inp.shape[dim]
    offset = 1
    while offset < length:
        a_prev = torch.narrow(a, dim, 0, length - offset)
        x_prev = torch.narrow(x, dim, 0, length - offset)
        a_cur = torch.narrow(a, dim, offset, length - offset)
        x_cur = torch.narrow(x, dim, offset, length - offset)
        x = torch.cat([torch.narrow(x, dim, 0, offset), a_cur * x_prev + x_cur], dim=dim)
        a = torch.cat([torch.narrow(a, dim, 0, offset), a_cur * a_prev], dim=dim)
        offset *= 2
    return x


def selective_scan_parallel(u, delta, A, B, C, D, h0=None):
    """Log-depth scan over l (materialises [b, l, e, n]; meant for GPUs)."""
    u, delta, A, B, C, D = (t.float() for t in (u, delta, A, B, C, D))
    dA = torch.exp(torch.einsum("ble,en->blen", delta, A))  # (b, l, e, n)
    dBu = torch.einsum("ble,bln->blen", delta * u, B)  # (b, l, e, n)
    if h0 is not None:  # fold h0 into the first input: h_0 = dA_0 h0 + dBu_0
        dBu = torch.cat([(dBu[:, 0] + dA[:, 0] * h0.float()).unsqueeze(1), dBu[:, 1:]], dim=1)
    states = hillis_steele(dA, dBu)
    y = torch.einsum("blen,bln->ble", states, C) + u * D
    return y, states[:, -1]


SCANS = {"reference": selective_scan_ref, "loop": selective_scan_loop, "parallel": selective_scan_parallel}
