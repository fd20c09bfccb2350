"""Where boundary tensors live: whole maps of shape ``(N, C, *spatial)`` that cross a segment boundary (activations
in the forward, their gradients in the backward, skip tensors included), read and written box by box.

Three stores with one interface (:class:`Store`), one per tier (NOTE [ Storage tiers ]):

* :class:`TensorStore` on the compute device (tier ``"device"``), or in pinned host memory when computing on CUDA
  (tier ``"host"``);
* :class:`DiskStore`, a sparse file in a run directory of a :class:`Scratch` (tier ``"disk"``).

A :class:`Scratch` checks its directory when a run starts (exists, is a directory, is writable, has the bytes the
plan needs) and removes its run directory on every way out (NOTE [ Scratch lifetime ]).

>>> import tempfile, torch
>>> with Scratch(tempfile.mkdtemp(), needed_bytes=2 * 3 * 8 * 8 * 4) as scratch:
...     store = DiskStore((2, 3, 8, 8), torch.float32, scratch, "act0", "cpu")
...     store.write((slice(0, 4), slice(2, 6)), torch.ones(2, 3, 4, 4))
...     store.add((slice(2, 6), slice(2, 6)), torch.ones(2, 3, 4, 4))
...     part = store.read((slice(0, 8), slice(2, 3)))
>>> part.shape, part[0, 0, :, 0].tolist()
(torch.Size([2, 3, 8, 1]), [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0])
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import functools
import itertools
import math
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import ConfigError, DataError, DiskFullError, ShapeError, WriterStateError
from .units import format_bytes

__all__ = ["Box", "DiskStore", "Scratch", "Store", "TensorStore", "chunk_shape", "remove_stale_runs"]

# NOTE [ Storage tiers ]
# A boundary tensor is a whole map (N, C, *spatial) that one segment writes tile by tile and the next reads tile by
# tile (in the backward, its gradient: the tiles of the later segment *add* into overlapping boxes). The planner puts
# each one in a tier:
#
# * "device": a tensor on the compute device. Reads are a copy of the box, so a caller cannot alter the store by
#   accident; nothing moves between memories. A caller that only reads may ask for the store's own memory instead
#   (``read(box, shared=True)``): a box that is contiguous in the map (the whole map, as a one-tile segment reads its
#   sources; whole rows of the first spatial dim when N and C are 1) is then returned as a view, without the copy (about
#   0.5 s of a 47-52 s EfficientNet-B0 step, BENCHMARKS.md), valid until the store's next write or add (the engine
#   reads only complete stores). Writing into such a view would
#   change the map under every later reader, so the store remembers its tensor's version counter after each of its
#   own writes and adds and refuses to be read once anything else has written into it.
# * "host": when computing on CUDA, a tensor in pinned host memory. A read gathers the box into a pinned staging
#   buffer and copies it to the device with non_blocking=True, so the transfer overlaps whatever the device is still
#   computing; the staging buffer is the transfer's own (PyTorch's pinned allocator keeps it until the copy is
#   done), so a write or add into the store right after a read cannot change what the read delivers. Bytes over
#   PCIe per read: the box, once; write and add move it back synchronously.
# * "disk": a file in the run directory of a Scratch, sized with os.ftruncate (a sparse file: unwritten regions read
#   as zeros, so a gradient map needs no zero-fill pass) and, where the filesystem has it, with its blocks reserved
#   by fallocate(2) (unwritten extents, which still read as zeros). Reserving costs ~10 ms per GiB; it makes the
#   first write of a block 16x faster on this machine's ext4 (2.4 against 0.15 GB/s: a sparse file allocates blocks
#   as they are written), and a full disk shows when the store is made, not in the middle of a run. The file is
#   read and written with os.preadv/os.pwritev into the buffers of CPU tensors, never through a memory map: pages of
#   a map that a process touches count in its resident set (and against a cgroup limit) until the kernel chooses to
#   drop them, so a mapped 8 GiB boundary map read once end to end looks like 8 GiB of process memory. With
#   pread/pwrite the process holds only the box; the kernel's page cache keeps what it can and drops the rest
#   without charging the process.
#
# Disk layout: chunks. The map is cut into chunks of `chunk` positions (DiskStore(chunk=...); default chunk_shape():
# a power-of-two cube of about 1 MiB, e.g. 64x64 positions of a 64-channel float32 map, 16x32 of a 512-channel one,
# 16x32x32 of a 16-channel 3D map), the chunks lie in the file in C order of their grid index, each as large as the
# map leaves it (no padding: the file is the map's size), and each chunk is contiguous and channel-major, (N*C,
# *chunk). Chunks next to each other along the last dim are next to each other in the file, so a box is, per row of
# chunks it touches, one contiguous range of whole chunks (a 560^2 box of a 64-channel map: about 10 ranges of about
# 10 MiB), moved in pieces of at most 1 MiB of whole chunks through a staging buffer. The box's part of each chunk
# is copied between the staging buffer and the (N*C, *box) tensor with strided views whose innermost dim is
# contiguous on both sides: no transposition (the chunks of a row that the box covers alike share one view). Reading
# moves the chunks whole (a box not aligned to the chunks reads up to a chunk more per side: 1.24x the bytes for a
# 560^2 box in 64^2 chunks); writing a piece that the box covers only in part reads it first and writes it back
# whole, unless none of its chunks was ever written (the store remembers which were: the rest of a fresh chunk is
# zero, so neither a read nor a zero pass of the file is needed); an add reads every written piece. pwrite calls
# move at most _WRITE_BYTES (140 KiB, 35 pages): on this machine's kernel (6.18, ext4), a large write aligned to a
# power of two makes the page cache allocate large folios, and 1 MiB writes ran at 0.35-0.6 GB/s of CPU time against
# 1.2-3.5 GB/s for writes of 140 KiB (BENCHMARKS.md). On an accelerator the box is assembled in pinned host memory
# and copied to the device with non_blocking=True (a new pinned tensor per read, which PyTorch keeps until the copy
# is done); writes and adds copy the value to the CPU first.
#
# Before the chunks (up to the seventh session) the file was the C-order array (*spatial, N, C): a box was
# prod(b_0 .. b_{k-2}) strided runs of b_{k-1}*N*C*itemsize bytes (a 560^2 box of a 16384-wide 64-channel map: 560
# runs of 140 KiB, 4 MiB apart), transposed into (N, C, *box) through a staging buffer. What the chunks changed, in
# BENCHMARKS.md, "Boundary storage (issue 11)".
#
# Costs per tile (B = the box's bytes = N*C*prod(b)*itemsize): a read moves B and the chunks' margins from the page
# cache or the disk and writes B into a new tensor (page faults included: the engine maps each buffer fresh, NOTE [
# Heap growth under a budget ] in _allocator.py); a write moves B the other way (plus a read of the partly covered
# chunks already written); an add reads and writes the covering chunks (the sum is taken on the CPU in the store's
# dtype, so it rounds exactly as `tensor[box] += value` does). Measured on this machine: BENCHMARKS.md,
# "Boundary storage (issue 11)" (benchmarks/boundary_io.py). add() and a partial write are read-modify-writes of
# whole chunks: two threads writing or adding into boxes that share a chunk of one DiskStore must be serialised by
# the caller.

Box = tuple[slice, ...]
"""One slice per SPATIAL dim of a store (N and C are always whole); steps must be 1, bounds inside the shape."""


@runtime_checkable
class Store(Protocol):
    """A whole boundary tensor of shape ``(N, C, *spatial)``, read and written by boxes (NOTE [ Storage tiers ])."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    tier: str  # "device" | "host" | "disk"

    def read(self, box: Box, *, shared: bool = False) -> torch.Tensor:
        """The box as a contiguous ``(N, C, *box)`` tensor on the compute device: a new one, or, with ``shared``
        (the caller only reads it and never writes into it), possibly the store's own memory: valid until the
        store's next write or add (the engine reads only stores that are complete)."""
        ...

    def write(self, box: Box, value: torch.Tensor) -> None:
        """Overwrite the box with ``value`` of shape ``(N, C, *box)`` and the store's dtype."""
        ...

    def add(self, box: Box, value: torch.Tensor) -> None:
        """Accumulate ``value`` into the box (gradients of overlapping tile boxes)."""
        ...

    def close(self) -> None:
        """Free the memory or delete the file; idempotent."""
        ...


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3 or any(s < 0 for s in shape):
        raise ShapeError(
            f"a boundary store has shape (N, C, *spatial) with at least one spatial dim and no negative size, got "
            f"{shape}"
        )
    return shape


def _ranges(box: Box, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) per spatial dim of ``box``; refuses boxes that do not lie inside ``spatial``."""
    if not isinstance(box, tuple) or len(box) != len(spatial) or not all(isinstance(s, slice) for s in box):
        raise ShapeError(
            f"a box is a tuple of {len(spatial)} slices (one per spatial dim of {spatial}), got {box!r}"
        )
    out = []
    for s, size in zip(box, spatial):
        start = 0 if s.start is None else int(s.start)
        stop = size if s.stop is None else int(s.stop)
        if s.step not in (None, 1) or not 0 <= start <= stop <= size:
            raise ShapeError(
                f"box {box!r} does not lie inside the spatial shape {spatial}: each slice needs step 1 and "
                f"0 <= start <= stop <= size (no negative or clipped bounds): crop the box to the map first"
            )
        out.append((start, stop))
    return out


def _check_value(value: Any, expected: tuple[int, ...], dtype: torch.dtype, box: Box) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ShapeError(f"a box is written from a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != expected or value.dtype != dtype:
        raise ShapeError(
            f"the value for box {box!r} must have shape {expected} and dtype {dtype} (the store's), got "
            f"{tuple(value.shape)} {value.dtype}: convert it, or store it in a store of that dtype"
        )
    return value.detach()


def _same_device(a: torch.device, b: torch.device) -> bool:
    def norm(d: torch.device) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
        )

    return a.type == b.type and (a.type != "cuda" or norm(a) == norm(b))


def _version(t: torch.Tensor) -> int | None:
    """The version counter of ``t`` (shared by its views, bumped by every in-place write), or None for a tensor
    made under torch.inference_mode, which has none."""
    return None if t.is_inference() else t._version


class TensorStore:
    """A boundary tensor in memory: on the compute device (tier ``"device"``), or, with ``device="cpu"`` and a CUDA
    ``compute_device``, in pinned host memory (tier ``"host"``) from which reads are copied with non_blocking=True.

    ``zero=False`` leaves the memory uninitialised (for maps written whole before they are read).

    >>> store = TensorStore((1, 2, 4, 4), torch.float64, "cpu")
    >>> store.add((slice(1, 3), slice(None)), torch.ones(1, 2, 2, 4, dtype=torch.float64))
    >>> store.read((slice(0, 2), slice(0, 1)))[0, 0].flatten().tolist(), store.tier, store.nbytes
    ([0.0, 1.0], 'device', 256)
    """

    def __init__(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: str | torch.device,
        *,
        zero: bool = True,
        compute_device: str | torch.device | None = None,
    ) -> None:
        self.shape = _check_shape(shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.compute_device = self.device if compute_device is None else torch.device(compute_device)
        if _same_device(self.device, self.compute_device):
            self.tier = "device"
        elif self.device.type == "cpu":
            self.tier = "host"
        else:
            raise ConfigError(
                f"a TensorStore lives on the compute device ({self.compute_device}) or in host memory ('cpu'), "
                f"got device={self.device}: pass device='cpu' or device={str(self.compute_device)!r}"
            )
        self._pinned = self.tier == "host" and self.compute_device.type == "cuda"
        make = torch.zeros if zero else torch.empty
        self._data: torch.Tensor | None = make(
            self.shape, dtype=dtype, device=self.device, pin_memory=self._pinned
        )
        self.nbytes = self._data.numel() * self._data.element_size()
        self._written_version = _version(
            self._data
        )  # NOTE [ Storage tiers ]: written only by write() and add()

    def _view(self, box: Box) -> tuple[torch.Tensor, tuple[int, ...]]:
        if self._data is None:
            raise WriterStateError(
                f"this {self.tier} store {self.shape} was closed: it cannot be read or written"
            )
        if _version(self._data) != self._written_version:
            raise WriterStateError(
                f"this {self.tier} store {self.shape} was written through a view that read(shared=True) returned: "
                "its map is no longer what its writer stored. A caller of read(shared=True) must not write into "
                "the result; copy it first (read without shared=True)"
            )
        ranges = _ranges(box, self.shape[2:])
        view = self._data[(slice(None), slice(None), *(slice(a, b) for a, b in ranges))]
        return view, tuple(view.shape)

    def read(self, box: Box, *, shared: bool = False) -> torch.Tensor:
        """The box as a contiguous ``(N, C, *box)`` tensor on the compute device. A copy, unless ``shared`` and the
        store is on the compute device and the box is contiguous in it: then a view of the store's own memory,
        which the caller must not write into (NOTE [ Storage tiers ])."""
        view, _ = self._view(box)
        if not self._pinned:
            if shared and self.tier == "device" and view.is_contiguous():
                return view
            return view.to(self.compute_device).clone(memory_format=torch.contiguous_format)
        staging = torch.empty(view.shape, dtype=self.dtype, pin_memory=True)
        staging.copy_(view)  # a copy of its own: later writes to the store cannot race with the transfer
        return staging.to(self.compute_device, non_blocking=True)

    def write(self, box: Box, value: torch.Tensor) -> None:
        view, expected = self._view(box)
        value = _check_value(value, expected, self.dtype, box)
        view.copy_(value)
        self._written_version = _version(view)

    def add(self, box: Box, value: torch.Tensor) -> None:
        view, expected = self._view(box)
        value = _check_value(value, expected, self.dtype, box)
        view.add_(value.to(self.device))
        self._written_version = _version(view)

    def close(self) -> None:
        self._data = None

    def __repr__(self) -> str:
        return f"TensorStore({self.shape}, {self.dtype}, tier={self.tier!r}, {format_bytes(self.nbytes)})"


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@functools.cache
def _libc_fallocate() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return fallocate


def _reserve(fd: int, nbytes: int) -> bool:
    """Reserve the file's blocks with fallocate(2) (mode 0: unwritten extents, which read as zeros); False where the
    system or the filesystem has no such call (the file stays sparse). A full disk raises OSError(ENOSPC) here, when
    the store is made, instead of in the middle of a run (NOTE [ Storage tiers ])."""
    fallocate = _libc_fallocate()
    if fallocate is None or nbytes == 0:
        return False
    while fallocate(fd, 0, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))
    return True


_Copy = tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]
_CHUNK_BYTES = 1024 * 1024  # default chunk of a DiskStore's file, at most (NOTE [ Storage tiers ])
_SPAN_BYTES = 1024 * 1024  # at most this many file bytes per call: whole chunks, at least one
# at most this many bytes per pwrite: 35 pages, not a power of two (NOTE [ Storage tiers ]: large aligned writes
# make the page cache allocate large folios, 3-5x slower on this machine)
_WRITE_BYTES = 35 * 4096


def chunk_shape(spatial: Sequence[int], position_bytes: int, target: int = _CHUNK_BYTES) -> tuple[int, ...]:
    """The default chunk of a disk store's file (NOTE [ Storage tiers ]): a power-of-two cube of positions of at
    most ``target`` bytes (``position_bytes`` = N*C*itemsize each), clipped to the map, then grown along the dims
    the map cut short (the last dims first) while it stays within ``target``.

    >>> chunk_shape((16384, 16384), 256), chunk_shape((2048, 2048), 2048), chunk_shape((80, 80, 80), 64)
    ((64, 64), (16, 32), (16, 32, 32))
    >>> chunk_shape((3, 100000), 256)
    (3, 1024)
    """
    positions = max(1, target // max(position_bytes, 1))
    side = 1
    while (2 * side) ** len(spatial) <= positions:
        side *= 2
    chunk = [max(1, min(side, s)) for s in spatial]
    grown = True
    while grown:
        grown = False
        for d in reversed(range(len(chunk))):
            if chunk[d] < spatial[d] and math.prod(chunk) * 2 <= positions:
                chunk[d] = min(2 * chunk[d], spatial[d])
                grown = True
    return tuple(chunk)


class DiskStore:
    """A boundary tensor in the file ``scratch.path(name)`` (tier ``"disk"``), read and written with pread/pwrite
    (NOTE [ Storage tiers ]); unwritten regions read as zeros. Reads return tensors on ``compute_device``.

    The file holds the map in chunks of ``chunk`` positions (default: :func:`chunk_shape`, about 1 MiB), each chunk
    contiguous and channel-major; a box moves as whole chunks, a few long runs of consecutive chunks.

    ``reserve=True`` reserves the file's blocks when it is made (fallocate, where the filesystem has it: writes are
    much faster and a full disk shows at once); ``reserve=False`` leaves it sparse (no disk used until written).
    A full disk raises :class:`~tilegrad.DiskFullError` naming the file.
    """

    tier = "disk"

    def __init__(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        scratch: Scratch,
        name: str,
        compute_device: str | torch.device,
        *,
        reserve: bool = True,
        chunk: Sequence[int] | None = None,
    ) -> None:
        self.shape = _check_shape(shape)
        self.dtype = dtype
        self.compute_device = torch.device(compute_device)
        self._spatial = self.shape[2:]
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = math.prod(self.shape) * self._itemsize
        self._nc = self.shape[0] * self.shape[1]
        if chunk is None:
            chunk = chunk_shape(self._spatial, self._nc * self._itemsize)
        chunk = tuple(chunk)
        if len(chunk) != len(self._spatial) or not all(isinstance(c, int) and c >= 1 for c in chunk):
            raise ShapeError(
                f"a disk store's chunk is one size >= 1 per spatial dim of {self._spatial}, got {chunk!r}"
            )
        self.chunk = tuple(max(1, min(c, s)) for c, s in zip(chunk, self._spatial))
        self._grid = tuple(-(-s // c) for s, c in zip(self._spatial, self.chunk))
        self._written = bytearray(math.prod(self._grid))  # chunks ever written: the others hold zeros
        self._span_bytes, self._write_bytes = _SPAN_BYTES, _WRITE_BYTES
        self._pinned = self.compute_device.type == "cuda"
        self.path = scratch.path(name)
        try:
            self._fd: int | None = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except FileExistsError:
            raise ConfigError(
                f"a boundary file named {name!r} already exists in {self.path.parent}: give each store its own name"
            ) from None
        try:
            os.ftruncate(self._fd, self.nbytes)
            self.reserved = reserve and _reserve(self._fd, self.nbytes)
        except OSError as err:
            self.close()
            if err.errno in _FULL:
                raise self._full(err, self.nbytes) from None
            raise
        scratch._stores.add(self)

    def _full(self, err: OSError, needed: int) -> DiskFullError:
        try:
            free: int | None = shutil.disk_usage(self.path.parent).free
        except OSError:
            free = None
        return DiskFullError(
            self.path,
            needed,
            free,
            f" with scratch_dir= (--scratch-dir) on a disk with more room ({os.strerror(err.errno)})",
        )

    def _extent(self, d: int, g: int) -> int:
        """Size along dim ``d`` of the chunks with grid index ``g`` there (the last ones may be cut by the map)."""
        return min(self.chunk[d], self._spatial[d] - g * self.chunk[d])

    def _chunk_offset(self, g: Sequence[int]) -> int:
        """Element offset of chunk ``g`` in the file: the chunks in C order of their grid index, each as large as
        the map leaves it (no padding), so the chunks before ``g`` hold, per dim d, the positions of the chunks with
        the same indices before d, a smaller index at d and any index after it."""
        k, offset, before = len(g), 0, 1
        for d in range(k):
            offset += before * g[d] * self.chunk[d] * math.prod(self._spatial[d + 1 :])
            before *= self._extent(d, g[d])
        return offset * self._nc

    def _pieces(self, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int, range, bool, list[_Copy]]]:
        """The box as pieces of consecutive chunks of one row (chunks whose grid indices differ only in the last
        dim, consecutive in the file), each moved with one call of at most ``_span_bytes`` (one chunk at least):
        (element offset in the file, elements, flat indices of its chunks, whether the box covers them all whole,
        copies). A copy (offset in the piece, shape, strides, box start) is a view of the piece of shape
        (N*C, *part, m, w): the box's part of m chunks that it covers alike (w wide along the last dim; along the
        others, every chunk of a row has the same part), and where that part starts in the box."""
        k, nc, chunk = len(ranges), self._nc, self.chunk
        last, c = k - 1, chunk[-1]
        a, b = ranges[last]
        g0, g1 = a // c, -(-b // c)
        cells = [range(lo // ch, -(-hi // ch)) for (lo, hi), ch in zip(ranges[:last], chunk)]
        for outer in itertools.product(*cells):
            ext = [self._extent(d, g) for d, g in enumerate(outer)]
            lo = [max(ranges[d][0] - g * chunk[d], 0) for d, g in enumerate(outer)]
            hi = [min(ranges[d][1] - g * chunk[d], e) for d, (g, e) in enumerate(zip(outer, ext))]
            start = [g * chunk[d] + x - ranges[d][0] for d, (g, x) in enumerate(zip(outer, lo))]
            part = [y - x for x, y in zip(lo, hi)]
            whole_outer = all(x == 0 and y == e for x, y, e in zip(lo, hi, ext))
            area = math.prod(ext)
            # elements of a chunk of the row that the map does not cut along the last dim
            full = area * c * nc
            row = self._chunk_offset((*outer, g0))
            flat0 = 0
            for d, g in enumerate((*outer, g0)):
                flat0 = flat0 * self._grid[d] + g
            per = max(1, self._span_bytes // (full * self._itemsize))
            for p0 in range(g0, g1, per):
                p1 = min(p0 + per, g1)
                copies: list[_Copy] = []
                whole, g, elems = whole_outer, p0, 0
                while g < p1:
                    e = self._extent(last, g)
                    x, y = max(a - g * c, 0), min(b - g * c, e)
                    m = 1
                    if x == 0 and y == c:  # covered along the last dim: joins the next chunks covered so
                        while g + m < p1 and min(b, self._spatial[last]) >= (g + m + 1) * c:
                            m += 1
                    whole = whole and x == 0 and y == e
                    inner = [math.prod(ext[d + 1 :]) * e for d in range(last)]  # position strides in a chunk
                    copies.append(
                        (
                            (g - p0) * full + sum(v * s for v, s in zip(lo, inner)) + x,
                            (nc, *part, m, y - x),
                            (area * e, *inner, full, 1),
                            (*start, g * c + x - a),
                        )
                    )
                    elems += m * area * e * nc
                    g += m
                yield row + (p0 - g0) * full, elems, range(flat0 + p0 - g0, flat0 + p1 - g0), whole, copies

    @staticmethod
    def _piece_view(staging: torch.Tensor, copy: _Copy) -> torch.Tensor:
        offset, shape, strides, _ = copy
        return staging.as_strided(shape, strides, offset)

    @staticmethod
    def _box_view(box: torch.Tensor, copy: _Copy) -> torch.Tensor:
        """The part of ``box`` (N*C, *box) that a copy moves, shaped like its view of the piece."""
        _, shape, _, start = copy
        index = (slice(None), *(slice(s, s + n) for s, n in zip(start[:-1], shape[1:-2])))
        w = shape[-2] * shape[-1]
        return box[(*index, slice(start[-1], start[-1] + w))].unflatten(-1, shape[-2:])

    def _staging(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=self.dtype)

    def _move(self, write: bool, staging: torch.Tensor, offset: int, elems: int) -> None:
        self._io(write, self._bytes(staging)[: elems * self._itemsize], offset * self._itemsize)

    def _io(self, write: bool, view: memoryview, offset: int) -> None:
        """Move one contiguous byte range between ``view`` and the file at ``offset`` (short transfers resumed)."""
        assert self._fd is not None
        while view.nbytes:
            try:
                if write:
                    done = os.pwritev(self._fd, [view[: self._write_bytes]], offset)
                else:
                    done = os.preadv(self._fd, [view], offset)
            except OSError as err:
                if err.errno in _FULL:
                    raise self._full(err, view.nbytes) from None
                raise
            if done == 0:
                raise DataError(
                    f"the boundary file {self.path} ends before byte {offset} (expected {self.nbytes} bytes): "
                    f"something else truncated it; do not touch the scratch directory while a run is going"
                )
            view, offset = view[done:], offset + done

    def _prepare(
        self, box: Box, value: torch.Tensor | None = None
    ) -> tuple[list[tuple[int, int]], tuple[int, ...]]:
        if self._fd is None:
            raise WriterStateError(f"the boundary file {self.path} was closed: it cannot be read or written")
        ranges = _ranges(box, self._spatial)
        sizes = tuple(b - a for a, b in ranges)
        if value is not None:
            _check_value(value, (*self.shape[:2], *sizes), self.dtype, box)
        return ranges, sizes

    @staticmethod
    def _bytes(t: torch.Tensor) -> memoryview:
        return memoryview(t.view(-1).view(torch.uint8).numpy())

    def read(self, box: Box, *, shared: bool = False) -> torch.Tensor:
        """The box as a new contiguous ``(N, C, *box)`` tensor on the compute device (``shared`` changes nothing
        here: the box is always read from the file)."""
        ranges, sizes = self._prepare(box)
        out = torch.empty((self._nc, *sizes), dtype=self.dtype, pin_memory=self._pinned)
        if out.numel():
            staging: torch.Tensor | None = None
            for offset, elems, chunks, _, copies in self._pieces(ranges):
                if not any(self._written[i] for i in chunks):  # never written: zeros, nothing to read
                    for copy in copies:
                        self._box_view(out, copy).zero_()
                    continue
                if staging is None or staging.numel() < elems:
                    staging = self._staging(elems)
                self._move(False, staging, offset, elems)
                for copy in copies:
                    self._box_view(out, copy).copy_(self._piece_view(staging, copy))
        out = out.view(*self.shape[:2], *sizes)
        return out.to(self.compute_device, non_blocking=self._pinned)

    def write(self, box: Box, value: torch.Tensor) -> None:
        self._update(box, value, add=False)

    def add(self, box: Box, value: torch.Tensor) -> None:
        self._update(box, value, add=True)

    def _update(self, box: Box, value: torch.Tensor, add: bool) -> None:
        """Write or add ``value`` into the box, a piece of whole chunks at a time: a piece that the box covers only
        in part (or any piece, for an add) is read first if it was ever written, changed at the box's positions
        and written back whole, so the rest of its chunks keeps what it held."""
        ranges, sizes = self._prepare(box, value)
        if not math.prod(sizes) or not self._nc:
            return
        flat = value.detach().to("cpu").contiguous().view(self._nc, *sizes)
        staging: torch.Tensor | None = None
        for offset, elems, chunks, whole, copies in self._pieces(ranges):
            if staging is None or staging.numel() < elems:
                staging = self._staging(elems)
            held = (add or not whole) and any(self._written[i] for i in chunks)
            if held:
                self._move(False, staging, offset, elems)
            elif not whole or add:
                staging[:elems].zero_()
            for copy in copies:
                piece, part = self._piece_view(staging, copy), self._box_view(flat, copy)
                if add:
                    piece += part
                else:
                    piece.copy_(part)
            self._move(True, staging, offset, elems)
            for i in chunks:
                self._written[i] = 1

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is None:
            return
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # the Scratch removed its directory first
            os.unlink(self.path)

    def __repr__(self) -> str:
        return (
            f"DiskStore({self.shape}, {self.dtype}, {str(self.path)!r}, {format_bytes(self.nbytes)}, "
            f"chunk={self.chunk})"
        )


# NOTE [ Scratch lifetime ]
# A run keeps its disk-tier boundary files in one run directory, <scratch_dir>/tilegrad-scratch-<pid>-<random>,
# created by Scratch.__enter__ after checking that scratch_dir exists, is a directory, is writable and has the bytes
# the plan needs (statvfs), so that a bad scratch directory fails before the first tile. The directory goes away on
# every way out:
#
# * normal exit and errors, KeyboardInterrupt (Ctrl-C) included: Scratch.__exit__ closes the stores and removes it;
# * a Scratch left open (no `with`) at interpreter exit: an atexit hook removes it;
# * SIGTERM: while a Scratch is open in the main thread, a handler removes every open run directory of this process
#   and then dies of SIGTERM as before (the previous handler is restored when the last Scratch closes). If the
#   program had its own Python SIGTERM handler, that one is called instead and decides (it usually raises or exits,
#   and then __exit__ or atexit remove the directory); if SIGTERM was ignored, nothing is installed;
# * SIGKILL (or a power cut) runs no code: the directory stays. Each run directory holds a lock file that its owner
#   keeps flock'ed while the Scratch is open; the kernel drops the lock when the process dies, however it dies. The
#   next Scratch.__enter__ in the same scratch_dir removes every tilegrad-scratch-* directory whose lock it can take
#   (its owner is gone, even if the PID was reused since), or, without a lock file, whose PID is not alive.
#
# A forked child inherits the registry but removes nothing: removal is limited to directories the current PID made.

_PREFIX = "tilegrad-scratch-"
_RUN_NAME = re.compile(rf"{_PREFIX}(\d+)-[0-9a-z]+")
_LOCK_NAME = ".lock"
_OPEN: dict[Path, Scratch] = {}  # run directory -> its open Scratch, for atexit and SIGTERM
_REGISTRY_LOCK = threading.RLock()
_SIGTERM_PREVIOUS: Callable[[int, FrameType | None], Any] | int | None = None
_SIGTERM_INSTALLED = False
_ATEXIT_REGISTERED = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _owner_alive(run_dir: Path, pid: int) -> bool:
    try:
        fd = os.open(run_dir / _LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return _pid_alive(pid)
    except OSError:  # cannot tell (not ours to read): leave it
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def remove_stale_runs(scratch_dir: str | os.PathLike) -> list[Path]:
    """Remove the run directories in ``scratch_dir`` left by processes that are gone (NOTE [ Scratch lifetime ]);
    returns what was removed."""
    try:
        entries = sorted(Path(scratch_dir).iterdir())
    except OSError:
        return []
    removed = []
    for entry in entries:
        match = _RUN_NAME.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or entry in _OPEN:
            continue
        if not _owner_alive(entry, int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _remove_all() -> None:
    """Close every open Scratch of this process (atexit, SIGTERM)."""
    with _REGISTRY_LOCK:
        scratches = [s for s in _OPEN.values() if s._pid == os.getpid()]
    for scratch in scratches:
        scratch.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    previous = _SIGTERM_PREVIOUS
    if callable(previous):  # the program's own handler decides; __exit__ / atexit clean up on its way out
        previous(signum, frame)
        return
    _remove_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm() -> None:
    global _SIGTERM_PREVIOUS, _SIGTERM_INSTALLED
    if _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN or previous is None:  # ignored, or a handler set outside Python: leave it
        return
    _SIGTERM_PREVIOUS = previous
    signal.signal(signal.SIGTERM, _on_sigterm)
    _SIGTERM_INSTALLED = True


def _restore_sigterm() -> None:
    global _SIGTERM_PREVIOUS, _SIGTERM_INSTALLED
    if not _SIGTERM_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:  # someone else's handler installed since stays
        signal.signal(signal.SIGTERM, _SIGTERM_PREVIOUS)  # type: ignore[arg-type]
    _SIGTERM_PREVIOUS, _SIGTERM_INSTALLED = None, False


class Scratch:
    """The run directory of the disk-tier boundary tensors: ``with Scratch(scratch_dir, needed_bytes) as s`` checks
    ``scratch_dir`` (default: the system temp directory) and creates ``tilegrad-scratch-<pid>-<random>`` in it;
    leaving the block removes it (NOTE [ Scratch lifetime ]).

    ``needed_bytes`` is what the plan will write there; fewer free bytes raise :class:`~tilegrad.DiskFullError`
    naming the path, the bytes needed and the bytes free. A missing, non-directory or read-only ``scratch_dir`` is a
    :class:`~tilegrad.ConfigError`.
    """

    def __init__(self, scratch_dir: str | os.PathLike | None, needed_bytes: int) -> None:
        self.root = Path(tempfile.gettempdir() if scratch_dir is None else scratch_dir)
        if isinstance(needed_bytes, bool) or not isinstance(needed_bytes, int) or needed_bytes < 0:
            raise ConfigError(f"needed_bytes is a byte count >= 0, got {needed_bytes!r}")
        self.needed_bytes = needed_bytes
        self.run_dir: Path | None = None
        self.removed: list[Path] = []  # stale run directories removed when this one opened
        self._lock_fd: int | None = None
        self._pid = os.getpid()
        self._stores: weakref.WeakSet[DiskStore] = weakref.WeakSet()

    def _refuse(self, problem: str, fix: str) -> ConfigError:
        return ConfigError(
            f"scratch directory {self.root} {problem} (this run needs {format_bytes(self.needed_bytes)} = "
            f"{self.needed_bytes:,} bytes of scratch space there for boundary tensors): {fix}"
        )

    def _check(self) -> None:
        root = self.root
        elsewhere = "pass scratch_dir= (--scratch-dir) a writable directory with enough free space"
        if not root.exists():
            raise self._refuse("does not exist", f"create it, or {elsewhere}")
        if not root.is_dir():
            raise self._refuse("is not a directory", elsewhere)
        if not os.access(root, os.W_OK | os.X_OK):
            raise self._refuse("is not writable by this user", f"change its permissions, or {elsewhere}")
        self.removed = remove_stale_runs(root)
        stat = os.statvfs(root)
        free = stat.f_bavail * stat.f_frsize
        if free < self.needed_bytes:
            raise DiskFullError(
                root,
                self.needed_bytes,
                free,
                f" with scratch_dir= (--scratch-dir) on a disk with {format_bytes(self.needed_bytes)} free, or with "
                f"a larger memory budget so that fewer boundary tensors go to disk",
            )

    def __enter__(self) -> Scratch:
        global _ATEXIT_REGISTERED
        if self.run_dir is not None:
            raise WriterStateError(
                f"this Scratch is already open at {self.run_dir}: a Scratch is entered once"
            )
        self._check()
        self._pid = os.getpid()
        try:
            run_dir = self.root / f"{_PREFIX}{self._pid}-{secrets.token_hex(4)}"
            try:
                run_dir.mkdir(mode=0o700)
            except OSError as err:  # os.access can pass where mkdir fails (a read-only mount, ACLs)
                if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                raise self._refuse(
                    f"is not writable ({err.strerror})", "pass scratch_dir= (--scratch-dir) another"
                ) from None
            with _REGISTRY_LOCK:
                self.run_dir = run_dir
                _OPEN[run_dir] = self
                if not _ATEXIT_REGISTERED:
                    atexit.register(_remove_all)
                    _ATEXIT_REGISTERED = True
                _install_sigterm()
            self._lock_fd = os.open(run_dir / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def path(self, name: str) -> Path:
        """The file ``name`` in the run directory (a plain file name: no separator, not starting with a dot)."""
        if self.run_dir is None:
            raise WriterStateError(
                "Scratch.path() needs an open Scratch: use it inside `with Scratch(...) as s:`"
            )
        if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or os.sep in name:
            raise ConfigError(
                f"a scratch file name is a plain file name (no '/', not starting with '.'), got {name!r}"
            )
        return self.run_dir / name

    def close(self) -> None:
        """Close the stores made in it and remove the run directory; idempotent (``__exit__`` calls it)."""
        with _REGISTRY_LOCK:
            run_dir, self.run_dir = self.run_dir, None
            if run_dir is None:
                return
            _OPEN.pop(run_dir, None)
            if not _OPEN:
                _restore_sigterm()
        for store in list(self._stores):
            store.close()
        if self._pid == os.getpid():
            shutil.rmtree(run_dir, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __repr__(self) -> str:
        return f"Scratch({str(self.root)!r}, needed_bytes={self.needed_bytes}, run_dir={self.run_dir})"
