"""Mamba-2 scan: the SSD recurrence with a scalar decay per head (Dao & Gu 2024, arXiv 2405.21060).

    H_t[h] = exp(Δ_t[h] A_h) H_{t-1}[h] + Δ_t[h] x_t[h] ⊗ B_t[g(h)]      H: [b, h, p, n]
    y_t[h] = H_t[h] C_t[g(h)] + D_h x_t[h]

Shared signature ``scan(x, dt, A, B, C, D, h0=None) -> (y, h_last)``:

    x [b, l, h, p]   dt [b, l, h]   A [h]   B, C [b, l, g, n]   D [h] or [h, p]   h0 [b, h, p, n] | None
    y [b, l, h, p] (float32)        h_last [b, h, p, n] (float32)

Head h reads group ``g(h) = h // (h/g)`` (transformers' ``repeat_interleave``; mamba_ssm's ``(g n)`` layout).

* :func:`ssd_ref` — the reference step loop (materialises per-token states).
* :func:`ssd_chunked` — the chunked SSD algorithm ("Listing 1", ``ssd_minimal.py``), four steps of one einsum
  each. Differences from the listing, for stability and linear cost: every exponent is a *direct* sum of
  log-decays over the segment it spans (masked cumsum for the in-chunk matrix, a reversed cumsum for the decay
  to the chunk's end), never a difference of two long cumsums; and the inter-chunk recurrence is a loop over
  chunks instead of a [chunks × chunks] segsum, so cost stays linear in l.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_interp.models.ops.selective_scan import linear_recurrence

# Chunk length by device and state size. On CPU a short chunk wins for small states: at l = 1024, 8 heads x 64
# (d_state 16) ran fastest at 16-32 and 32 heads x 4 (the zoo's Mamba-2) at 8-16, while 64 was 1.5-2.5x slower.
# Large states are the other way round, since every chunk writes and reads a [b, h, p, n] state: at mamba2-130m's
# 24 heads x 64 x d_state 128, 16 x 256 tokens took 327 / 107 / 93 ms at chunk 16 / 32 / 64 (2 threads).
# On GPUs longer chunks give each kernel launch more work.
DEFAULT_CHUNK = 16
LARGE_STATE_CHUNK = 64
LARGE_STATE = 4096
"""headdim · d_state from which the CPU chunk is ``LARGE_STATE_CHUNK`` (p·n = 2048 ran equally at 16 and 32)."""
GPU_CHUNK = 64


def cpu_chunk(headdim: int, d_state: int) -> int:
    """The CPU chunk length of :func:`ssd_chunked` for heads of ``headdim`` × ``d_state`` states."""
    return LARGE_STATE_CHUNK if headdim * d_state >= LARGE_STATE else DEFAULT_CHUNK


def _heads(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """[b, l, g, n] -> [b, l, h, n] (each group serves h/g consecutive heads)."""
    return t.repeat_interleave(nheads // t.shape[2], dim=2)


def _skip(x: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    return x * (D if D.dim() == 2 else D[:, None])  # (b, l, h, p)


def ssd_ref(x, dt, A, B, C, D, h0=None):
    """Reference: step loop over materialised per-token inputs."""
    x, dt, A, B, C, D = (t.float() for t in (x, dt, A, B, C, D))
    h = x.shape[2]
    decay = torch.exp(dt * A)  # (b, l, h)
    dBx = torch.einsum("blh,blhp,blhn->blhpn", dt, x, _heads(B, h))  # (b, l, h, p, n)
    states = linear_recurrence(decay[..., None, None], dBx, h0)  # (b, l, h, p, n)
    y = torch.einsum("blhpn,blhn->blhp", states, _heads(C, h)) + _skip(x, D)
    return y, states[:, -1]


def segsum(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = Σ_{k=j+1..i} a[..., k]`` for j ≤ i, −inf above the diagonal (stable form)."""
    T = a.shape[-1]
    a = a[..., :, None].expand(*a.shape, T)  # (..., i, j) = a_i
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~strict, 0), dim=-2)
    incl = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~incl, -torch.inf)


def segsum_unstable(a: torch.Tensor) -> torch.Tensor:
    """Difference-of-cumsums form: cancels catastrophically once the cumsum is large. Kept for the tests."""
    cs = torch.cumsum(a, dim=-1)
    out = cs[..., :, None] - cs[..., None, :]
    T = a.shape[-1]
    incl = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~incl, -torch.inf)


def ssd_chunked(x, dt, A, B, C, D, h0=None, chunk: int | None = None):
    """Chunked SSD: matmul-shaped, linear in l, no per-token state materialised. ``chunk``: the chunk length
    (None: :func:`cpu_chunk` of the heads' state size)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, dt, A, B, C, D = (t.to(dtype) for t in (x, dt, A, B, C, D))
    b, l, nh, p = x.shape
    g, n = B.shape[2], B.shape[3]
    chunk = chunk if chunk is not None else cpu_chunk(p, n)
    k = nh // g  # heads per group
    T = min(chunk, l)
    pad = (-l) % T
    if pad:  # Δ = 0 on padding: decay 1 and input 0, so the final state is unchanged
        x, dt, B, C = (F.pad(t, (0,) * (2 * (t.dim() - 2)) + (0, pad)) for t in (x, dt, B, C))
    c = (l + pad) // T
    xc = x.view(b, c, T, g, k, p)
    dtc = dt.view(b, c, T, g, k)
    Bc, Cc = B.view(b, c, T, g, n), C.view(b, c, T, g, n)
    a = (dt * A).view(b, c, T, g, k)  # log-decay per step, ≤ 0

    # 1. intra-chunk output (diagonal blocks): Y_diag = (C Bᵀ ∘ L ∘ Δ_j) X
    Lmat = torch.exp(segsum(a.permute(0, 1, 3, 4, 2)))  # (b, c, g, k, i, j)
    CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)  # (b, c, g, i, j)
    M = CB.unsqueeze(3) * Lmat * dtc.permute(0, 1, 3, 4, 2).unsqueeze(-2)  # (b, c, g, k, i, j)
    y = torch.einsum("bcgkij,bcjgkp->bcigkp", M, xc)  # (b, c, s, g, k, p)

    # 2. each chunk's own final state: decay from step s to the chunk's end = exp(Σ_{t>s} a_t)
    rev = torch.flip(torch.cumsum(torch.flip(a, [2]), 2), [2])  # Σ_{t≥s} a_t
    to_end = torch.exp(torch.cat([rev[:, :, 1:], torch.zeros_like(rev[:, :, :1])], dim=2))  # (b, c, s, g, k)
    # weight x first: one batched [k·p, s] x [s, n] product per (b, c, g); a three-operand einsum here contracted
    # B with the weights into a [b, c, s, g, k, n] intermediate and ran 2.5x slower (mamba2-130m's shapes, CPU)
    xw = xc * (to_end * dtc)[..., None]  # (b, c, s, g, k, p)
    chunk_states = torch.einsum("bcsgn,bcsgkp->bcgkpn", Bc, xw)  # (b, c, g, k, p, n)

    # 3. inter-chunk recurrence, a loop over chunks: start_{c+1} = exp(Σ_chunk a) start_c + chunk_state_c
    chunk_decay = torch.exp(a.sum(dim=2))  # (b, c, g, k)
    h = (
        torch.zeros(b, g, k, p, n, dtype=dtype, device=x.device)
        if h0 is None
        else h0.to(dtype).reshape(b, g, k, p, n)
    )
    starts = []
    for dec, st in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
        starts.append(h)
        h = dec[..., None, None] * h + st
    start = torch.stack(starts, dim=1)  # (b, c, g, k, p, n)

    # 4. contribution of each chunk's start state: exp(Σ_{t≤s} a_t) C_s · start
    from_start = torch.exp(torch.cumsum(a, dim=2))  # (b, c, s, g, k)
    y = y + torch.einsum("bcsgn,bcgkpn,bcsgk->bcsgkp", Cc, start, from_start)
    y = y.reshape(b, c * T, nh, p)[:, :l]
    return y + _skip(x[:, :l], D), h.reshape(b, nh, p, n)


SCANS = {"reference": ssd_ref, "chunked": ssd_chunked}
