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
import errno
import fcntl
import itertools
import math
import os
import re
import secrets
import shutil
import signal
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
# * "device": a tensor on the compute device. Reads are a copy of the box (never a view, so a caller cannot alter
#   the store by accident); nothing moves between memories.
# * "host": when computing on CUDA, a tensor in pinned host memory. A read gathers the box into a pinned staging
#   buffer and copies it to the device with non_blocking=True, so the transfer overlaps whatever the device is still
#   computing; a CUDA event of the last such copy is waited for before the host copy is changed (write/add), so an
#   in-flight read never sees a later write. Bytes over PCIe per read: the box, once.
# * "disk": a sparse file in the run directory of a Scratch (os.ftruncate: unwritten regions take no disk space and
#   read as zeros, so a gradient map needs no zero-fill pass). It is read and written with os.preadv/os.pwritev into
#   the buffers of CPU tensors, never through a memory map: pages of a map that a process touches count in its
#   resident set (and against a cgroup limit) until the kernel chooses to drop them, so a mapped 8 GiB boundary map
#   read once end to end looks like 8 GiB of process memory. With pread/pwrite the process holds only the box; the
#   kernel's page cache keeps what it can and drops the rest without charging the process.
#
# Disk layout: spatial-major with N*C innermost, i.e. the file is the C-order array (*spatial, N, C). A box
# (b_0, ..., b_{k-1}) is then prod(b_0 .. b_{k-2}) contiguous runs of b_{k-1}*N*C*itemsize bytes (fewer, longer runs
# when trailing dims are whole: a box of full rows is one run), one preadv/pwritev each. The (N, C, *box) tensor a
# read returns is the box permuted on the compute device (a CPU copy of the box when computing on the CPU).
#
# Costs per tile (B = the box's bytes = N*C*prod(b)*itemsize): read moves B from the page cache or the disk plus one
# permuting copy of B; write moves B the other way (one copy, then the write); add is a read plus a write (2B moved,
# the sum taken on the CPU in the store's dtype, so it rounds exactly as `tensor[box] += value` does). Measured
# throughput on this machine: BENCHMARKS.md, "Boundary storage (issue 11)" (benchmarks/boundary_io.py). add() is a
# read-modify-write: two threads adding into overlapping boxes of one DiskStore must be serialised by the caller.

Box = tuple[slice, ...]
"""One slice per SPATIAL dim of a store (N and C are always whole); steps must be 1, bounds inside the shape."""


@runtime_checkable
class Store(Protocol):
    """A whole boundary tensor of shape ``(N, C, *spatial)``, read and written by boxes (NOTE [ Storage tiers ])."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    tier: str  # "device" | "host" | "disk"

    def read(self, box: Box) -> torch.Tensor:
        """The box as a new contiguous ``(N, C, *box)`` tensor on the compute device."""
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
        self._pending: Any = None  # the CUDA event of the last non-blocking read (host tier)

    def _view(self, box: Box) -> tuple[torch.Tensor, tuple[int, ...]]:
        if self._data is None:
            raise WriterStateError(
                f"this {self.tier} store {self.shape} was closed: it cannot be read or written"
            )
        ranges = _ranges(box, self.shape[2:])
        view = self._data[(slice(None), slice(None), *(slice(a, b) for a, b in ranges))]
        return view, tuple(view.shape)

    def _wait_for_reads(self) -> None:
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None

    def read(self, box: Box) -> torch.Tensor:
        view, _ = self._view(box)
        if not self._pinned:
            return view.to(self.compute_device).clone(memory_format=torch.contiguous_format)
        staging = torch.empty(view.shape, dtype=self.dtype, pin_memory=True)
        staging.copy_(view)
        out = staging.to(self.compute_device, non_blocking=True)
        self._pending = torch.cuda.Event()
        self._pending.record()
        return out

    def write(self, box: Box, value: torch.Tensor) -> None:
        view, expected = self._view(box)
        value = _check_value(value, expected, self.dtype, box)
        self._wait_for_reads()
        view.copy_(value)

    def add(self, box: Box, value: torch.Tensor) -> None:
        view, expected = self._view(box)
        value = _check_value(value, expected, self.dtype, box)
        self._wait_for_reads()
        view.add_(value.to(self.device))

    def close(self) -> None:
        self._wait_for_reads()
        self._data = None

    def __repr__(self) -> str:
        return f"TensorStore({self.shape}, {self.dtype}, tier={self.tier!r}, {format_bytes(self.nbytes)})"


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskStore:
    """A boundary tensor in a sparse file ``scratch.path(name)`` (tier ``"disk"``), read and written with
    pread/pwrite (NOTE [ Storage tiers ]); unwritten regions read as zeros. Reads return tensors on
    ``compute_device``. A write that meets a full disk raises :class:`~tilegrad.DiskFullError` naming the file."""

    tier = "disk"

    def __init__(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        scratch: Scratch,
        name: str,
        compute_device: str | torch.device,
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

    def _transfer(self, write: bool, raw: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
        """Move ``raw`` (a contiguous CPU tensor (*box, N, C)) from or to the file."""
        if self._fd is None:
            raise WriterStateError(f"the boundary file {self.path} was closed: it cannot be read or written")
        if raw.numel() == 0:
            return
        buffer = memoryview(raw.view(-1).view(torch.uint8).numpy())
        chunk, offsets = self._runs(ranges)
        fd, position = self._fd, 0
        for offset in offsets:
            view = buffer[position : position + chunk]
            position += chunk
            while view.nbytes:
                try:
                    done = os.pwritev(fd, [view], offset) if write else os.preadv(fd, [view], offset)
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

    def _read_raw(self, ranges: list[tuple[int, int]]) -> torch.Tensor:
        sizes = [b - a for a, b in ranges]
        raw = torch.empty((*sizes, self.shape[0], self.shape[1]), dtype=self.dtype, pin_memory=self._pinned)
        self._transfer(False, raw, ranges)
        return raw

    def _to_file_layout(self, value: torch.Tensor) -> torch.Tensor:
        k = value.dim() - 2
        return value.permute(*range(2, 2 + k), 0, 1).contiguous().cpu()

    def read(self, box: Box) -> torch.Tensor:
        ranges = _ranges(box, self._spatial)
        raw = self._read_raw(ranges)
        k = len(ranges)
        return (
            raw.to(self.compute_device, non_blocking=self._pinned).permute(k, k + 1, *range(k)).contiguous()
        )

    def write(self, box: Box, value: torch.Tensor) -> None:
        ranges = _ranges(box, self._spatial)
        expected = (*self.shape[:2], *(b - a for a, b in ranges))
        value = _check_value(value, expected, self.dtype, box)
        self._transfer(True, self._to_file_layout(value), ranges)

    def add(self, box: Box, value: torch.Tensor) -> None:
        ranges = _ranges(box, self._spatial)
        expected = (*self.shape[:2], *(b - a for a, b in ranges))
        value = _check_value(value, expected, self.dtype, box)
        raw = self._read_raw(ranges)
        raw += self._to_file_layout(value)
        self._transfer(True, raw, ranges)

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
