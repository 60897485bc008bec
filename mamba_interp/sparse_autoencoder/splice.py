"""SAE-in-the-loop: splice SAEs into a hooked model at hook points, edit their latents, attribute to them.

``run_with_saes(model, ids, saes={hook: sae}, use_error_term=...)`` is SAELens' ``HookedSAETransformer.run_with_saes``
for a :class:`~mamba_interp.models.HookedMamba` (also ``model.run_with_saes``). At each named hook the activation
x [b, l, ...] (Mamba-2's head-shaped hooks are flattened to [b, l, h·p]) is replaced by the SAE's reconstruction
x̂ = decode(f') with f = encode(x) [b, l, m] and f' = edit(f) (no edit: f' = f).

With ``use_error_term=True`` the SAE's error x − decode(f) is added back (SAELens; Marks et al. 2024, "Sparse
Feature Circuits", §2), written as x + (decode(f') − decode(f)): without an edit the activation passes through
unchanged, so the model is exactly the clean model, and an edit moves x by exactly (f' − f)·W_dec. The
subtracted decode(f) is detached, so gradients reach the latents while the values stay exact; that is what
:func:`latent_attribution` uses.

Edits (``latent_edits={hook: fn}``, fn(f [b, l, m]) -> f'): :func:`ablate_latents` (zero or a fixed value) and
:func:`steer_latents` (add to or clamp latents, at chosen positions) build them; :func:`steering_hook` adds a decoder
direction to an activation without an SAE in the loop (Templeton et al. 2024, "Scaling Monosemanticity", feature
steering). Hooks are attached only for the duration of the call (``model.hooks``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mamba_interp.sparse_autoencoder.model import SparseAutoencoder

LatentEdit = Callable[[Tensor], Tensor]
"""f [b, l, m] -> f' [b, l, m] (return a new tensor; the input is the SAE's encoding)."""


@dataclass
class SAESplice:
    """The hook function that splices one SAE into the model (see the module docstring for the rule).

    ``record=True`` keeps the last forward's latents f [b, l, m] (before the edit) in :attr:`latents` (in the
    autograd graph when gradients are enabled).
    """

    sae: SparseAutoencoder
    use_error_term: bool = False
    edit: LatentEdit | None = None
    record: bool = False
    latents: Tensor | None = None

    def __call__(self, act: Tensor, hook: Any) -> Tensor:
        sae = self.sae
        flat = act.reshape(*act.shape[:2], -1)  # (b, l, k): Mamba-2's [b, l, h, p] -> [b, l, h·p]
        if flat.shape[-1] != sae.cfg.d_in:
            name = getattr(hook, "name", "?")
            raise ValueError(f"the SAE at {name} has d_in={sae.cfg.d_in} but the activation has width {flat.shape[-1]}")
        x = flat.to(sae.device, sae.W_dec.dtype)
        f = sae.encode(x)  # (b, l, m)
        if self.record:
            self.latents = f
        edited = f if self.edit is None else self.edit(f)
        if edited.shape != f.shape:
            raise ValueError(f"a latent edit returned shape {tuple(edited.shape)}, expected {tuple(f.shape)}")
        if self.use_error_term:
            if self.edit is None and not f.requires_grad:
                return act  # x + (decode(f) - decode(f)) = x: the clean model, bit for bit
            recon = sae.decode(edited)
            # decode(f) is the same computation as recon when nothing was edited, so the difference is exactly 0
            base = recon if edited is f else sae.decode(f)
            out = x + (recon - base.detach())
        else:
            out = sae.decode(edited)
        # keep the activation's memory layout: downstream kernels round differently on other strides (Mamba-2's
        # hook_x is a strided view), and the error term must leave the model exact
        like = torch.empty_strided(act.size(), act.stride(), dtype=act.dtype, device=act.device)
        return like.copy_(out.reshape(act.shape))


def _splices(saes: Mapping[str, SparseAutoencoder | SAESplice], use_error_term: bool,
             latent_edits: Mapping[str, LatentEdit] | None) -> dict[str, SAESplice]:
    edits = dict(latent_edits or {})
    unknown = sorted(set(edits) - set(saes))
    if unknown:
        raise ValueError(f"latent_edits names hook {unknown[0]!r}, which has no SAE in saes; add its SAE")
    out: dict[str, SAESplice] = {}
    for name, sae in saes.items():
        if isinstance(sae, SAESplice):
            out[name] = sae if name not in edits else SAESplice(sae.sae, sae.use_error_term, edits[name], sae.record)
        elif isinstance(sae, SparseAutoencoder):
            out[name] = SAESplice(sae, use_error_term, edits.get(name))
        else:
            raise TypeError(f"saes[{name!r}] is a {type(sae).__name__}; pass a SparseAutoencoder "
                            "(e.g. load_sae(folder))")
    return out


@contextlib.contextmanager
def saes_spliced(model: Any, saes: Mapping[str, SparseAutoencoder | SAESplice], use_error_term: bool = False,
                 latent_edits: Mapping[str, LatentEdit] | None = None,
                 fwd_hooks: Sequence[tuple[Any, Callable]] = ()) -> Iterator[dict[str, SAESplice]]:
    """Within the ``with`` block every forward of ``model`` runs with the SAEs spliced in; yields the splices.

    ``saes`` maps full hook names (``"blocks.1.hook_resid_post"``; one hook point each, no globs) to SAEs (or
    ready :class:`SAESplice` objects). ``fwd_hooks`` run before the splices at the same hook points.
    """
    splices = _splices(saes, use_error_term, latent_edits)
    for name in splices:
        if name not in model.hook_dict:
            model.hook_names(name)  # raises the model's HookError with the nearest names
            raise ValueError(f"saes keys must be single hook names, got {name!r}")
    with model.hooks(fwd_hooks=[*fwd_hooks, *splices.items()]):
        yield splices


def run_with_saes(model: Any, *args: Any, saes: Mapping[str, SparseAutoencoder | SAESplice],
                  use_error_term: bool = False, latent_edits: Mapping[str, LatentEdit] | None = None,
                  fwd_hooks: Sequence[tuple[Any, Callable]] = (), **kwargs: Any) -> Tensor:
    """``model(*args, **kwargs)`` (logits [b, l, v]) with ``saes`` spliced in at their hooks.

    ``use_error_term=True`` keeps the model exact except for what ``latent_edits`` change; False replaces the
    activation by the SAE's reconstruction (how much loss that costs is the SAE's "loss recovered").
    """
    with saes_spliced(model, saes, use_error_term, latent_edits, fwd_hooks):
        return model(*args, **kwargs)


# ---- latent edits ------------------------------------------------------------------------------------
def _position_mask(f: Tensor, positions: Sequence[int] | Tensor | None) -> Tensor:
    """[b, l, 1] bool: where an edit applies. ``positions``: None (everywhere), a list of positions (the same in
    every sequence), or a long tensor [b] holding one position per sequence."""
    b, l = f.shape[:2]
    mask = torch.zeros(b, l, 1, dtype=torch.bool, device=f.device)
    if positions is None:
        return ~mask
    if isinstance(positions, Tensor):
        if positions.shape != (b,):
            raise ValueError(f"a positions tensor holds one position per sequence: shape ({b},), got "
                             f"{tuple(positions.shape)}; pass a list for the same positions in every sequence")
        mask[torch.arange(b, device=f.device), positions.to(f.device).long()] = True
    else:
        mask[:, torch.as_tensor(list(positions), dtype=torch.long, device=f.device)] = True
    return mask


def ablate_latents(latents: Sequence[int] | Tensor, value: float = 0.0,
                   positions: Sequence[int] | Tensor | None = None) -> LatentEdit:
    """An edit setting ``latents`` to ``value`` (zero ablation by default) at ``positions``.

    ``positions``: None (every position), a list of positions (the same in every sequence), or a long tensor [b]
    with one position per sequence.
    """
    idx = torch.as_tensor(latents).long().reshape(-1)

    def edit(f: Tensor) -> Tensor:
        cols = torch.zeros(f.shape[-1], dtype=torch.bool, device=f.device)
        cols[idx.to(f.device)] = True
        return torch.where(_position_mask(f, positions) & cols, torch.full_like(f, value), f)

    return edit


def steer_latents(values: Mapping[int, float], mode: str = "add",
                  positions: Sequence[int] | Tensor | None = None) -> LatentEdit:
    """An edit that adds ``values[i]`` to latent i (``mode="add"``) or clamps it to that value (``"set"``)."""
    if mode not in ("add", "set"):
        raise ValueError(f"mode={mode!r} must be 'add' or 'set'")
    items = [(int(i), float(v)) for i, v in values.items()]

    def edit(f: Tensor) -> Tensor:
        where = _position_mask(f, positions)
        out = f.clone()
        for i, v in items:
            col = out[..., i : i + 1]
            out[..., i : i + 1] = torch.where(where, col + v if mode == "add" else torch.full_like(col, v), col)
        return out

    return edit


def steering_hook(sae: SparseAutoencoder, latent: int, coefficient: float,
                  positions: Sequence[int] | Tensor | None = None) -> Callable[[Tensor, Any], Tensor]:
    """A plain hook adding ``coefficient · W_dec[latent]`` to the activation (no SAE in the loop)."""
    direction = sae.W_dec[latent].detach()

    def hook(act: Tensor, hp: Any) -> Tensor:
        flat = act.reshape(*act.shape[:2], -1)
        where = _position_mask(flat, positions)
        delta = where * (coefficient * direction.to(act.device, act.dtype))
        return (flat + delta).reshape(act.shape)

    return hook


# ---- attribution -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """The modules' parameters with ``requires_grad=False`` inside the block (restored after): a gradient taken with
    respect to activations then records no tensors for the model's weight gradients (about 15 % of the graph of a
    Mamba block). The SAEs keep theirs: their latents carry the graph from the encoder on."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def latent_attribution(model: Any, metric: Callable[[Tensor], Tensor], *args: Any,
                       saes: Mapping[str, SparseAutoencoder], forward: Callable[[], Tensor] | None = None,
                       **kwargs: Any) -> dict[str, Tensor]:
    """First-order estimate of how zero-ablating each latent everywhere changes ``metric(logits)`` (a scalar).

    Attribution patching (Syed et al. 2023, "Attribution Patching Outperforms Automated Circuit Discovery"; on SAE
    latents: Marks et al. 2024, §2): Δ_i ≈ Σ_{b,t} (0 − f_i) · ∂metric/∂f_i, with every SAE spliced in with its
    error term (so the forward is the clean model's and the gradient reaches each latent). Returns, per hook, a
    float32 CPU tensor [m]; a positive value means ablating the latent raises the metric (e.g. the loss).

    ``forward``: called instead of ``model(*args, **kwargs)`` inside the splice, for a pass that gives ``metric``
    something other than full logits (e.g. one that starts at the SAEs' layer from a cached residual stream, so the
    autograd graph holds only the layers the gradient crosses).
    """
    splices = {name: SAESplice(sae, use_error_term=True, record=True) for name, sae in saes.items()}
    with torch.enable_grad(), _frozen(model):
        with saes_spliced(model, splices):
            value = metric(forward() if forward is not None else model(*args, **kwargs))
        if value.dim() != 0:
            raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
        names = list(splices)
        latents = [splices[n].latents for n in names]
        if any(f is None for f in latents):
            missing = next(n for n, f in zip(names, latents) if f is None)
            raise ValueError(f"the forward never reached the SAE at {missing}")
        # autograd.grad, not backward: the model's and the SAEs' parameters get no .grad as a side effect
        grads = torch.autograd.grad(value, latents, allow_unused=True)
    out = {}
    for name, f, g in zip(names, latents, grads):
        m = f.shape[-1]
        out[name] = torch.zeros(m) if g is None else (-(f * g).reshape(-1, m).sum(0)).detach().float().cpu()
    return out
