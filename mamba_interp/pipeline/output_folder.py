"""The run's output folder: checks made before the run writes anything, the lock that keeps one run per folder,
and setting aside what an earlier run with another configuration left there.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from mamba_interp.pipeline.config import UsageError
from mamba_interp.pipeline.results import now

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]


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


# ---- one run per folder ------------------------------------------------------------------------------------
LOCK_FILE = "run.lock"
STALE_FOLDER = "stale"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, OverflowError):
        return False
    return True


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """An exclusive lock on an output folder for a run's lifetime: ``OUT/run.lock`` holds the pid, host, start time
    and command of the run; it is removed on release.

    The lock is an advisory ``flock`` on that file, which the kernel drops when its process ends however it ends,
    so the lock file of a dead run is taken over (and reported in :attr:`took_over`). Where ``flock`` is not
    available the pid in the file decides: a lock whose process is gone is taken over.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self.took_over: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self, command: str) -> None:
        """Take the lock or raise :class:`UsageError` naming the run that holds it."""
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                held = self._try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            holder = _read_holder(fd)
            if held and not self._same_file(fd):  # the holder removed the file while we waited: start over
                os.close(fd)
                continue
            if not held:
                os.close(fd)
                raise UsageError(self._in_use(holder))
            self.took_over = holder if holder.get("pid") not in (None, os.getpid()) else None
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now(), "command": command}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode())
            self._fd = fd
            return
        raise UsageError(f"output folder {str(self.folder)!r} could not be locked (its lock file keeps changing); "
                         "retry, or choose another --output")

    def _try_lock(self, fd: int) -> bool:
        """True when this process now holds the lock."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as exc:  # a filesystem without flock (some network mounts): fall back to the pid
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        holder = _read_holder(fd)
        pid = holder.get("pid")
        same_host = holder.get("host") in (None, socket.gethostname())
        return not (isinstance(pid, int) and pid != os.getpid() and same_host and _pid_alive(pid))

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _in_use(self, holder: dict[str, Any]) -> str:
        pid = holder.get("pid", "?")
        if pid == os.getpid():
            return (f"output folder {str(self.folder)!r} is in use by another Runner of this process; close() it "
                    "first, or choose another --output")
        what = f"pid {pid}" + (f", started {holder['started_at']}" if holder.get("started_at") else "")
        command = f": {holder['command']}" if holder.get("command") else ""
        return (f"output folder {str(self.folder)!r} is in use by another run ({what}{command}); wait for it to "
                "finish, or choose another --output")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still holding the lock, so no one locks a file that is about to vanish
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


# ---- leftovers of an earlier run ------------------------------------------------------------------------
def move_to_stale(folder: Path, names: list[str]) -> tuple[Path, list[str]]:
    """Move the entries ``names`` of ``folder`` into a new ``folder/stale/<timestamp>/``; nothing is deleted.

    Returns that folder and the names that could not be moved (left in place; each is an ``OSError`` logged by the
    caller's step failure if it is in the way later)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target, i = folder / STALE_FOLDER / stamp, 2
    while target.exists():
        target, i = folder / STALE_FOLDER / f"{stamp}-{i}", i + 1
    failed: list[str] = []
    try:
        target.mkdir(parents=True)
    except OSError:
        return target, list(names)
    for name in names:
        try:
            os.replace(folder / name, target / name)
        except OSError:
            failed.append(name)
    return target, failed
