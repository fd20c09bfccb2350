"""One writer per output: an exclusive lock held by the process that writes an output, a journal or a checkpoint.

NOTE [ One writer per output ]
Two runs writing the same file interleave their tiles (two ``tilegrad infer`` into one .zarr left a store mixing
two models that would not open) or replace each other's checkpoints. So every command that writes a result holds
:class:`FileLock` on it for as long as it writes: ``infer`` on OUTPUT (its journal and partial files included),
``train`` on ``OUT/checkpoint.pt`` (best.pt and log.csv live beside it), ``predict`` on its CSV and ``saliency`` on
its PNG; :func:`tilegrad.infer` on its journal. The lock is ``flock(LOCK_EX | LOCK_NB)`` on a small file
``.<name>.lock`` next to the locked path, holding the owner's PID and host. The kernel drops a flock when its
process dies, however it dies (SIGKILL included), so a lock is never left held by a dead run; the lock file such a
run leaves is *stale*: the next run takes it over and warns, naming the PID (:class:`~tilegrad.TilegradWarning`).
A second run while the first is alive refuses with :class:`~tilegrad.LockedError`, in command-line words.

Where ``fcntl`` does not exist (Windows) nothing is locked.
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from types import TracebackType

from .errors import ConfigError, LockedError, TilegradWarning

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileLock", "lock_path"]


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of ``path``: ``.<name>.lock`` in the same directory.

    >>> lock_path("runs/a/checkpoint.pt").as_posix()
    'runs/a/.checkpoint.pt.lock'
    """
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def _owner(fd: int) -> tuple[int | None, str]:
    """(PID, host) written in a lock file, or (None, "") if it holds none."""
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").split()
        return int(text[0]), (text[1] if len(text) > 1 else "")
    except (OSError, ValueError, IndexError):
        return None, ""


class FileLock:
    """An exclusive lock on ``path`` for one process (NOTE [ One writer per output ]); a context manager.

    ``what`` names the locked thing in messages (``"output"``, ``"checkpoint"``).

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.npy"
    >>> with FileLock(target):
    ...     FileLock(target).acquire()
    Traceback (most recent call last):
    ...
    tilegrad.errors.LockedError: another tilegrad run (PID ...) is writing the output .../out.npy; ...
    >>> lock_path(target).exists()
    False
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "output") -> None:
        self.path = Path(path)
        self.what = what
        self.file = lock_path(self.path)
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        if fcntl is None or self._fd is not None:  # pragma: no cover - Windows
            return self
        if not self.file.parent.is_dir():
            raise ConfigError(
                f"cannot write the {self.what} {self.path}: directory {self.file.parent} does not exist"
            )
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid, host = _owner(fd)
                os.close(fd)
                who = f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
                raise LockedError(
                    f"another tilegrad run ({who if pid else 'PID unknown'}) is writing the {self.what} "
                    f"{self.path}; wait for it to finish or stop it{f' (kill {pid})' if pid else ''}, then run "
                    f"this command again (or write to another path). Its lock is {self.file}"
                ) from None
            # The previous holder may have unlinked the file between our open() and flock(): lock the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        pid, host = _owner(fd)
        if (
            pid is not None
            and pid != os.getpid()
            and (host in ("", socket.gethostname()))
            and not _alive(pid)
        ):
            warnings.warn(
                f"{self.file} was left by tilegrad run PID {pid}, which is no longer running (it was killed); "
                "taking it over",
                TilegradWarning,
                stacklevel=2,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # unlinked while still locked: a run waiting on this file then locks a new one (see acquire)
        self.file.unlink(missing_ok=True)
        os.close(self._fd)  # drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
