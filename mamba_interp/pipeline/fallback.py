"""The out-of-memory fallback of a step: retry with half the batch (twice), then on the CPU.

Each fallback taken is recorded (``result.json["fallbacks"]``) so a reader knows the numbers came from a smaller
batch or another device.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_HALVINGS = 2


def is_oom(exc: BaseException) -> bool:
    """CUDA (or allocator) out-of-memory errors, the only ones a smaller batch or the CPU can fix."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


@dataclass
class OOMFallback:
    """Where the next attempt of a step runs, and the fallbacks taken so far."""

    device: torch.device
    batch_size: int
    halvings: int = 0
    taken: list[dict[str, Any]] = field(default_factory=list)

    @property
    def _can_shrink(self) -> bool:
        return self.batch_size > 1 and self.halvings < MAX_HALVINGS

    def recoverable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is an out-of-memory error a smaller batch or the CPU may still fix."""
        return is_oom(exc) and (self._can_shrink or self.device.type == "cuda")

    def advance(self, error: str) -> dict[str, Any]:
        """Free memory and take the next fallback: half the batch while allowed, else the CPU. Call it outside the
        ``except`` block, so the error's frames (and the tensors they hold) are released and the allocator's cache
        can really be emptied before the retry."""
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self._can_shrink:
            self.batch_size, self.halvings = max(1, self.batch_size // 2), self.halvings + 1
            action = {"action": "smaller_batch", "batch_size": self.batch_size, "device": str(self.device),
                      "error": error}
        else:
            self.device = torch.device("cpu")
            action = {"action": "cpu", "batch_size": self.batch_size, "device": "cpu", "error": error}
        self.taken.append(action)
        return action
