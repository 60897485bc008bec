"""Records of the environment a run used: library versions, git revision, device, seeding."""

from __future__ import annotations

import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mamba_interp.pipeline.config import UsageError

LIBRARIES = ("mamba-interp", "torch", "transformers", "numpy", "scipy", "scikit-learn", "matplotlib", "seaborn",
             "safetensors", "tqdm", "pyyaml", "mamba-ssm", "causal-conv1d")


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def platform_info() -> dict[str, Any]:
    return {"system": platform.system(), "machine": platform.machine(), "processor": platform.processor(),
            "torch_threads": torch.get_num_threads()}


def git_revision() -> dict[str, Any] | None:
    """The checkout's commit and whether it has uncommitted changes; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
        return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable CUDA request is a :class:`UsageError`."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec} was requested but CUDA is not available here; use --device cpu or auto")
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(
            f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) exist; use cuda:0..cuda:"
            f"{torch.cuda.device_count() - 1}"
        )
    return device


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "name": str(device)}
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1))
    return info


def step_seed(seed: int, step: int) -> int:
    """An independent 32-bit seed per (run seed, step), so a step's randomness does not depend on which
    steps ran before it in the same process."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
