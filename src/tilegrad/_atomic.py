"""Replacing files so that a reader (or a process killed midway) sees the old version or the new one, never a torn
file: the one helper every writer of checkpoints, logs, journals and finished images uses.

``os.replace`` is atomic within one filesystem on POSIX, so everything is first written next to its destination
(same directory) and then renamed over it.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_csv", "install", "remove_paths"]


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
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
