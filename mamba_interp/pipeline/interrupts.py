"""Interruptions: Ctrl-C (SIGINT) and SIGTERM (what batch schedulers send) end a run the same way.

Both surface as a ``KeyboardInterrupt`` in the main thread (SIGTERM as its subclass :class:`Terminated` once
:func:`install_handlers` ran), so the runner records the step and the run as ``interrupted``, writes the manifest
and the report, and ``--resume`` continues. The CLI exits with 130 (SIGINT) or 143 (SIGTERM), the shell's
128 + signal number. This module imports nothing heavy: the CLI installs the handlers before importing torch.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated("terminated by SIGTERM")


def install_handlers() -> dict[int, Any]:
    """SIGTERM raises :class:`Terminated` (SIGINT keeps Python's ``KeyboardInterrupt``). Main thread only; returns
    the previous handlers for :func:`restore_handlers`."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def exit_code(exc: BaseException) -> int:
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def describe(exc: BaseException) -> str:
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted (Ctrl-C)"
