"""Replacing files so that a reader (or a process killed midway) sees the old version or the new one, never a torn
file: the one helper every writer of checkpoints, logs, journals and finished images uses.

``os.replace`` is atomic within one filesystem on POSIX, so everything is first written next to its destination
(same directory) and then renamed over it.

NOTE [ Stale temporary files ]
A process killed while writing (SIGKILL, a power cut) leaves its temporary file ``.<name>.tmp-<pid>``; nothing
else ever deletes it. So every :func:`atomic_write` first removes the temporary files of ``<name>`` whose PID is no
longer running on this machine (a live PID's file may be a concurrent writer's and is left alone).

NOTE [ A full disk ]
A write that fails because the device or the quota is full (ENOSPC, EDQUOT; EFBIG when the file size limit is
hit) raises :class:`~tilegrad.DiskFullError` naming the file and the bytes it needed, never a chained OSError;
the destination keeps its previous version and the temporary file is removed. :func:`disk_full` converts such an
OSError for the other writers (image writers, np.save).
"""

from __future__ import annotations

import csv
import errno
import io
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import DiskFullError

__all__ = [
    "atomic_write",
    "atomic_write_csv",
    "disk_full",
    "install",
    "is_disk_full",
    "remove_paths",
    "remove_stale_temporaries",
]

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_disk_full(err: BaseException) -> bool:
    """True for an OSError that means the device, the quota or the file size limit is exhausted."""
    return isinstance(err, DiskFullError) or (isinstance(err, OSError) and err.errno in _FULL)


def disk_full(err: OSError, path: str | os.PathLike, needed: int | None, action: str = "") -> DiskFullError:
    """The :class:`~tilegrad.DiskFullError` for ``err`` raised writing ``path`` (NOTE [ A full disk ])."""
    if isinstance(err, DiskFullError):
        return err
    try:
        usage = shutil.disk_usage(Path(path).parent)
        free: int | None = usage.free
    except OSError:
        free = None
    if err.errno == errno.EFBIG:
        action = f" (the write hit the file size limit, ulimit -f){action}"
    return DiskFullError(path, needed, free, action)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete ``.<name>.tmp-<pid>`` files next to ``path`` left by processes that are gone (NOTE [ Stale temporary
    files ]); returns what was removed."""
    removed = []
    prefix = f".{path.name}.tmp-"
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        pid = entry.name[len(prefix) :] if entry.name.startswith(prefix) else ""
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def atomic_write(path: str | os.PathLike, data: bytes | str, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory (``.<name>.tmp-<pid>``) renamed
    over it; the temporary file is removed if anything fails. ``durable=True`` also flushes the file and the
    directory to disk (NOTE [ Atomic checkpoints ] in train/checkpoint.py), so the new version survives a power cut.

    >>> import tempfile
    >>> p = atomic_write(Path(tempfile.mkdtemp()) / "a.txt", "one")
    >>> _ = atomic_write(p, "two")
    >>> p.read_text(), [q.name for q in p.parent.iterdir()]
    ('two', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if not is_disk_full(err):
            raise
        raise disk_full(err, path, len(payload)) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    if durable:
        _fsync_directory(path.parent)
    return path


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(finished: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished file or directory onto ``path``. A file replaces ``path`` atomically; a directory (a zarr
    store) that exists at ``path`` is first moved aside to ``<path>.old``, which is deleted once the new one is in
    place."""
    finished, path = Path(finished), Path(path)
    if finished.is_dir() and path.exists():
        old = path.with_name(path.name + ".old")
        remove_paths([old])
        os.replace(path, old)
        os.replace(finished, path)
        remove_paths([old])
    else:
        os.replace(finished, path)


def remove_paths(paths: Iterable[Path]) -> None:
    """Delete files, links and directory trees; paths that do not exist are skipped."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """:func:`atomic_write` of a CSV file: one ``header`` row, then ``rows``."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(list(header))
    writer.writerows(rows)
    return atomic_write(path, text.getvalue())
