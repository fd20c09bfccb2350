"""A raw array in a file, read and written by box with ``pread``/``pwrite``: the scratch and sink of the writers.

NOTE [ No memory maps for big images ]
Pages of a memory-mapped file that a process touches count in its resident set (and in the ``VmHWM`` high-water
mark that :func:`tilegrad.measure_peak_memory` reads) until the mapping goes away, so streaming a whole image
through ``np.memmap`` makes the process look as large as the file even though it only ever needed one tile.
Positional reads and writes go through the page cache instead, which the kernel owns and reclaims: the process
holds only the tile in flight. ``pread``/``pwrite`` also ignore the shared file offset, so a handle inherited by
forked workers cannot race.

>>> import numpy as np, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "raw.bin")
>>> f = RawArrayFile.create(path, (4, 5, 3), np.uint16)
>>> f.write(((1, 3, 1), (0, 5, 2), (0, 3, 1)), np.ones((2, 3, 3), np.uint16))
>>> f.read(((0, 4, 1), (0, 2, 1), (0, 1, 1)))[..., 0].tolist()
[[0, 0], [1, 0], [1, 0], [0, 0]]
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError

__all__ = ["RawArrayFile"]

Box = Sequence[tuple[int, int, int]]


class RawArrayFile:
    """``shape``/``dtype`` array stored from byte ``offset`` of ``path`` in C (or Fortran) order."""

    def __init__(
        self, path: str | os.PathLike, shape: Sequence[int], dtype: Any, *, offset: int = 0, order: str = "C",
        writable: bool = False,
    ) -> None:  # fmt: skip
        self.path = os.fspath(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.offset = int(offset)
        if order not in ("C", "F"):
            raise ConfigError(f"order must be 'C' or 'F'; received {order!r}")
        self.order = order
        self.writable = writable
        self._fd: int | None = None
        self._pid: int | None = None

    @classmethod
    def create(
        cls, path: str | os.PathLike, shape: Sequence[int], dtype: Any, *, offset: int = 0, order: str = "C"
    ) -> RawArrayFile:
        """Size a (sparse) file for the array after ``offset`` bytes that already hold a header, if any."""
        raw = cls(path, shape, dtype, offset=offset, order=order, writable=True)
        size = raw.offset + math.prod(raw.shape) * raw.dtype.itemsize
        with open(path, "r+b" if os.path.exists(path) and offset else "wb") as f:
            f.truncate(size)
        return raw

    @classmethod
    def reopen(
        cls, path: str | os.PathLike, shape: Sequence[int], dtype: Any, *, offset: int = 0, order: str = "C",
        header: bytes | None = None,
    ) -> RawArrayFile:  # fmt: skip
        """Open the file of an interrupted writer for more writes, after checking that it holds this array: its
        size, and the ``header`` bytes it starts with when given."""
        raw = cls(path, shape, dtype, offset=offset, order=order, writable=True)
        size = raw.offset + math.prod(raw.shape) * raw.dtype.itemsize
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have != size:
            found = "does not exist" if have is None else f"has {have} bytes"
            raise DataError(
                f"cannot resume {raw.path}: it {found}, but a {raw.shape} {raw.dtype} array needs {size}. It was "
                "not written by an interrupted writer with this shape and dtype: start over (overwrite=True)"
            )
        if header is not None:
            with open(path, "rb") as f:
                if f.read(len(header)) != header:
                    raise DataError(
                        f"cannot resume {raw.path}: its header differs from the one this writer writes (another "
                        "shape, dtype or affine): start over (overwrite=True)"
                    )
        return raw

    @property
    def fd(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR if self.writable else os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": None}

    # ------------------------------------------------------------------ geometry in C order
    def _c_view(self, bounds: Box) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
        """Shape and box of the data as a C-order array (a Fortran array is its reverse in C order)."""
        boxes = [(lo, lo + (len(range(lo, hi, step)) - 1) * step + 1) for lo, hi, step in bounds]
        if self.order == "F":
            return self.shape[::-1], boxes[::-1]
        return self.shape, boxes

    def _runs(
        self, shape: tuple[int, ...], box: list[tuple[int, int]]
    ) -> tuple[int, list[tuple[tuple[int, ...], int]]]:
        """Contiguous runs covering the box: (elements per run, [(outer index, byte offset), ...])."""
        n = len(shape)
        k = n
        while k > 0 and box[k - 1] == (0, shape[k - 1]):
            k -= 1
        if k == 0:
            return math.prod(shape), [((), self.offset)]
        run = (box[k - 1][1] - box[k - 1][0]) * math.prod(shape[k:])
        strides = np.cumprod((1, *shape[::-1]))[::-1][1:]  # element strides of a C-order array
        base = box[k - 1][0] * int(strides[k - 1])
        outer = [range(lo, hi) for lo, hi in box[: k - 1]]
        runs = [
            (idx, self.offset + (base + sum(i * int(s) for i, s in zip(idx, strides))) * self.dtype.itemsize)
            for idx in itertools.product(*outer)
        ]
        return run, runs

    def _read_box(self, shape: tuple[int, ...], box: list[tuple[int, int]]) -> np.ndarray:
        out = np.empty(tuple(hi - lo for lo, hi in box), dtype=self.dtype)
        run, runs = self._runs(shape, box)
        nbytes = run * self.dtype.itemsize
        flat = out.reshape(-1, run) if out.size else out.reshape(0)
        for j, (_, offset) in enumerate(runs):
            got = os.preadv(self.fd, [memoryview(flat[j]).cast("B")], offset)
            if got != nbytes:
                raise DataError(
                    f"{self.path} is truncated: {nbytes} bytes expected at offset {offset}, {got} available"
                )
        return out

    # ------------------------------------------------------------------ public
    def read(self, bounds: Box) -> np.ndarray:
        """Elements ``range(lo, hi, step)`` per axis (in the array's own axis order)."""
        shape, box = self._c_view(bounds)
        data = self._read_box(shape, box)
        if self.order == "F":
            data = data.transpose()
        return data[tuple(slice(None, None, step) for _, _, step in bounds)]

    def write(self, bounds: Box, value: np.ndarray) -> None:
        """Store ``value`` (shape of ``bounds``) at ``range(lo, hi, step)`` per axis."""
        value = np.asarray(value, dtype=self.dtype)
        if any(step != 1 for _, _, step in bounds):  # strided: read-modify-write the bounding box
            box_bounds = [(lo, lo + (len(range(lo, hi, step)) - 1) * step + 1, 1) for lo, hi, step in bounds]
            block = self.read(box_bounds)
            block[tuple(slice(None, None, step) for _, _, step in bounds)] = value
            self.write(box_bounds, block)
            return
        shape, box = self._c_view(bounds)
        data = value.transpose() if self.order == "F" else value
        data = np.ascontiguousarray(data)
        run, runs = self._runs(shape, box)
        flat = data.reshape(-1, run)
        for j, (_, offset) in enumerate(runs):
            view = memoryview(flat[j]).cast("B")
            while view:  # pwrite may write less than asked (signals, quotas): continue where it stopped
                written = os.pwrite(self.fd, view, offset)
                view, offset = view[written:], offset + written
