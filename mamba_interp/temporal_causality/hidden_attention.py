"""Hidden attention of the selective scan, and knockout of token-to-token flow through one layer's SSM.

Mamba-1, per channel e (Ali, Zimerman & Wolf 2024, "The Hidden Attention of Mamba Models", arXiv 2403.01590,
§3): unrolling h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t u_t and y_t = C_t·h_t + D u_t gives

    y_t[e] = Σ_{s≤t} α[e, t, s] u_s[e] + D[e] u_t[e],
    α[e, t, s] = Σ_n C_t[n] · exp(A[e, n] Σ_{k=s+1..t} Δ_k[e]) · Δ_s[e] B_s[n].

Mamba-2, per head h with group g(h) (Dao & Gu 2024, arXiv 2405.21060, §3–4: the SSD quadratic "dual" form):

    M[h, t, s] = (C_t^{g(h)} · B_s^{g(h)}) · exp(A_h Σ_{k=s+1..t} Δ_k[h]) · Δ_s[h],
    y_t[h] = Σ_{s≤t} M[h, t, s] x_s[h] + D_h x_t[h].

The exponent is always a *direct* sum over the segment — ``ops.ssd.segsum`` for whole matrices,
:func:`segsum_rows` for selected rows — never a difference of two growing cumulative sums, so long sequences
lose no precision. The inputs u (x), Δ, B, C are read from the layer's own hooks (``hook_x``, ``hook_dt``,
``hook_B``, ``hook_C``): the mixer is not re-implemented. Both are the attention *inside* the mixer, before the
gate and out_proj (Mamba-2: before the gated RMSNorm).

Knockout (Endy et al. 2025, "Mamba Knockout", arXiv 2505.24244, their ``ZERO_ATTENTION`` mode) sets α[·, t, s]
(M[·, t, s]) to zero for every source s and destination t listed, in every channel (head): destinations read
the state the scan would have without the sources' writes. It does not block the conv window (s ≥ t − 3 still
reaches t through the short convolution), the D skip, or what earlier layers already moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba_interp.models.cache import get_act_name
from mamba_interp.models.ops.ssd import segsum

REDUCTIONS = ("none", "mean_abs", "norm")
CHUNK_ELEMENTS = 2**23
"""Elements of one [batch, units, rows, l] working tensor (32 MiB in float32); a few such tensors are alive at a
time, so ``reduce != "none"`` stays within ~150 MiB whatever the length."""

SSM_HOOKS = ("x", "dt", "B", "C")


@dataclass
class SSMInputs:
    """What one layer's scan consumed (``ssm_inputs``), in float32 (float64 for a float64 model).

    Mamba-1: u [b, l, e], dt [b, l, e], B, C [b, l, n], A [e, n], D [e].
    Mamba-2: u (= x) [b, l, h, p], dt [b, l, h], B, C [b, l, g, n], A [h], D [h] or [h, p].
    """

    arch: str
    u: Tensor
    dt: Tensor
    B: Tensor
    C: Tensor
    A: Tensor
    D: Tensor

    @property
    def units(self) -> int:
        """Channels (Mamba-1) or heads (Mamba-2): the units that each have their own l×l matrix."""
        return self.dt.shape[-1]

    def skip(self) -> Tensor:
        """D·u, the part of the scan output that is not hidden attention: [b, l, e] or [b, l, h, p]."""
        if self.arch == "mamba1" or self.D.dim() == 2:
            return self.u * self.D
        return self.u * self.D[:, None]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _from_acts(mixer: Any, arch: str, acts: dict[str, Tensor]) -> SSMInputs:
    dtype = _compute_dtype(acts["x"])
    A = -torch.exp(mixer.A_log.float()).to(dtype)  # rounded as the mixer rounds it
    D = mixer.D.to(dtype)
    if arch == "mamba2" and mixer.cfg.D_has_hdim:
        D = D.view(mixer.cfg.nheads, mixer.cfg.headdim)
    return SSMInputs(arch, *(acts[k].to(dtype) for k in SSM_HOOKS), A, D)


def ssm_inputs(
    model: Any, input_ids: Tensor, layers: int | Sequence[int], attention_mask: Tensor | None = None
) -> dict[int, SSMInputs]:
    """Run ``model`` up to the last requested layer and return each layer's scan inputs (detached)."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    _check_layers(model, layers)
    names = [get_act_name(k, i) for i in layers for k in SSM_HOOKS]
    stop = max(layers) + 1
    with torch.no_grad():
        _, cache = model.run_with_cache(input_ids, attention_mask=attention_mask, names_filter=names,
                                        stop_at_layer=None if stop >= model.cfg.n_layer else stop)
        return {i: _from_acts(model.blocks[i].mixer, model.cfg.arch, {k: cache[k, i] for k in SSM_HOOKS})
                for i in layers}


def _check_layers(model: Any, layers: Sequence[int]) -> None:
    if not hasattr(model, "blocks") or not hasattr(model, "cfg"):
        raise TypeError(f"hidden attention needs a HookedMamba, got {type(model).__name__}")
    n = model.cfg.n_layer
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < n]
    if bad or not layers:
        raise ValueError(f"layer {bad[0] if bad else layers!r} is out of range; the model has layers 0..{n - 1}")


def as_positions(positions: Any, b: int, l: int, what: str = "positions") -> Tensor:
    """Positions as a [b, k] long tensor.

    An int or a list of ints is shared by every sequence; a 1-D tensor holds one position per sequence ([b]); a
    2-D tensor is [b, k] per sequence. Negative values count from the end, as in indexing.
    """
    if isinstance(positions, Tensor):
        pos = positions.long()
        if pos.dim() == 0:
            pos = pos.expand(b, 1)
        elif pos.dim() == 1:
            if pos.shape[0] != b:
                raise ValueError(f"{what}: a 1-D tensor holds one position per sequence ({b}), got {pos.shape[0]}; "
                                 "pass a list of ints for positions shared by every sequence")
            pos = pos[:, None]
        elif pos.dim() != 2 or pos.shape[0] != b:
            raise ValueError(f"{what} must be [batch={b}] or [batch, k], got shape {tuple(pos.shape)}")
    else:
        items = [positions] if isinstance(positions, int) else list(positions)
        if not items or not all(isinstance(p, int) and not isinstance(p, bool) for p in items):
            raise ValueError(f"{what}={positions!r} must be an int, a list of ints or a tensor of positions")
        pos = torch.tensor(items, dtype=torch.long).expand(b, len(items))
    pos = torch.where(pos < 0, pos + l, pos)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= l):
        raise ValueError(f"{what} must lie in 0..{l - 1} (sequence length {l}), got {pos.min()}..{pos.max()}")
    return pos


def segsum_rows(a: Tensor, rows: Tensor) -> Tensor:
    """Selected rows of ``ops.ssd.segsum``: ``out[b, ..., j, s] = Σ_{k=s+1..rows[b, j]} a[b, ..., k]`` for
    s ≤ rows[b, j], −inf after. a [b, ..., l], rows [b, T] -> [b, ..., T, l].

    A reversed cumulative sum of ``a`` with the entries after the row's position zeroed: each value is a direct
    sum of its segment (stable), and only T rows are built instead of l.
    """
    l = a.shape[-1]
    pos = torch.arange(l, device=a.device)
    extra = a.dim() - 2  # unit dims between batch and l
    upto = (pos <= rows[..., None]).view(rows.shape[0], *([1] * extra), rows.shape[1], l)  # (b, .., T, l)
    masked = torch.where(upto, a.unsqueeze(-2), torch.zeros((), dtype=a.dtype, device=a.device))
    rev = masked.flip(-1).cumsum(-1).flip(-1)  # Σ_{k ≥ s}
    return F.pad(rev[..., 1:], (0, 1)).masked_fill(~upto, -torch.inf)  # Σ_{k ≥ s+1}


def _unit_weights(inp: SSMInputs, bs: slice, units: Tensor, rows: Tensor | None) -> Tensor:
    """α (Mamba-1) or M (Mamba-2) for a block of sequences and units: [b', k, T, l] (T = l when rows is None)."""
    neg_dt = -inp.dt[bs][..., units].transpose(1, 2)  # (b', k, l)
    log_decay = segsum(neg_dt) if rows is None else segsum_rows(neg_dt, rows[bs])  # −Σ Δ, (b', k, T, l)
    tiny = torch.finfo(neg_dt.dtype).tiny  # |A| > 0 keeps exp(|A|·(−inf)) = 0 above the diagonal
    B, C = inp.B[bs], inp.C[bs]
    if rows is not None:
        C = C[torch.arange(C.shape[0])[:, None], rows[bs]]  # (b', T, n) or (b', T, g, n)
    if inp.arch == "mamba1":
        absA = inp.A[units].abs().clamp_min(tiny)  # (k, n)
        w = torch.zeros_like(log_decay)
        for i in range(absA.shape[1]):  # one state dimension at a time: never a [b, k, n, T, l] tensor
            cb = C[:, None, :, i, None] * B[:, None, None, :, i]  # (b', 1, T, l)
            w += cb * torch.exp(absA[None, :, i, None, None] * log_decay)
    else:
        absA = inp.A[units].abs().clamp_min(tiny)  # (k,)
        group = units // (inp.units // B.shape[2])  # g(h)
        cb = torch.einsum("btgn,bsgn->bgts", C, B)[:, group]  # (b', k, T, l)
        w = cb * torch.exp(absA[None, :, None, None] * log_decay)
    return w * (-neg_dt)[:, :, None, :]  # · Δ_s


def attention_weights(
    inp: SSMInputs,
    query_positions: Tensor | None = None,
    units: Any = None,
    reduce: str = "none",
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """Hidden attention from captured scan inputs (see :func:`hidden_attention` for the meaning).

    query_positions: None (every row: T = l) or [b, T] long (only those rows). units: channel/head indices or
    None (all). Returns [b, k, T, l] for ``reduce="none"``, else [b, T, l] reduced over the k units inside the
    loop over blocks of units, so no [b, e, l, l] tensor is ever held.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} is unknown; use one of {REDUCTIONS}")
    b, l = inp.dt.shape[:2]
    idx = (torch.arange(inp.units) if units is None else torch.as_tensor(units, dtype=torch.long).reshape(-1))
    idx = idx.to(inp.dt.device)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= inp.units:
        unit = "channel" if inp.arch == "mamba1" else "head"
        raise ValueError(f"{unit} indices must lie in 0..{inp.units - 1}, got {units!r}")
    T = l if query_positions is None else query_positions.shape[1]
    per_seq = T * l
    bc = max(1, min(b, chunk_elements // per_seq))
    kc = max(1, chunk_elements // (bc * per_seq))
    shape = (b, idx.numel(), T, l) if reduce == "none" else (b, T, l)
    out = torch.zeros(shape, dtype=inp.dt.dtype, device=inp.dt.device)
    for b0 in range(0, b, bc):
        bs = slice(b0, min(b, b0 + bc))
        for k0 in range(0, idx.numel(), kc):
            w = _unit_weights(inp, bs, idx[k0:k0 + kc], query_positions)
            if reduce == "none":
                out[bs, k0:k0 + kc] = w
            elif reduce == "mean_abs":
                out[bs] += w.abs().sum(1)
            else:
                out[bs] += w.square().sum(1)
    if reduce == "mean_abs":
        out /= idx.numel()
    elif reduce == "norm":
        out.sqrt_()
    return out


def hidden_attention(
    model: Any,
    input_ids: Tensor,
    layer: int,
    attention_mask: Tensor | None = None,
    channels: Any = None,
    reduce: str = "none",
    query_positions: Any = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> Tensor:
    """The hidden-attention matrices of one layer (module docstring): the scan output is exactly
    ``y_t = Σ_{s≤t} α[t, s] u_s + D u_t`` per channel (Mamba-1) or head (Mamba-2), α = 0 above the diagonal.

    input_ids [b, l]; ``channels``: channel (Mamba-1) or head (Mamba-2) indices, default all. ``reduce``:
    "none" -> [b, e, l, l] (Mamba-2 [b, h, l, l]; only the selected units); "mean_abs" (mean |α| over the units)
    or "norm" (L2 norm over them) -> [b, l, l], reduced block by block so that a real model (e = 1536,
    l = 1024) never holds [b, e, l, l]. ``query_positions`` (ints shared by all sequences, or [b] / [b, T]
    per sequence) computes only those rows t: the l axis of rows becomes T. Padding (``attention_mask``) is
    handled as the model does: padded positions feed u = 0, so their columns contribute nothing.
    Cost: O(b·e·n·T·l) time (Mamba-2 O(b·T·l·(g·n + h))), memory O(chunk_elements) beyond the output.
    """
    inp = ssm_inputs(model, input_ids, [layer], attention_mask)[layer]
    b, l = inp.dt.shape[:2]
    rows = None if query_positions is None else as_positions(query_positions, b, l, "query_positions")
    return attention_weights(inp, rows, channels, reduce, chunk_elements)


def _first_occurrence(pos: Tensor) -> Tensor:
    """[b, T] bool: True where a position has not appeared earlier in its row (duplicates knock out once)."""
    same = pos[:, :, None] == pos[:, None, :]  # (b, T, T)
    earlier = torch.tril(torch.ones_like(same[0]), diagonal=-1)
    return ~(same & earlier).any(-1)


def knockout(
    model: Any,
    input_ids: Tensor,
    layer: int,
    src_positions: Any,
    dst_positions: Any,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Logits [b, l, v] with the flow from every source to every destination token blocked in ``layer``'s SSM:
    α[·, t, s] = 0 (Mamba-2: M[·, t, s] = 0) for s in ``src_positions`` and t in ``dst_positions``.

    Positions: ints / lists shared by every sequence, or [b] / [b, k] tensors per sequence. Implemented as one
    forward whose ``hook_y`` hook subtracts Σ_{s∈src} α[t, s] u_s at each destination t (rows from the same
    forward's Δ, B, C, u), which equals a scan that skips the sources' writes for the destinations' readout
    (mamba-knockout's ``ZERO_ATTENTION``); differentiable. The conv window and the D skip are not blocked.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    _check_layers(model, [layer])
    b, l = ids.shape
    src = as_positions(src_positions, b, l, "src_positions").to(ids.device)
    dst = as_positions(dst_positions, b, l, "dst_positions").to(ids.device)
    src_mask = torch.zeros(b, l, dtype=torch.bool, device=ids.device)
    src_mask[torch.arange(b, device=ids.device)[:, None], src] = True
    keep = _first_occurrence(dst)
    seen: dict[str, Tensor] = {}

    def grab(t: Tensor, hook: Any) -> None:
        seen[hook.name.rsplit("hook_", 1)[1]] = t

    def cut(y: Tensor, hook: Any) -> Tensor:
        inp = _from_acts(model.blocks[layer].mixer, model.cfg.arch, seen)
        w = attention_weights(inp, dst) * src_mask[:, None, None, :]  # (b, k, T, l)
        if inp.arch == "mamba1":
            removed = torch.einsum("bkts,bsk->btk", w, inp.u)  # (b, T, e)
        else:
            removed = torch.einsum("bkts,bskp->btkp", w, inp.u)  # (b, T, h, p)
        removed = removed * keep.view(b, -1, *([1] * (removed.dim() - 2)))
        index = dst.view(b, -1, *([1] * (removed.dim() - 2))).expand_as(removed)
        return (y - torch.zeros_like(y).scatter_add(1, index, removed.to(y.dtype))).to(y.dtype)

    hooks = [(get_act_name(k, layer), grab) for k in SSM_HOOKS] + [(get_act_name("y", layer), cut)]
    with model.hooks(fwd_hooks=hooks):
        return model(ids, attention_mask=attention_mask)
