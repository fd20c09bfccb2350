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

__all__ = ["Box", "DiskStore", "Scratch", "Store", "TensorStore", "remove_stale_runs"]

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
# Disk layout ("positions", every map but short-rowed 3D ones on the CPU, below): spatial-major with N*C innermost,
# i.e. the file is the C-order array (*spatial, N, C). A box (b_0, ..., b_{k-1}) is then prod(b_0 .. b_{k-2})
# contiguous runs of b_{k-1}*N*C*itemsize bytes (fewer, longer runs when trailing dims are whole: a box of whole
# rows is one run), instead of N*C times as many short runs in an
# (N, C, *spatial) layout. The (N, C, *box) tensor a read returns is a transpose of what the file holds. On the CPU
# the box moves a *span* at a time: the runs along the box's last outer dim are evenly spaced in the file, and those
# whose gaps are no longer than the runs themselves (or 16 KiB) are moved with one call together with their gaps,
# into a staging buffer of at most 1 MiB that stays in cache, and transposed from there into the output with one
# strided copy per span (a 3D box of a 16-channel map, 56^3 of 80^3: 56 calls of 280 KiB instead of 3,136 calls of
# 3.5 KiB, at most twice the box's bytes moved). A write or an add reads a span that has gaps first, changes the
# box's positions and writes the span back whole, so the gaps keep what they held (add reads every span). The box
# crosses main memory once; transposing a whole 64 MiB box after reading it took twice as long. On an accelerator
# the box moves whole in file layout (pinned, runs in pieces of 256 KiB) and is transposed there.
#
# Rows layout (``DiskStore.layout == "rows"``): a 3D map on the CPU whose rows are short (N*C*W*itemsize at most
# _GAP_BYTES, 16 KiB: every map of a 3D U-Net up to ~256^3) is the file (D, H, N*C, W) instead. Rows h0..h1 of a
# plane are then one contiguous span (whole planes join up), which holds the box's W range of every channel, and
# the copy between the span and the (N, C, d, h, w) tensor moves runs of w positions that are contiguous on both
# sides instead of transposing N*C-element positions: in a 160^3 UNet step the store calls took 9-16% less CPU
# time (adds 15-20%, reads 5-13%, writes 12-15%; BENCHMARKS.md, "Boundary storage", eighth session). A span
# carries the rows' positions outside the box's W range, less than a row each, which the positions layout's gap
# rule joins as well; a write reads a span first only when the box does not cover W whole. 1D and 2D maps keep the
# positions layout: a 2D row is a whole slide's width (tens of MiB), where the positions layout moves a box's runs
# without the rest of the row.
#
# Costs per tile (B = the box's bytes = N*C*prod(b)*itemsize): a read moves B from the page cache or the disk and
# writes B into a new tensor (page faults included: the engine maps each buffer fresh, NOTE [ Heap growth under a
# budget ] in _allocator.py); a write moves B the other way; add moves 2B (the sum is taken on the CPU in the
# store's dtype, so it rounds exactly as `tensor[box] += value` does), a write with gaps 2B. One preadv/pwritev per
# span (per piece on an accelerator): without spans, a 3D box of few channels (runs of a few KiB) was bound by those
# calls, not by bytes. A pwrite moves at most _WRITE_BYTES (140 KiB, 35 pages): on this machine's kernel (6.18,
# ext4) a large write aligned to a power of two makes the page cache allocate large folios, and a whole 2048^2 x 64
# map written in 1 MiB spans ran at 0.5 GB/s of CPU time against 1.7 GB/s in calls of 140 KiB (the runs of a tile's
# box in a wide map are shorter than that and were not slowed). Measured on this machine: BENCHMARKS.md,
# "Boundary storage (issue 11)" (benchmarks/boundary_io.py). add() is a read-modify-write: two threads adding into
# overlapping boxes of one DiskStore must be serialised by the caller.

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


_PIECE_BYTES = 256 * 1024  # staging buffer of an accelerator's read or write (NOTE [ Storage tiers ])
_SPAN_BYTES = 1024 * 1024  # at most this many file bytes per call on the CPU (NOTE [ Storage tiers ])
# runs at most this far apart (or as far as they are long) are moved together with their gaps
_GAP_BYTES = 16384
# at most this many bytes per pwrite: 35 pages, not a power of two (NOTE [ Storage tiers ]: a large aligned write
# makes the page cache allocate large folios, 3x slower on this machine)
_WRITE_BYTES = 35 * 4096


class DiskStore:
    """A boundary tensor in the file ``scratch.path(name)`` (tier ``"disk"``), read and written with pread/pwrite
    (NOTE [ Storage tiers ]); unwritten regions read as zeros. Reads return tensors on ``compute_device``.

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
    ) -> None:
        self.shape = _check_shape(shape)
        self.dtype = dtype
        self.compute_device = torch.device(compute_device)
        self._spatial = self.shape[2:]
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.nbytes = math.prod(self.shape) * itemsize
        # byte strides of the spatial dims in the (*spatial, N, C) layout
        strides = [self.shape[0] * self.shape[1] * itemsize]
        for size in reversed(self._spatial[1:]):
            strides.insert(0, strides[0] * size)
        self._strides = tuple(strides)
        self._pinned = self.compute_device.type == "cuda"
        self._nc = self.shape[0] * self.shape[1]
        self._position_bytes = self._nc * itemsize
        self._piece = max(1, _PIECE_BYTES // max(self._position_bytes, 1))
        self._span_bytes, self._gap_bytes, self._write_bytes = _SPAN_BYTES, _GAP_BYTES, _WRITE_BYTES
        # on the CPU, reads and writes transpose piece by piece through a small staging buffer that stays in cache;
        # on an accelerator the box moves whole in file layout and is transposed there
        self._fused = self.compute_device.type == "cpu"
        # a 3D map with short rows, on the CPU: the file is (D, H, N*C, W) instead (NOTE [ Storage tiers ])
        self._row_bytes = self._position_bytes * self._spatial[-1]
        self.layout = (
            "rows"
            if len(self._spatial) == 3 and self._fused and 0 < self._row_bytes <= _GAP_BYTES
            else "positions"
        )
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

    def _runs(self, ranges: list[tuple[int, int]]) -> tuple[int, Iterator[int]]:
        """(bytes per run, file offsets of the runs in C order) of the box ``ranges``."""
        k = len(ranges)
        j = k - 1
        chunk = (ranges[j][1] - ranges[j][0]) * self._strides[j]
        while j > 0 and ranges[j] == (0, self._spatial[j]):  # whole trailing dims: runs join up
            j -= 1
            chunk *= ranges[j][1] - ranges[j][0]
        base = sum(ranges[i][0] * self._strides[i] for i in range(j, k))
        outer = [range(a, b) for a, b in ranges[:j]]
        strides = self._strides[:j]
        return chunk, (
            base + sum(i * s for i, s in zip(index, strides)) for index in itertools.product(*outer)
        )

    def _pieces(self, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
        """(file offset, first position in the box in C order, number of positions) of each piece: the runs of the
        box cut into pieces of at most ``self._piece`` positions (NOTE [ Storage tiers ])."""
        chunk, offsets = self._runs(ranges)
        run = chunk // self._position_bytes
        position = 0
        for offset in offsets:
            for a in range(0, run, self._piece):
                yield offset + a * self._position_bytes, position + a, min(self._piece, run - a)
            position += run

    def _spans(self, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int, int, int, int]]:
        """The box as *spans*, each moved with one call (NOTE [ Storage tiers ]): (file offset, first position in
        the box in C order, runs, positions per run, positions from one run's start to the next's in the file).
        Runs along the last outer dim are evenly spaced; those whose gaps are at most as long as the runs (or
        ``_GAP_BYTES``) go into one span of at most ``_SPAN_BYTES`` (the gaps are moved too, so at most twice the
        box's bytes); a run longer than that is cut into pieces."""
        chunk, _ = self._runs(ranges)
        pb = self._position_bytes
        run = chunk // pb
        if run == 0:
            return
        k = len(ranges)
        j = k - 1
        while j > 0 and ranges[j] == (0, self._spatial[j]):
            j -= 1
        base = sum(ranges[i][0] * self._strides[i] for i in range(j, k))
        if j == 0 or chunk > self._span_bytes:  # pieces of long runs
            piece = max(1, self._span_bytes // pb)
            position = 0
            _, offsets = self._runs(ranges)
            for offset in offsets:
                for a in range(0, run, piece):
                    yield offset + a * pb, position + a, 1, min(piece, run - a), 0
                position += run
            return
        stride = self._strides[j - 1]
        per = max(1, self._span_bytes // stride) if stride - chunk <= max(chunk, self._gap_bytes) else 1
        a, b = ranges[j - 1]
        outer = [range(lo, hi) for lo, hi in ranges[: j - 1]]
        position = 0
        for index in itertools.product(*outer):
            start = base + sum(i * st for i, st in zip(index, self._strides))
            for i in range(a, b, per):
                count = min(per, b - i)
                yield start + i * stride, position, count, run, stride // pb
                position += count * run

    def _span_view(self, staging: torch.Tensor, count: int, run: int, step: int) -> torch.Tensor:
        """The box's positions of a span in ``staging`` (file layout), as a (runs, run, N*C) view."""
        return staging.as_strided((count, run, self._nc), (step * self._nc, self._nc, 1))

    def _span_io(
        self, write: bool, staging: torch.Tensor, offset: int, count: int, run: int, step: int
    ) -> None:
        nbytes = ((count - 1) * step + run) * self._position_bytes
        self._io(write, self._bytes(staging)[:nbytes], offset)

    def _span_staging(self, spans: list[tuple[int, int, int, int, int]]) -> torch.Tensor:
        most = max((c - 1) * st + r for _, _, c, r, st in spans)
        return torch.empty((most, self._nc), dtype=self.dtype)

    def _io(self, write: bool, view: memoryview, offset: int) -> None:
        """Move one contiguous byte range between ``view`` and the file at ``offset`` (short transfers resumed)."""
        assert self._fd is not None
        while view.nbytes:
            try:
                if write:  # in calls of at most _WRITE_BYTES (NOTE [ Storage tiers ])
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

    def _flat(self, value: torch.Tensor, positions: int) -> torch.Tensor:
        """``value`` (N, C, *box) as a contiguous CPU (N*C, positions) tensor."""
        return value.detach().cpu().contiguous().view(self._nc, positions)

    def read(self, box: Box, *, shared: bool = False) -> torch.Tensor:
        """The box as a new contiguous ``(N, C, *box)`` tensor on the compute device (``shared`` changes nothing
        here: the box is always read from the file)."""
        ranges, sizes = self._prepare(box)
        positions, pb = math.prod(sizes), self._position_bytes
        if self.layout == "rows":
            return self._read_rows(ranges, sizes)
        if not self._fused:  # the whole box in file layout, transposed on the compute device
            raw = torch.empty((positions, self._nc), dtype=self.dtype, pin_memory=self._pinned)
            if raw.numel():
                view = self._bytes(raw)
                for offset, p, k in self._pieces(ranges):
                    self._io(False, view[p * pb : (p + k) * pb], offset)
            raw = raw.to(self.compute_device, non_blocking=self._pinned)
            return raw.t().contiguous().view(*self.shape[:2], *sizes)
        out = torch.empty((self._nc, positions), dtype=self.dtype)
        spans = list(self._spans(ranges)) if out.numel() else []
        if spans:
            staging = self._span_staging(spans)
            for offset, first, count, run, step in spans:
                self._span_io(False, staging, offset, count, run, step)
                dst = out[:, first : first + count * run].view(self._nc, count, run)
                dst.copy_(self._span_view(staging, count, run, step).permute(2, 0, 1))
        return out.view(*self.shape[:2], *sizes)

    def write(self, box: Box, value: torch.Tensor) -> None:
        ranges, sizes = self._prepare(box, value)
        positions, pb = math.prod(sizes), self._position_bytes
        if positions * pb == 0:
            return
        if self.layout == "rows":
            self._update_rows(ranges, self._flat(value, positions), add=False)
            return
        if not self._fused:
            raw = value.detach().reshape(self._nc, positions).t().contiguous().cpu()
            view = self._bytes(raw)
            for offset, p, k in self._pieces(ranges):
                self._io(True, view[p * pb : (p + k) * pb], offset)
            return
        self._update(ranges, self._flat(value, positions), add=False)

    def add(self, box: Box, value: torch.Tensor) -> None:
        ranges, sizes = self._prepare(box, value)
        positions, pb = math.prod(sizes), self._position_bytes
        if positions * pb == 0:
            return
        if self.layout == "rows":
            self._update_rows(ranges, self._flat(value, positions), add=True)
            return
        self._update(ranges, self._flat(value, positions), add=True)

    def _update(self, ranges: list[tuple[int, int]], flat: torch.Tensor, add: bool) -> None:
        """Write or add ``flat`` (N*C, positions) into the box, a span at a time: a span with gaps (or an add) is
        read first, changed at the box's positions and written back whole, so the gaps keep what they held."""
        spans = list(self._spans(ranges))
        staging = self._span_staging(spans)
        for offset, first, count, run, step in spans:
            if add or count > 1:
                self._span_io(False, staging, offset, count, run, step)
            dst = self._span_view(staging, count, run, step)
            src = flat[:, first : first + count * run].view(self._nc, count, run).permute(1, 2, 0)
            if add:
                dst += src
            else:
                dst.copy_(src)
            self._span_io(True, staging, offset, count, run, step)

    # -- the "rows" layout of a 3D map: (D, H, N*C, W) (NOTE [ Storage tiers ]) -------------------------------
    def _row_spans(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int, int, int, int]]:
        """The box's rows as spans, each moved with one call: (file offset, first d and first h in the box, planes,
        rows per plane). Rows h0..h1 of one plane are contiguous in the file; when h is whole, so are consecutive
        planes. A span holds at most ``_span_bytes`` (at least one row)."""
        (d0, d1), (h0, h1), _ = ranges
        height = self._spatial[1]
        per = max(1, self._span_bytes // self._row_bytes)  # rows per span
        if (h0, h1) == (0, height) and per >= height:  # whole planes, several per span
            step = per // height
            return [
                (d * height * self._row_bytes, d - d0, 0, min(step, d1 - d), height)
                for d in range(d0, d1, step)
            ]
        return [
            ((d * height + h) * self._row_bytes, d - d0, h - h0, 1, min(per, h1 - h))
            for d in range(d0, d1)
            for h in range(h0, h1, per)
        ]

    def _row_staging(self, spans: list[tuple[int, int, int, int, int]]) -> torch.Tensor:
        """A staging buffer for the largest of ``spans`` (at most ``_span_bytes``, or one row)."""
        return torch.empty(max(p * r for *_, p, r in spans) * self._nc * self._spatial[2], dtype=self.dtype)

    def _row_view(
        self, staging: torch.Tensor, planes: int, rows: int, w: tuple[int, int]
    ) -> tuple[memoryview, torch.Tensor]:
        """The bytes of a span in ``staging`` and the box's part of it as a (planes, rows, N*C, w) view."""
        width = self._spatial[2]
        n = planes * rows * self._nc * width
        view = staging[:n].view(planes, rows, self._nc, width)[..., w[0] : w[1]]
        return self._bytes(staging)[: n * staging.element_size()], view

    def _read_rows(self, ranges: list[tuple[int, int]], sizes: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty((self._nc, *sizes), dtype=self.dtype)
        if out.numel():
            spans = self._row_spans(ranges)
            staging = self._row_staging(spans)
            for offset, d, h, planes, rows in spans:
                raw, part = self._row_view(staging, planes, rows, ranges[2])
                self._io(False, raw, offset)
                out[:, d : d + planes, h : h + rows].copy_(part.permute(2, 0, 1, 3))
        return out.view(*self.shape[:2], *sizes).to(self.compute_device)

    def _update_rows(self, ranges: list[tuple[int, int]], flat: torch.Tensor, add: bool) -> None:
        """Write or add ``flat`` (N*C, positions) into the box, a span at a time: a span is read first for an add,
        or when the box does not cover its rows whole (w is not whole), so the rest of the rows keep what they held."""
        value = flat.view(self._nc, *(b - a for a, b in ranges))
        spans = self._row_spans(ranges)
        staging = self._row_staging(spans)
        gaps = ranges[2] != (0, self._spatial[2])
        for offset, d, h, planes, rows in spans:
            raw, part = self._row_view(staging, planes, rows, ranges[2])
            if add or gaps:
                self._io(False, raw, offset)
            src = value[:, d : d + planes, h : h + rows].permute(1, 2, 0, 3)
            if add:
                part += src
            else:
                part.copy_(src)
            self._io(True, raw, offset)

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is None:
            return
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # the Scratch removed its directory first
            os.unlink(self.path)

    def __repr__(self) -> str:
        return f"DiskStore({self.shape}, {self.dtype}, {str(self.path)!r}, {format_bytes(self.nbytes)})"


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
