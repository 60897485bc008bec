"""Checks on the run's output folder, made before the run writes anything."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mamba_interp.pipeline.config import UsageError


def check_output_folder(path: Path) -> None:
    """Raise :class:`UsageError` unless ``path`` is (or can become) a writable folder. Writes nothing."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output path {str(path)!r} is a file; pass a folder path to --output")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"output path {str(path)!r} lies under the file {str(ancestor)!r}; choose another --output")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {str(ancestor)!r} is not writable; choose another --output")


def make_output_folder(path: Path) -> None:
    """Create ``path`` and prove it writable; on failure remove what was created and raise :class:`UsageError`."""
    created: list[Path] = []
    p = path
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        for c in created:  # deepest first
            try:
                c.rmdir()
            except OSError:
                pass
        raise UsageError(
            f"output folder {str(path)!r} is not writable ({exc.strerror or type(exc).__name__}); "
            "choose another --output"
        ) from None
