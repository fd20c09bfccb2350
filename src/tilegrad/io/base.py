"""The lazy image: a (C, *spatial) array on disk that reads only what a key touches.

Every reader in :mod:`tilegrad.io` is a :class:`LazyImage`. It looks like a read-only numpy array -- ``.shape``,
``.dtype``, ``.ndim``, ``image[key]`` with ints, slices (any non-zero step) and Ellipsis returning a numpy array --
and carries the physical metadata of the file:

- ``spacing``: size of a pixel/voxel in millimetres per spatial axis, in axis order (None when unknown),
- ``mpp``: microns per pixel in the image plane (the last two spatial axes), the usual unit for slides,
- ``affine``: 4x4 voxel-to-world matrix for NIfTI (RAS+) and DICOM (LPS), else None; ``affine_space`` says which,
- ``levels``: the resolution pyramid (shape and downsample factor of every level) and ``level(k)`` to open one.

NOTE [ Reader handles and processes ]
A reader opens its file lazily, once per process: the handle is re-created after ``fork`` (DataLoader workers) and
is not pickled, so a reader can be handed to worker processes. Readers never hold pixel data beyond the read in
progress, except the small eager formats (PNG/JPEG).

>>> import numpy as np
>>> image = ArrayImage(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), spacing=(0.5, 0.5))
>>> image.shape, image.dtype, image.mpp
((2, 3, 4), dtype('uint8'), 500.0)
>>> image[1, ::-1, 1:3].tolist()
[[21, 22], [17, 18], [13, 14]]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, ShapeError
from ._indexing import Bounds, normalize_key, read_planned

__all__ = ["ArrayImage", "LazyImage", "Level"]


@dataclass(frozen=True)
class Level:
    """One level of a resolution pyramid.

    ``shape`` is (C, *spatial) of that level; ``downsample`` is level-0 size / this level's size per spatial axis.
    """

    shape: tuple[int, ...]
    downsample: tuple[float, ...]


def downsample_factors(base: Sequence[int], shape: Sequence[int]) -> tuple[float, ...]:
    """Level-0 size / this level's size per spatial axis (``Level.downsample``); inf for an empty axis."""
    return tuple(float(b) / float(s) if s else float("inf") for b, s in zip(base, shape))


class LazyImage:
    """Read-only (C, *spatial) image backed by a file or array; subclasses implement :meth:`_read`.

    Subclasses set ``_shape``, ``_dtype`` and, when known, ``_spacing`` (mm), ``_affine``, ``_levels`` and
    ``_level_index`` in ``__init__``, and implement ``_open()`` (per-process handle, see NOTE [ Reader handles and
    processes ]) and ``_read(bounds)``.
    """

    path: Path | None = None
    _shape: tuple[int, ...]
    _dtype: np.dtype
    _spacing: tuple[float, ...] | None = None
    _affine: np.ndarray | None = None
    _affine_space: str | None = None
    _levels: tuple[Level, ...] = ()
    _level_index: int = 0

    # ------------------------------------------------------------------ array protocol
    @property
    def shape(self) -> tuple[int, ...]:
        """(C, *spatial) of this level."""
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def size(self) -> int:
        return math.prod(self._shape)

    @property
    def nbytes(self) -> int:
        """Bytes the whole level would take in memory (it is never loaded unless you ask)."""
        return self.size * self._dtype.itemsize

    @property
    def channels(self) -> int:
        return self._shape[0]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self._shape[1:]

    def __len__(self) -> int:
        return self._shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        plan = normalize_key(key, self._shape)
        return read_planned(plan, self.read_bounds, self._dtype)

    def read(self) -> np.ndarray:
        """The whole level as a numpy array (only for images that fit in memory)."""
        return self[...]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.read()
        return out if dtype is None else out.astype(dtype, copy=False)

    # ------------------------------------------------------------------ metadata
    @property
    def spacing(self) -> tuple[float, ...] | None:
        """Millimetres per pixel/voxel along each spatial axis (axis order), or None when the file has none."""
        return self._spacing

    @property
    def mpp(self) -> float | None:
        """Microns per pixel in the image plane: mean spacing of the last two spatial axes in µm, or None."""
        if self._spacing is None:
            return None
        plane = self._spacing[-2:]
        return float(np.mean(plane)) * 1000.0

    @property
    def affine(self) -> np.ndarray | None:
        """4x4 matrix from (spatial) voxel indices to world coordinates, or None for formats without one."""
        return None if self._affine is None else self._affine.copy()

    @property
    def affine_space(self) -> str | None:
        """World frame of :attr:`affine`: ``"RAS"`` (NIfTI: +x right, +y anterior, +z superior) or ``"LPS"``
        (DICOM patient coordinates: +x left, +y posterior, +z superior)."""
        return self._affine_space if self._affine is not None else None

    @property
    def levels(self) -> tuple[Level, ...]:
        """The resolution pyramid, finest first; a single level for images without one."""
        if not self._levels:
            return (Level(self._shape, (1.0,) * (self.ndim - 1)),)
        return self._levels

    @property
    def level_index(self) -> int:
        """Which level of :attr:`levels` this reader reads."""
        return self._level_index

    def level(self, k: int) -> LazyImage:
        """A reader of pyramid level ``k`` (0 = full resolution) of the same file."""
        n = len(self.levels)
        if not -n <= k < n:
            raise DataError(
                f"{self.label} has {n} pyramid level(s) (0..{n - 1}); received level={k}. "
                f"Levels: {self.describe_levels()}"
            )
        k = k + n if k < 0 else k
        if k == self._level_index:
            return self
        return self._open_level(k)

    def _open_level(self, k: int) -> LazyImage:  # pragma: no cover - single-level readers never get here
        raise DataError(f"{self.label} has a single level")

    def describe_levels(self) -> str:
        """The pyramid as text for messages: each level's shape, downsample factor and pixel size where known."""
        spacing0 = None if self._spacing is None else self._level0_spacing()
        parts = []
        for i, lv in enumerate(self.levels):
            text = f"{i}: {lv.shape[1:]} (x{lv.downsample[-1]:g})"
            if spacing0 is not None:
                text += f" {np.mean(spacing0[-2:]) * 1000 * np.mean(lv.downsample[-2:]):.4g} mpp"
            parts.append(text)
        return ", ".join(parts)

    def _level0_spacing(self) -> tuple[float, ...] | None:
        if self._spacing is None:
            return None
        down = self.levels[self._level_index].downsample
        return tuple(s / d for s, d in zip(self._spacing, down))

    # ------------------------------------------------------------------ handles and lifecycle
    _state: Any = None
    _state_pid: int | None = None

    def _open(self) -> Any:
        """Open the per-process handle (file, proxy, zarr array). Default: nothing to open."""
        return None

    def _close_state(self, state: Any) -> None:
        """Release what :meth:`_open` returned."""

    @property
    def _handle(self) -> Any:
        pid = os.getpid()
        if self._state is None or self._state_pid != pid:
            self._state = self._open()
            self._state_pid = pid
        return self._state

    def close(self) -> None:
        """Release the file handle (reads after close reopen the file)."""
        if self._state is not None and self._state_pid == os.getpid():
            self._close_state(self._state)
        self._state = None
        self._state_pid = None

    def __enter__(self) -> LazyImage:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_state"] = None
        state["_state_pid"] = None
        return state

    def read_bounds(self, bounds: Bounds) -> np.ndarray:
        """The pixels of ``bounds`` (one normalised ``(start, stop, step)`` per axis), with the reader's own checks
        (a format turns its decoder's errors into a DataError here): what ``image[key]`` reads through, and what a
        view over another image (a crop, a flip) calls on the image it wraps. Subclasses implement :meth:`_read`."""
        return self._read(bounds)

    def _read(self, bounds: Bounds) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def label(self) -> str:
        """What messages call this image: its path, or its class name when it has none."""
        return str(self.path) if self.path is not None else type(self).__name__

    def __repr__(self) -> str:
        extra = ""
        if self._spacing is not None:
            extra += f", spacing={tuple(round(s, 6) for s in self._spacing)} mm"
        if len(self.levels) > 1:
            extra += f", level={self._level_index}/{len(self.levels)}"
        where = f"{self.path}, " if self.path is not None else ""
        return f"{type(self).__name__}({where}shape={self._shape}, dtype={self._dtype}{extra})"


class ArrayImage(LazyImage):
    """A (C, *spatial) view of any array with numpy-style slicing: numpy arrays and memmaps, zarr arrays,
    nibabel array proxies, or the zarr store of a TIFF level.

    ``axes`` maps image axes to the array's axes: ``axes[i]`` is the array axis holding image axis ``i``
    (``None`` for image axis 0 to add a channel axis of size 1); ``fixed`` pins extra array axes of size 1.
    With the defaults the array is taken as (C, *spatial) already.

    >>> import numpy as np
    >>> hwc = np.zeros((5, 7, 3), np.uint8)
    >>> ArrayImage(hwc, axes=(2, 0, 1)).shape
    (3, 5, 7)
    >>> ArrayImage(np.zeros((5, 7)), axes=(None, 0, 1)).shape
    (1, 5, 7)
    """

    def __init__(
        self,
        array: Any = None,
        *,
        axes: Sequence[int | None] | None = None,
        fixed: dict[int, int] | None = None,
        spacing: Sequence[float] | None = None,
        affine: np.ndarray | None = None,
        path: str | os.PathLike | None = None,
        native_shape: Sequence[int] | None = None,
        dtype: Any = None,
    ) -> None:
        self._array = array
        native = tuple(int(s) for s in (native_shape if native_shape is not None else array.shape))
        self._fixed = dict(fixed or {})
        self._native_ndim = len(native)
        if axes is None:
            axes = tuple(i for i in range(len(native)) if i not in self._fixed)
        self._axes = tuple(axes)
        used = [a for a in self._axes if a is not None] + list(self._fixed)
        if sorted(used) != list(range(len(native))):
            raise ShapeError(
                f"axes {self._axes} with fixed {self._fixed} must use each of the {len(native)} array axes once"
            )
        if any(a is None for a in self._axes[1:]):
            raise ShapeError("only the channel axis (image axis 0) can be added with None")
        if len(self._axes) < 2:
            raise ShapeError(
                f"an image needs a channel axis and at least one spatial axis; the array has shape {native}. "
                "Pass axes=(None, 0) (or channel_axis=None to open_image) to add a channel axis"
            )
        self._shape = tuple(1 if a is None else native[a] for a in self._axes)
        if 0 in self._shape:
            where = f"{os.fspath(path)} holds" if path is not None else "the array holds"
            raise ShapeError(
                f"{where} no pixels: its (C, *spatial) shape is {self._shape}; expected every size >= 1"
            )
        self._dtype = np.dtype(dtype if dtype is not None else array.dtype)
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != len(self._shape) - 1:
                raise ShapeError(
                    f"spacing needs one value per spatial axis ({len(self._shape) - 1}); received {spacing}"
                )
        self._spacing = spacing
        self._affine = None if affine is None else np.asarray(affine, dtype=np.float64)
        self.path = None if path is None else Path(path)

    def _native_array(self) -> Any:
        """The array to slice; file-backed subclasses return their per-process handle's array."""
        return self._array

    def _read(self, bounds: Bounds) -> np.ndarray:
        native_key: list[Any] = [slice(None)] * self._native_ndim
        for axis, index in self._fixed.items():
            native_key[axis] = index
        for (lo, hi, step), axis in zip(bounds, self._axes):
            if axis is not None:
                native_key[axis] = slice(lo, hi, step)
        native = self._native_array()
        out = np.asarray(native[tuple(native_key)])
        if isinstance(native, np.ndarray) or isinstance(out, np.memmap) or not out.flags.writeable:
            out = np.array(out)  # a view of the source or of a file mapping: hand out a fresh, writable array
        # Remaining array axes are in array order; put them in image order.
        kept = sorted(a for a in self._axes if a is not None)
        order = [kept.index(a) for a in self._axes if a is not None]
        out = out.transpose(order)
        if self._axes[0] is None:
            out = out[np.newaxis]
        return out
