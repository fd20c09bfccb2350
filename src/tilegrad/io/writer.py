"""Image writers: array sinks filled tile by tile, with an explicit lifecycle and atomic completion.

Lifecycle (as MONAI's mergers: aggregate -> finalize, with a guard against misuse)::

    writer = TiffWriter(path, shape, dtype)   # open: the output exists only as <path>.partial*
    writer[key] = tile                        # any number of times, any order, numpy-style keys
    writer.close()                            # finalize: build pyramid / compress, then rename to <path>

NOTE [ Nothing half-written looks complete ]
Until ``close()`` succeeds, everything is written under names that start with ``<path>.partial`` (the partial
output itself, scratch files, an inference journal), never under the final name. ``close()`` renames the finished
file onto ``path`` with ``os.replace``, which is atomic on one filesystem, so ``path`` either does not exist or is
complete. If the ``with`` block raises or ``abort()`` is called, the partial files are deleted (kept, still named
``.partial``, with ``keep_partial=True``). Ctrl-C (KeyboardInterrupt) keeps them: the tiles written so far stay on
disk, and a writer opened with ``resume=True`` continues them (``mark_written`` tells it which regions the earlier
run wrote; tilegrad.infer's journal does that, NOTE [ Resumable inference ] in infer.py). A process killed outright
also leaves only ``.partial`` names, and so does a full disk (:class:`~tilegrad.DiskFullError`, NOTE [ A full disk ]
in tilegrad/_atomic.py): the partial files are kept for ``resume=True`` once space is freed. A new writer refuses to start over partial files of an earlier run unless told
to continue them (``resume=True``) or to discard them (``overwrite=True``).

``close()`` also refuses an output with regions that were never written (``require_complete=True``, the default):
the writer counts written elements per chunk, so a chunk that received fewer elements than it holds is reported.
Overlapping writes can mask a gap inside one chunk; a chunk never touched is always caught.

>>> import numpy as np, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "out.npy"
>>> out = NpyWriter(path, (1, 4, 4), np.float32, chunks=(2, 2))
>>> out[:, :2] = np.ones((1, 2, 4))
>>> out.close()
Traceback (most recent call last):
...
tilegrad.errors.DataError: ...out.npy: 8 of 16 elements were never written (first gap in chunk at [:, 2:4, 0:2]). ...
>>> out[:, 2:] = 2.0
>>> out.close()
>>> np.load(path)[0, :, 0].tolist()
[1.0, 1.0, 2.0, 2.0]
>>> out[:, 0, 0] = 3.0
Traceback (most recent call last):
...
tilegrad.errors.WriterStateError: ...out.npy was closed; writes after close() are refused. Open a new writer
"""

from __future__ import annotations

import glob
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import disk_full, install, is_disk_full, remove_paths
from ..errors import ConfigError, DataError, ShapeError, WriterStateError
from ._indexing import AxisIndex, Bounds, normalize_key
from ._rawfile import RawArrayFile

__all__ = ["ImageWriter", "NpyWriter"]

_OPEN, _CLOSED, _ABORTED = "open", "closed", "aborted"


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class _Coverage:
    """Elements written per chunk of the (C, *spatial) grid (chunks span all channels)."""

    def __init__(self, shape: Sequence[int], chunks: Sequence[int]) -> None:
        self.shape = tuple(shape)
        self.chunks = tuple(int(c) for c in chunks)
        grid = tuple(math.ceil(s / c) for s, c in zip(self.shape[1:], self.chunks))
        self.counts = np.zeros(grid, dtype=np.int64)

    def add(self, plan: Sequence[AxisIndex]) -> None:
        channels = plan[0].count
        hists, lows = [], []
        for a, c in zip(plan[1:], self.chunks):
            lo, hi, step = a.increasing()
            cells = np.arange(lo, hi, step) // c
            first = int(cells[0]) if cells.size else 0
            hists.append(np.bincount(cells - first))
            lows.append(first)
        if any(h.size == 0 for h in hists):
            return
        block = channels * hists[0].astype(np.int64)
        for h in hists[1:]:
            block = np.multiply.outer(block, h)
        region = tuple(slice(lo, lo + h.size) for lo, h in zip(lows, hists))
        self.counts[region] += block

    def capacity(self) -> np.ndarray:
        cap = np.array(self.shape[0], dtype=np.int64)
        for size, c, n in zip(self.shape[1:], self.chunks, self.counts.shape):
            edge = np.full(n, c, dtype=np.int64)
            edge[-1] = size - c * (n - 1)
            cap = np.multiply.outer(cap, edge)
        return cap

    def missing(self) -> tuple[int, tuple[slice, ...] | None]:
        cap = self.capacity()
        short = np.maximum(cap - self.counts, 0)
        total = int(short.sum())
        if total == 0:
            return 0, None
        cell = np.unravel_index(int(np.argmax(short > 0)), short.shape)
        region = tuple(
            slice(int(i) * c, min((int(i) + 1) * c, s)) for i, c, s in zip(cell, self.chunks, self.shape[1:])
        )
        return total, region


class ImageWriter:
    """Base class of the writers: validation, lifecycle, coverage check and atomic rename.

    Subclasses implement ``_write(bounds, value)`` (``value`` already has the full (C, *spatial) rank and the
    shape of ``bounds``), ``_finalize()`` (produce ``self.partial_path``), ``_partial_files()`` and ``_release()``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        dtype: Any,
        *,
        chunks: Sequence[int],
        overwrite: bool = False,
        keep_partial: bool = False,
        resume: bool = False,
    ) -> None:
        self.path = Path(path)
        try:
            self.shape = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            raise ShapeError(f"shape must be a sequence of ints (C, *spatial); received {shape!r}") from None
        if len(self.shape) < 2 or any(s < 1 for s in self.shape):
            raise ShapeError(
                f"writers take a (C, *spatial) shape with positive sizes, e.g. (3, H, W) or (1, D, H, W); "
                f"received {self.shape}"
            )
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            raise ConfigError(f"dtype must be a numpy dtype; received {dtype!r}") from None
        if self.path.exists() and not overwrite:
            raise ConfigError(
                f"{self.path} already exists; pass overwrite=True to replace it (on successful close)"
            )
        if not self.path.parent.is_dir():
            raise ConfigError(f"cannot write {self.path}: directory {self.path.parent} does not exist")
        self.partial_path = self.path.with_name(self.path.name + ".partial")
        self.keep_partial = keep_partial
        self.resumed = bool(resume)
        stale = self._partial_files()
        if resume and not stale:
            raise ConfigError(
                f"cannot resume {self.path}: there are no partial files ({self.partial_path}*) of an interrupted "
                "run. Start without resume"
            )
        if stale and not resume:
            if not overwrite:
                raise ConfigError(
                    f"{self.path}: partial files of an earlier, unfinished run exist "
                    f"({', '.join(p.name for p in stale)}). Pass resume=True to continue that run, or "
                    "overwrite=True to discard them and start over"
                )
            self._remove(stale)
        self._coverage = _Coverage(self.shape, tuple(chunks)[-(len(self.shape) - 1) :])
        self._status = _OPEN

    # ------------------------------------------------------------------ array protocol
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def closed(self) -> bool:
        """True once close() succeeded or abort() was called."""
        return self._status != _OPEN

    def __len__(self) -> int:
        return self.shape[0]

    def _check_open(self, action: str) -> None:
        if self._status == _CLOSED:
            raise WriterStateError(
                f"{self.path} was closed; {action} after close() are refused. Open a new writer"
            )
        if self._status == _ABORTED:
            raise WriterStateError(
                f"the writer of {self.path} was aborted; {action} are refused. Open a new writer"
            )

    def __setitem__(self, key: Any, value: Any) -> None:
        self._check_open("writes")
        plan = normalize_key(key, self.shape)
        value = self._scalar(value) if isinstance(value, (bool, int, float)) else _to_numpy(value)
        target = tuple(a.count for a in plan if not a.drop)
        try:
            fits = np.broadcast_shapes(value.shape, target) == target
        except ValueError:
            fits = False
        if not fits:
            raise ShapeError(
                f"cannot write an array of shape {value.shape} into {self.path}[{_describe(plan)}], which selects "
                f"shape {target} of the (C, *spatial) image {self.shape}"
            )
        if not np.can_cast(value.dtype, self.dtype, casting="same_kind"):
            raise DataError(
                f"{self.path} stores {self.dtype}; received {value.dtype} values. Convert explicitly (e.g. "
                f"np.clip(x, 0, 255).round().astype({self.dtype.name!r})) so no value is silently wrapped"
            )
        full = (
            np.broadcast_to(value, target)
            .reshape(tuple(a.count for a in plan))
            .astype(self.dtype, copy=False)
        )
        flips = tuple(i for i, a in enumerate(plan) if a.step < 0 and a.count > 1)
        if flips:
            full = np.flip(full, flips)
        if 0 in full.shape:
            return
        try:
            self._write(tuple(a.increasing() for a in plan), full)
        except OSError as err:
            if not is_disk_full(err):
                raise
            raise disk_full(err, self.partial_path, full.nbytes) from None
        self._coverage.add(plan)

    def mark_written(self, key: Any) -> None:
        """Count the region ``key`` as written without writing it, for a writer opened with ``resume=True`` whose
        partial files already hold that region from the interrupted run."""
        self._check_open("mark_written() calls")
        if not self.resumed:
            raise WriterStateError(
                f"mark_written() is for resumed writers: {self.path} was not opened with resume=True, so nothing "
                "was written before. Write the region instead"
            )
        self._coverage.add(normalize_key(key, self.shape))

    def _scalar(self, value: bool | int | float) -> np.ndarray:
        """A Python number is taken in the writer's dtype when it is representable there (out[...] = 0)."""
        with np.errstate(all="ignore"):
            cast = np.asarray(value).astype(self.dtype)
        same = cast.item() == value or (value != value and cast.item() != cast.item())  # NaN stays NaN
        if not same:
            raise DataError(
                f"{self.path} stores {self.dtype}; the value {value!r} is not representable in it"
            )
        return cast

    # ------------------------------------------------------------------ lifecycle
    def close(self, *, require_complete: bool = True) -> None:
        """Finalize and atomically move the output to ``path``. Closing a closed writer does nothing.

        With ``require_complete`` (default) an output with never-written chunks is refused with a DataError and the
        writer stays open, so the missing tiles can still be written (or ``abort()`` called).
        """
        if self._status == _CLOSED:
            return
        self._check_open("close()")
        if require_complete:
            missing, region = self._coverage.missing()
            if missing:
                where = ", ".join(f"{r.start}:{r.stop}" for r in region or ())
                raise DataError(
                    f"{self.path}: {missing} of {math.prod(self.shape)} elements were never written (first gap in "
                    f"chunk at [:, {where}]). Write the missing tiles, call close(require_complete=False) to keep "
                    "unwritten parts as zeros, or abort()"
                )
        try:
            self._finalize()
            self._release()
            self._install()
        except KeyboardInterrupt:
            self.abort(keep_partial=True)  # the written tiles are intact: a resumed writer can close again
            raise
        except OSError as err:
            if not is_disk_full(err):
                self.abort()
                raise
            self.abort(keep_partial=True)  # as for Ctrl-C: free space, then resume and close again
            raise disk_full(err, self.path, self.nbytes) from None
        except BaseException:
            self.abort()
            raise
        self._status = _CLOSED
        self._remove([p for p in self._partial_files() if p != self.partial_path])

    def abort(self, *, keep_partial: bool | None = None) -> None:
        """Stop without finishing: delete the partial files, or keep them, still named .partial, with
        ``keep_partial`` (default: as given to the writer) for a later writer with ``resume=True``."""
        if self._status == _CLOSED:
            raise WriterStateError(f"{self.path} was already closed successfully; there is nothing to abort")
        self._status = _ABORTED
        self._release()
        if not (self.keep_partial if keep_partial is None else keep_partial):
            self._remove(self._partial_files())

    @staticmethod
    def _remove(paths: Sequence[Path]) -> None:
        remove_paths(paths)

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._status != _OPEN:
            return
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt) or is_disk_full(exc):
            self.abort(keep_partial=True)  # NOTE [ Nothing half-written looks complete ]
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path}, shape={self.shape}, dtype={self.dtype}, {self._status})"

    # ------------------------------------------------------------------ subclass hooks
    def _write(self, bounds: Bounds, value: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finalize(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _partial_files(self) -> list[Path]:
        """Every existing file or directory named ``<path>.partial*``: the writer's namespace."""
        pattern = glob.escape(str(self.path.with_name(self.path.name + ".partial"))) + "*"
        return sorted(Path(p) for p in glob.glob(pattern))

    @property
    def partial_files(self) -> list[Path]:
        """The partial files that exist now (after an interruption: what a resumed writer continues)."""
        return self._partial_files()

    def _install(self) -> None:
        """Move the finished ``partial_path`` onto ``path`` (atomic for files on one filesystem)."""
        install(self.partial_path, self.path)

    def _release(self) -> None:
        """Drop memory maps / handles before renaming or deleting files."""


def _describe(plan: Sequence[AxisIndex]) -> str:
    parts = []
    for a in plan:
        if a.drop:
            parts.append(str(a.start))
        else:
            stop = a.start + a.step * a.count
            parts.append(f"{a.start}:{stop if stop >= 0 else ''}" + (f":{a.step}" if a.step != 1 else ""))
    return ", ".join(parts)


class NpyWriter(ImageWriter):
    """A ``.npy`` file filled tile by tile with positional writes (NOTE [ No memory maps for big images ]).

    ``chunks``: granularity of the never-written check (default 64 per spatial axis).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        dtype: Any = np.float32,
        *,
        chunks: Sequence[int] | None = None,
        overwrite: bool = False,
        keep_partial: bool = False,
        resume: bool = False,
    ) -> None:
        ndim = len(tuple(shape))
        super().__init__(
            path,
            shape,
            dtype,
            chunks=chunks or (64,) * (ndim - 1),
            overwrite=overwrite,
            keep_partial=keep_partial,
            resume=resume,
        )
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": self.shape,
        }
        block = io.BytesIO()
        np.lib.format.write_array_header_2_0(block, header)
        offset = len(block.getvalue())
        if resume:
            self._file: RawArrayFile | None = RawArrayFile.reopen(
                self.partial_path, self.shape, self.dtype, offset=offset, header=block.getvalue()
            )
            return
        with open(self.partial_path, "wb") as f:
            f.write(block.getvalue())
        self._file = RawArrayFile.create(self.partial_path, self.shape, self.dtype, offset=offset)

    def _write(self, bounds: Bounds, value: np.ndarray) -> None:
        self._file.write(bounds, value)

    def _finalize(self) -> None:
        pass

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
