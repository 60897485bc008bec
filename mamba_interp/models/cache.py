"""ActivationCache: the activations one forward pass recorded, keyed by hook name, in execution order."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from mamba_interp.models.hooked_mamba import HookedMamba

_MODEL_LEVEL = {"embed": "hook_embed", "norm_final": "hook_norm_final"}
_BLOCK_LEVEL = {"resid_pre", "resid_post", "norm"}


def get_act_name(name: str, layer: int | None = None) -> str:
    """Full hook name from a short one: ``("dt", 3) -> "blocks.3.mixer.hook_dt"``,
    ``("resid_post", 0) -> "blocks.0.hook_resid_post"``, ``"embed" -> "hook_embed"``."""
    if "." in name or name.startswith("hook_") and layer is None:
        return name
    short = name[5:] if name.startswith("hook_") else name
    if layer is None:
        if short in _MODEL_LEVEL:
            return _MODEL_LEVEL[short]
        raise KeyError(f"{name!r} needs a layer index, e.g. cache[{name!r}, 0]")
    if short in _BLOCK_LEVEL:
        return f"blocks.{layer}.hook_{short}"
    return f"blocks.{layer}.mixer.hook_{short}"


class ActivationCache:
    """Mapping hook name -> tensor. ``cache["dt", 2]`` is short for ``cache["blocks.2.mixer.hook_dt"]``."""

    def __init__(self, store: dict[str, torch.Tensor], model: HookedMamba | None = None) -> None:
        self._store = store
        self.model = model

    # ---- mapping protocol ------------------------------------------------------------------
    def __getitem__(self, key: str | tuple[str, int]) -> torch.Tensor:
        name = get_act_name(*key) if isinstance(key, tuple) else get_act_name(key)
        if name not in self._store:
            raise KeyError(
                f"{name!r} is not in the cache ({len(self._store)} entries); pass it in names_filter when "
                "calling run_with_cache"
            )
        return self._store[name]

    def __contains__(self, key: object) -> bool:
        try:
            name = get_act_name(*key) if isinstance(key, tuple) else get_act_name(key)  # type: ignore[arg-type]
        except KeyError:
            return False
        return name in self._store

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self):
        return self._store.keys()

    def values(self):
        return self._store.values()

    def items(self):
        return self._store.items()

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {list(self._store)[:4]}{'...' if len(self) > 4 else ''})"

    # ---- conversions -----------------------------------------------------------------------
    def to(self, device: str | torch.device) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._store.items()}, self.model)

    def remove_batch_dim(self) -> ActivationCache:
        """Drop a batch dimension of size 1 from every activation."""
        for k, v in self._store.items():
            if v.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1, {k} has batch {v.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self._store.items()}, self.model)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._store.values())

    # ---- stacking --------------------------------------------------------------------------
    def stack(self, pattern: str, return_labels: bool = False):
        """Stack every cached activation whose name matches the glob ``pattern`` along a new dim 0,
        in execution order: ``cache.stack("blocks.*.mixer.hook_dt") -> [n_layer, b, l, e]``."""
        names = [n for n in self._store if fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise KeyError(f"no cached activation matches {pattern!r}; cached: {list(self._store)[:6]}...")
        out = torch.stack([self._store[n] for n in names])
        return (out, names) if return_labels else out

    def stack_activation(self, short_name: str) -> torch.Tensor:
        """``cache.stack_activation("resid_post")`` stacks that hook over all layers -> [n_layer, ...]."""
        return self.stack(re.sub(r"\.0\.", ".*.", get_act_name(short_name, 0), count=1))

    def accumulated_resid(
        self, layer: int | None = None, apply_ln: bool = False, return_labels: bool = False
    ):
        """The residual stream before each layer up to ``layer`` (exclusive), and after the last layer when
        ``layer`` is None: ``[k, b, l, d]`` with labels ``embed``/``resid_pre i``/``final_post``.

        Mamba's block is pre-norm with an fp32 residual, so ``blocks.i.hook_resid_pre`` *is* the true residual
        stream (no ``hidden + residual`` bookkeeping as in the fused state-spaces block). ``apply_ln=True`` applies
        the final RMSNorm ``norm_f`` (the logit lens' input).
        """
        n_layer = self._n_layer()
        stop = n_layer if layer is None else layer
        if not 0 <= stop <= n_layer:
            raise ValueError(f"layer={layer} is out of range 0..{n_layer}")
        names = [f"blocks.{i}.hook_resid_pre" for i in range(stop)]
        labels = [f"resid_pre {i}" for i in range(stop)]
        if layer is None:
            names.append(f"blocks.{n_layer - 1}.hook_resid_post")
            labels.append("final_post")
        missing = [n for n in names if n not in self._store]
        if missing:
            raise KeyError(f"accumulated_resid needs {missing[:3]} in the cache; cache the residual hooks")
        resid = torch.stack([self._store[n].float() for n in names])
        if apply_ln:
            if self.model is None:
                raise ValueError("apply_ln needs the cache's model (create the cache with model.run_with_cache)")
            resid = self.model.norm_f(resid.to(self.model.norm_f.weight.dtype)).float()
        return (resid, labels) if return_labels else resid

    def _n_layer(self) -> int:
        if self.model is not None:
            return self.model.cfg.n_layer
        layers = [int(m.group(1)) for n in self._store if (m := re.match(r"blocks\.(\d+)\.", n))]
        if not layers:
            raise ValueError("the cache holds no per-layer activations")
        return max(layers) + 1
