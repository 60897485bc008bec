"""Hook points and the hook-running root module (TransformerLens' design, Mamba's internals).

A :class:`HookPoint` is an identity module placed on every activation of interest; its name is its module
path (``blocks.3.mixer.hook_dt``). A hook is ``fn(tensor, hook) -> tensor | None``; returning a tensor
replaces the activation downstream; editing the input in place raises a :class:`HookError` on every hook
point (TransformerLens' ``h[:, 10] = 0; return h`` must become ``h = h.clone(); ...``). Hooks are attached
only inside :meth:`HookedRootModule.hooks` (or ``run_with_hooks`` / ``run_with_cache``, which use it) and are
removed in ``finally``, so an exception in a hook or in the forward never leaves one behind.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Union

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
BwdHookFn = Callable[[torch.Tensor, "HookPoint"], Union[torch.Tensor, None]]
"""``fn(grad, hook) -> grad | None``: sees dLoss/d(activation); a returned tensor replaces that gradient."""
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]

_GLOB_CHARS = set("*?[")


class HookError(RuntimeError):
    """A hook misbehaved (wrong output shape/dtype, edited its input in place) or named a missing hook point."""


class HookPoint(nn.Module):
    """Identity module that runs the hooks attached to it.

    ``lazy=True`` marks activations that are only computed when a hook (or the cache) asks for them
    (``hook_dA``, ``hook_ssm_state``, ``hook_h0``); the owning module checks :attr:`active` before building them.
    """

    def __init__(self, lazy: bool = False) -> None:
        super().__init__()
        self.name: str = "<unnamed>"
        self.lazy = lazy
        self._fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self._fns)

    def add(self, fn: HookFn) -> None:
        self._fns.append(fn)

    def remove(self, fn: HookFn) -> None:
        # identity, not equality: the same function may be attached twice
        for i in range(len(self._fns) - 1, -1, -1):
            if self._fns[i] is fn:
                del self._fns[i]
                return

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fns:
            return x
        for fn in list(self._fns):
            before = None if getattr(fn, "reads_only", False) else _edit_marker(x)
            try:
                out = fn(x, self)
            except RuntimeError as exc:  # autograd refuses some in-place edits itself (views of split outputs)
                if "modified inplace" not in str(exc):
                    raise
                raise HookError(self._in_place_message(fn)) from exc
            if before is not None and _edited(x, before):
                raise HookError(self._in_place_message(fn))
            if out is None:
                continue
            if not isinstance(out, torch.Tensor):
                raise HookError(
                    f"hook {_fn_name(fn)} on {self.name} returned {type(out).__name__}; "
                    "return a tensor (to replace the activation) or None"
                )
            if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
                raise HookError(
                    f"hook {_fn_name(fn)} on {self.name} returned shape {tuple(out.shape)} {out.dtype} on "
                    f"{out.device}, expected {tuple(x.shape)} {x.dtype} on {x.device}; return a tensor like "
                    "the input (e.g. act.clone() edited, or None to leave it unchanged)"
                )
            x = out
        return x

    def _in_place_message(self, fn: HookFn) -> str:
        return (f"hook {_fn_name(fn)} on {self.name} edited its input in place; a hook must leave its input "
                "unchanged and return a new tensor, e.g. `act = act.clone(); act[:, 10] = 0; return act`")

    def extra_repr(self) -> str:
        return f"name={self.name!r}" + (", lazy" if self.lazy else "")


def reads_only(fn: HookFn) -> HookFn:
    """Mark a hook that never edits its input (the cache's), so the in-place check skips it."""
    fn.reads_only = True  # type: ignore[attr-defined]
    return fn


def _edit_marker(x: torch.Tensor) -> int | torch.Tensor:
    """What :func:`_edited` compares against: the version counter, which every in-place op on ``x`` or a view of
    it bumps; inference tensors have none, so a copy of their values."""
    return x.clone() if x.is_inference() else x._version


def _edited(x: torch.Tensor, before: int | torch.Tensor) -> bool:
    """Whether a hook edited ``x`` in place. In-place edits are refused rather than honoured: the tensor may
    also be held elsewhere (a cache entry of the previous hook point, an inference state, the value that
    ``hook_ssm_state`` substitution compares against), which would then silently change too."""
    if isinstance(before, int):
        return x._version != before
    same = (x == before) | (x.isnan() & before.isnan()) if x.is_floating_point() else x == before
    return not bool(same.all())


def _fn_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class HookedRootModule(nn.Module):
    """Mixin for the root model: names its hook points and runs forwards with hooks or a cache."""

    hook_dict: dict[str, HookPoint]

    def setup_hooks(self) -> None:
        """Name every HookPoint by its module path; ``hook_dict`` follows registration (= execution) order."""
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    # ---- name resolution ---------------------------------------------------------------------
    def hook_names(self, names_filter: NamesFilter = None) -> list[str]:
        """Resolve a filter to hook names in execution order.

        ``None`` is every hook point; a string is an exact name or a glob (``blocks.*.mixer.hook_dt``); a list
        holds names or globs; a callable is a predicate on the name. Unknown names raise a :class:`HookError`
        that suggests the nearest ones.
        """
        names = list(self.hook_dict)
        if names_filter is None:
            return names
        if callable(names_filter) and not isinstance(names_filter, str):
            return [n for n in names if names_filter(n)]
        patterns = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        chosen: set[str] = set()
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise HookError(f"names_filter entries must be strings, got {type(pattern).__name__}")
            if _GLOB_CHARS & set(pattern):
                matched = fnmatch.filter(names, pattern)
                if not matched:
                    raise HookError(f"hook pattern {pattern!r} matches no hook point; {self._suggest(pattern)}")
                chosen.update(matched)
            elif pattern in self.hook_dict:
                chosen.add(pattern)
            else:
                raise HookError(f"unknown hook name {pattern!r}; {self._suggest(pattern)}")
        return [n for n in names if n in chosen]

    def _suggest(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self.hook_dict), n=3, cutoff=0.5)
        if close:
            return "did you mean " + ", ".join(repr(c) for c in close) + "?"
        return "see model.hook_dict for the available names"

    # ---- attaching hooks -----------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Iterable[tuple[NamesFilter, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NamesFilter, BwdHookFn]] = (),
    ) -> Iterator[HookedRootModule]:
        """Attach ``(name_or_filter, fn)`` hooks for the duration of the ``with`` block.

        ``bwd_hooks`` (TransformerLens' ``bwd_hooks``): ``fn(grad, hook)`` runs during a backward pass started
        inside the block, with the gradient of the activation that flowed downstream (after this call's forward
        hooks). Call ``backward`` inside the block: the gradient hooks are removed with the forward ones.
        """
        with self._attached(fwd_hooks, bwd_hooks, []):
            yield self

    @contextlib.contextmanager
    def _attached(self, fwd_hooks: Iterable, bwd_hooks: Iterable, grad_targets: list[torch.Tensor]) -> Iterator[None]:
        """``hooks()``; activations that receive a gradient hook are appended to ``grad_targets``."""
        attached: list[tuple[HookPoint, HookFn]] = []
        grad_handles: list[Any] = []
        try:
            hooks = list(fwd_hooks) + [(f, _grad_hook_installer(fn, grad_handles, grad_targets))
                                       for f, fn in bwd_hooks]
            for names_filter, fn in hooks:
                if not callable(fn):
                    raise HookError(f"hook for {names_filter!r} is {type(fn).__name__}, not a function")
                for name in self.hook_names(names_filter):
                    self.hook_dict[name].add(fn)
                    attached.append((self.hook_dict[name], fn))
            yield
        finally:
            for handle in grad_handles:
                handle.remove()
            for hp, fn in reversed(attached):
                hp.remove(fn)

    def run_with_hooks(
        self,
        *args: Any,
        fwd_hooks: Iterable[tuple[NamesFilter, HookFn]] = (),
        bwd_hooks: Iterable[tuple[NamesFilter, BwdHookFn]] = (),
        backward_fn: Callable[[Any], torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        """Run with hooks attached. With ``bwd_hooks``, ``backward_fn(output) -> scalar`` (or the output itself
        when it is a scalar) is back-propagated inside the block so the backward hooks fire; parameter gradients
        are not accumulated."""
        bwd_hooks, targets = list(bwd_hooks), []
        with self._attached(fwd_hooks, bwd_hooks, targets), _grad_mode(bool(bwd_hooks)):
            out = self(*args, **kwargs)
            if bwd_hooks:
                _backward_to_activations(out, backward_fn, dict(enumerate(targets)))
            return out

    def run_with_cache(
        self,
        *args: Any,
        names_filter: NamesFilter = None,
        device: str | torch.device | None = None,
        detach: bool = True,
        fwd_hooks: Iterable[tuple[NamesFilter, HookFn]] = (),
        incl_bwd: bool = False,
        backward_fn: Callable[[Any], torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        """Run the model and return ``(output, ActivationCache)``.

        The cache records each activation *after* the ``fwd_hooks`` passed here, i.e. the value that flowed
        downstream; for a ``fwd_hooks`` hook that substitutes ``hook_ssm_state`` that is the tensor the hook returned
        (the recurrence continues from it, docs/hooks.md). ``device`` moves cached tensors (e.g. ``"cpu"`` to keep GPU
        memory free); ``detach=False`` keeps them in the autograd graph.

        ``incl_bwd=True`` also caches the gradient of ``backward_fn(output)`` (a scalar; default: the output, which
        must then be a scalar) w.r.t. every cached activation, under ``"<name>_grad"``, as TransformerLens does
        (without accumulating parameter gradients). The gradient of ``hook_ssm_state`` is that of the readout
        y_t = C_t·h_t + D·u_t at each token: the recurrence from h_t to h_{t+1} runs inside the scan.
        """
        from mamba_interp.models.cache import ActivationCache

        store: dict[str, torch.Tensor] = {}
        live: dict[str, torch.Tensor] = {}

        @reads_only  # may return a fresh leaf (to receive a gradient), never edits its input
        def save(x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
            if incl_bwd and not x.requires_grad:  # e.g. hook_h0's zeros: make it a leaf so its gradient exists
                x = x.detach().requires_grad_(True)
                live[hook.name] = x
                store[hook.name] = x.detach().to(device) if device is not None else x.detach()
                return x
            if incl_bwd:
                live[hook.name] = x
            y = x.detach() if detach else x
            store[hook.name] = y.to(device) if device is not None else y
            return None

        names = self.hook_names(names_filter)
        with self.hooks(fwd_hooks=fwd_hooks), _grad_mode(incl_bwd):
            with self.hooks(fwd_hooks=[(names, save)] if names else []):
                out = self(*args, **kwargs)
            if incl_bwd:
                grads = _backward_to_activations(out, backward_fn, live)
                store.update({f"{n}_grad": g.to(device) if device is not None else g for n, g in grads.items()})
        ordered = {n: store[n] for n in self.hook_dict if n in store}
        ordered.update({k: v for k, v in store.items() if k.endswith("_grad")})
        return out, ActivationCache(ordered, self)


# ---- backward hooks --------------------------------------------------------------------------------
def _grad_hook_installer(fn: BwdHookFn, handles: list[Any], targets: list[torch.Tensor]) -> HookFn:
    """A forward hook that registers ``fn`` as a gradient hook on the activation flowing downstream."""
    if not callable(fn):
        raise HookError(f"backward hook is {type(fn).__name__}, not a function")

    @reads_only
    def install(x: torch.Tensor, hook: HookPoint) -> None:
        if x.requires_grad:
            handles.append(x.register_hook(lambda g: _checked_grad(fn, fn(g, hook), g, hook)))
            targets.append(x)

    install.__qualname__ = f"backward hook {_fn_name(fn)}"
    return install


def _checked_grad(fn: Any, out: Any, grad: torch.Tensor, hook: HookPoint) -> torch.Tensor | None:
    if out is None:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != grad.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise HookError(f"backward hook {_fn_name(fn)} on {hook.name} returned {got}, expected a gradient of shape "
                        f"{tuple(grad.shape)} or None")
    return out


def _grad_mode(enabled: bool):
    return torch.enable_grad() if enabled else contextlib.nullcontext()


def _backward_to_activations(out: Any, backward_fn: Callable[[Any], torch.Tensor] | None,
                             live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Back-propagate ``backward_fn(out)`` (a scalar) to the activations in ``live`` (and through every gradient
    hook on the way), without touching parameters' ``.grad``; returns name -> gradient (zeros where unused)."""
    loss = out if backward_fn is None else backward_fn(out)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise HookError(f"a backward pass needs a scalar, got {shape}; pass backward_fn=lambda logits: "
                        "<scalar>, e.g. a metric averaged over the batch")
    if not loss.requires_grad:
        raise HookError("the backward scalar does not depend on any activation that requires grad")
    names = [n for n, t in live.items() if t.requires_grad]
    tensors = [live[n] for n in names]
    if not tensors:
        return {}
    grads = torch.autograd.grad(loss.reshape(()), tensors, allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g.detach() for n, t, g in zip(names, tensors, grads)}
