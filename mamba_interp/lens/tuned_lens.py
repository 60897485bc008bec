"""The tuned lens (Belrose et al. 2023, "Eliciting latent predictions from transformers with the tuned lens",
arXiv 2303.08112, §3; recipe of their ``tuned-lens`` code): one affine translator per layer, applied residually
``h + W h + b`` with W and b zero-initialised, so an untrained lens *is* the logit lens, trained to minimise
KL(final ‖ lens) with SGD-Nesterov (momentum 0.9, lr 0.1, weight decay 1e-3 pulling towards the identity, linear
decay, gradient clipping 1.0). The final residual has no translator, as in their code.

The ``tuned-lens`` package itself cannot be used: it supports no Mamba model and imports
``torchdata.dataloader2``, which current torchdata no longer has.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mamba_interp.lens.logit_lens import LensResult, _cat, _chunks, _lens_from_stack, _residual_stack, _valid, unembed


@dataclass(frozen=True)
class TunedLensConfig:
    """Training of a tuned lens (defaults: Belrose et al.'s recipe, scaled to small models: fewer tokens/step)."""

    steps: int = 250
    lr: float = 0.1  # their lr_scale 1.0 × (1 − momentum)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    batch_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TunedLensConfig.{name}={getattr(self, name)!r} must be a positive integer")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TunedLensConfig needs lr > 0, 0 <= momentum < 1, weight_decay >= 0, grad_clip >= 0")


@dataclass
class TunedLensFit:
    """What :meth:`TunedLens.fit` did: ``history`` (loss = Σ over layers of the mean KL, per step), and the mean
    KL(final ‖ lens) per entry [n_layer + 1] on the training tokens before (= the logit lens) and after."""

    history: list[float]
    kl_before: Tensor
    kl_after: Tensor
    tokens: int


class TunedLens(nn.Module):
    """Per-layer affine translators ``h + W_i h + b_i`` (zero-initialised) for the residuals entering each of the
    ``n_layer`` blocks; the final residual is decoded as is.

    >>> lens = TunedLens.for_model(model)
    >>> fit = lens.fit(model, train_ids)                     # fit.history, fit.kl_before / kl_after
    >>> lens.kl_by_layer(model, test_ids)                    # [n_layer + 1] mean KL per layer (nats)
    """

    def __init__(self, d_model: int, n_layer: int) -> None:
        super().__init__()
        self.d_model, self.n_layer = int(d_model), int(n_layer)
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layer))
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)

    @classmethod
    def for_model(cls, model: Any) -> TunedLens:
        return cls(model.cfg.d_model, model.cfg.n_layer).to(model.norm_f.weight.device)

    def translate(self, stack: Tensor) -> Tensor:
        """stack [n_layer + 1, ..., d] -> the translated stack (same shape)."""
        if stack.shape[0] != self.n_layer + 1 or stack.shape[-1] != self.d_model:
            raise ValueError(f"the lens expects a [{self.n_layer + 1}, ..., {self.d_model}] residual stack, got "
                             f"{tuple(stack.shape)}; build it with cache.accumulated_resid()")
        out = [h + t(h) for h, t in zip(stack[:-1].float(), self.translators)]
        return torch.stack([*out, stack[-1].float()])

    def fit(self, model: Any, token_batches: Tensor | Sequence[Tensor | tuple[Tensor, Tensor | None]],
            attention_mask: Tensor | None = None, config: TunedLensConfig | None = None,
            batch_size: int = 64) -> TunedLensFit:
        """Train on ``token_batches``: ids [N, l] (with ``attention_mask``), or a list of [b, l] tensors or
        ``(ids, mask)`` pairs. The frozen model's residuals of every real token are computed once (k·tokens·d
        floats) and the translators take ``config.steps`` SGD steps on random subsets of ``batch_tokens`` tokens."""
        cfg = config or TunedLensConfig()
        if isinstance(token_batches, Tensor):
            token_batches = [(token_batches, attention_mask)]
        pairs = [item if isinstance(item, tuple) else (item, None) for item in token_batches]
        stacks = []
        with torch.no_grad():
            for ids, mask_all in pairs:
                ids = ids if ids.dim() == 2 else ids[None]
                for sl in _chunks(ids.shape[0], batch_size):
                    mask = None if mask_all is None else mask_all[sl]
                    stack, _ = _residual_stack(model, ids[sl], mask)
                    stacks.append(stack[:, _valid(ids[sl], mask)])  # (k, tokens, d)
            resid = torch.cat(stacks, 1).float()
            before = self._train_kl(model, resid)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        opt = torch.optim.SGD(self.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                              weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / cfg.steps)
        history: list[float] = []
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        try:
            for p in params:  # the model stays frozen; only the translators learn
                p.requires_grad_(False)
            n, v = resid.shape[1], model.cfg.vocab_size
            for _ in range(cfg.steps):
                idx = torch.randperm(n, generator=gen)[: cfg.batch_tokens] if n > cfg.batch_tokens else slice(None)
                h = resid[:, idx]
                with torch.no_grad():  # the final distribution is recomputed, not stored: [tokens, v] can be large
                    tgt = _target(model, h[-1])
                loss = sum(_kl(tgt, unembed(model, h_i + t(h_i))[..., :v]).mean()
                           for h_i, t in zip(h[:-1], self.translators))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(self.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
                history.append(float(loss.detach()))
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        with torch.no_grad():
            after = self._train_kl(model, resid)
        return TunedLensFit(history, before, after, n)

    def _train_kl(self, model: Any, resid: Tensor, chunk: int = 4096) -> Tensor:
        """Mean KL(final ‖ lens) per entry [k] on stored residuals [k, tokens, d], ``chunk`` tokens at a time."""
        v = model.cfg.vocab_size
        total = torch.zeros(resid.shape[0], dtype=torch.float64)
        for sl in _chunks(resid.shape[1], chunk):
            part = self.translate(resid[:, sl])
            tgt = _target(model, part[-1])
            total += torch.stack([_kl(tgt, unembed(model, h)[..., :v]).double().sum() for h in part]).cpu()
        return total / resid.shape[1]

    @torch.no_grad()
    def lens(self, model: Any, input_ids: Tensor, targets: Tensor | None = None,
             attention_mask: Tensor | None = None, batch_size: int | None = None,
             return_logits: bool = False) -> LensResult:
        """The tuned lens of ``input_ids`` (same fields as :func:`logit_lens`)."""
        input_ids = input_ids if input_ids.dim() == 2 else input_ids[None]
        parts = []
        for sl in _chunks(input_ids.shape[0], batch_size):
            mask = None if attention_mask is None else attention_mask[sl]
            stack, labels = _residual_stack(model, input_ids[sl], mask)
            translated = self.translate(stack)
            parts.append(_lens_from_stack(model, lambda i: unembed(model, translated[i]), labels,
                                          None if targets is None else targets[sl].cpu(),
                                          _valid(input_ids[sl], mask), return_logits))
        return _cat(parts)

    def kl_by_layer(self, model: Any, input_ids: Tensor, attention_mask: Tensor | None = None,
                    batch_size: int | None = None) -> Tensor:
        """Mean KL(final ‖ tuned lens) over real tokens, per entry [n_layer + 1]."""
        return self.lens(model, input_ids, None, attention_mask, batch_size).kl_by_layer()

    def save(self, folder: str | Path) -> None:
        """``tuned_lens.safetensors`` + ``tuned_lens.json`` (sizes) in ``folder``, written atomically."""
        from safetensors.torch import save_file

        from mamba_interp.utils.io import atomic_path, atomic_write_json

        folder = Path(folder)
        with atomic_path(folder / "tuned_lens.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        atomic_write_json(folder / "tuned_lens.json", {"d_model": self.d_model, "n_layer": self.n_layer})

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device | None = None) -> TunedLens:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "tuned_lens.json").is_file():
            raise FileNotFoundError(f"{folder} holds no tuned_lens.json; save a lens there with lens.save()")
        lens = cls(**json.loads((folder / "tuned_lens.json").read_text()))
        lens.load_state_dict(load_file(str(folder / "tuned_lens.safetensors")))
        return lens.to(device) if device is not None else lens


def _target(model: Any, final_resid: Tensor) -> Tensor:
    """Log-probabilities [N, v] of the model's own output from final residuals [N, d] (real vocabulary)."""
    return torch.log_softmax(unembed(model, final_resid)[..., : model.cfg.vocab_size].double(), -1).float()


def _kl(target_logp: Tensor, logits: Tensor) -> Tensor:
    """KL(target ‖ softmax(logits)) per token [N]; target_logp [N, v] log-probabilities."""
    return (target_logp.exp() * (target_logp - torch.log_softmax(logits, -1))).sum(-1)


