"""Arrays as images: zarr stores (plain arrays and OME-Zarr multiscales), ``.npy`` files, and a zarr writer.

A zarr array or ``.npy`` file is read as (C, *spatial) as stored. tilegrad's :class:`ZarrWriter` records the pixel
size and affine in the array's attributes (``attrs["tilegrad"]``) and :class:`ZarrImage` reads them back. OME-Zarr
(NGFF 0.4/0.5) groups are read with their ``multiscales`` levels, axes and scales.

>>> import numpy as np, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "mask.zarr"
>>> with ZarrWriter(path, (1, 100, 80), np.uint8, spacing=(0.5e-3, 0.5e-3), chunks=(1, 32, 32)) as out:
...     for y in range(0, 100, 50):
...         out[:, y : y + 50] = y
>>> image = ZarrImage(path)
>>> image.shape, image.mpp, int(image[0, 60, 0])
((1, 100, 80), 0.5, 50)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, ShapeError
from ._deps import require
from ._indexing import Bounds
from ._rawfile import RawArrayFile
from .base import ArrayImage, Level, downsample_factors
from .writer import ImageWriter

__all__ = ["NpyImage", "ZarrImage", "ZarrWriter"]

_MM_PER_UNIT = {
    "nanometer": 1e-6, "micrometer": 1e-3, "millimeter": 1.0, "centimeter": 10.0, "meter": 1e3, None: None,
}  # fmt: skip


def _zarr() -> Any:
    return require("zarr", "io", "reading and writing zarr")


def _multiscales(attrs: Any) -> list[Any] | None:
    if "ome" in attrs and "multiscales" in attrs["ome"]:  # NGFF 0.5
        return attrs["ome"]["multiscales"]
    return attrs.get("multiscales")  # NGFF 0.4


class ZarrImage(ArrayImage):
    """Lazy reader of a zarr array (taken as (C, *spatial)) or an OME-Zarr multiscales group (``level``)."""

    def __init__(self, path: str | os.PathLike, level: int = 0) -> None:
        zarr = _zarr()
        self.path = Path(path)
        try:
            node = zarr.open(str(self.path), mode="r")
        except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
            raise DataError(f"{self.path} is not a readable zarr store: {exc}") from None
        self._level_path: str | None = None
        if isinstance(node, zarr.Array):
            if level != 0:
                raise DataError(f"{self.path} is a single zarr array (one level); received level={level}")
            self._init_array(node)
        else:
            self._init_multiscales(node, level)
        self._array = None

    def _init_array(self, array: Any) -> None:
        if array.ndim < 2:
            raise ShapeError(f"{self.path} holds a {array.ndim}-d array; images are (C, *spatial)")
        self._axes, self._fixed, self._native_ndim = tuple(range(array.ndim)), {}, array.ndim
        self._shape = tuple(int(s) for s in array.shape)
        self._dtype = np.dtype(array.dtype)
        meta = dict(array.attrs).get("tilegrad", {})
        spacing = meta.get("spacing_mm")
        self._spacing = None if spacing is None else tuple(float(s) for s in spacing)
        affine = meta.get("affine")
        self._affine = None if affine is None else np.asarray(affine, dtype=np.float64)
        self._affine_space = meta.get("affine_space")

    def _init_multiscales(self, group: Any, level: int) -> None:
        ms = _multiscales(dict(group.attrs))
        if not ms:
            raise DataError(
                f"{self.path} is a zarr group without OME-Zarr 'multiscales' metadata; open one of its arrays: "
                f"{sorted(group.array_keys())}"
            )
        ms = ms[0]
        datasets = ms["datasets"]
        if not 0 <= level < len(datasets):
            raise DataError(
                f"{self.path} has {len(datasets)} pyramid level(s) (0..{len(datasets) - 1}); got {level}"
            )
        axes = ms.get("axes") or [{"name": n, "type": "space"} for n in "zyx"]
        axes = [
            a if isinstance(a, dict) else {"name": a, "type": "channel" if a == "c" else "space"}
            for a in axes
        ]
        channel = [i for i, a in enumerate(axes) if a.get("type") == "channel"]
        spatial = [i for i, a in enumerate(axes) if a.get("type") == "space"]
        arrays = [group[d["path"]] for d in datasets]
        other = [i for i in range(len(axes)) if i not in channel and i not in spatial]
        for i in other:
            if arrays[level].shape[i] != 1:
                raise DataError(
                    f"{self.path}: axis {axes[i]['name']!r} has {arrays[level].shape[i]} entries; tilegrad reads one "
                    "(C, *spatial) image"
                )
        self._axes = (channel[0] if channel else None, *spatial)
        self._fixed = dict.fromkeys(other, 0)
        self._native_ndim = len(axes)
        shapes = [tuple(1 if a is None else int(arr.shape[a]) for a in self._axes) for arr in arrays]
        self._levels = tuple(Level(sh, downsample_factors(shapes[0][1:], sh[1:])) for sh in shapes)
        self._level_index = level
        self._shape = shapes[level]
        self._dtype = np.dtype(arrays[level].dtype)
        self._level_path = datasets[level]["path"]
        scale = next(
            (
                t["scale"]
                for t in datasets[level].get("coordinateTransformations", [])
                if t["type"] == "scale"
            ),
            None,
        )
        units = [_MM_PER_UNIT.get(axes[i].get("unit")) for i in spatial]
        if scale is not None and all(u is not None for u in units):
            self._spacing = tuple(float(scale[i]) * u for i, u in zip(spatial, units))
        else:
            self._spacing = None
        self._affine = None

    def _open(self) -> Any:
        node = _zarr().open(str(self.path), mode="r")
        return node if self._level_path is None else node[self._level_path]

    def _native_array(self) -> Any:
        return self._handle

    def read_bounds(self, bounds: Bounds) -> np.ndarray:
        try:
            return self._read(bounds)
        except (ValueError, RuntimeError, OSError) as exc:  # codec errors (numcodecs, zstd) are RuntimeErrors
            region = ", ".join(f"{lo}:{hi}" for lo, hi, _ in bounds)
            raise DataError(
                f"{self.path}: cannot decode the zarr chunks of region [{region}] ({type(exc).__name__}: {exc}). "
                "The store is corrupt or truncated: re-copy or re-export it"
            ) from exc

    def _open_level(self, k: int) -> ZarrImage:
        return ZarrImage(self.path, level=k)


class NpyImage(ArrayImage):
    """A ``.npy`` file taken as (C, *spatial), read region by region with positional reads (not a memory map:
    NOTE [ No memory maps for big images ])."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        fmt = np.lib.format
        try:
            with open(self.path, "rb") as f:
                version = fmt.read_magic(f)
                read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                shape, fortran, dtype = read_header(f)
                offset = f.tell()
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{self.path} is not a readable .npy file: {exc}") from None
        if dtype.hasobject:
            raise DataError(f"{self.path} holds Python objects ({dtype}), not pixels")
        needed = offset + int(np.prod(shape)) * dtype.itemsize
        if os.path.getsize(self.path) < needed:
            raise DataError(
                f"{self.path} is truncated: an array of shape {shape} ({dtype}) needs {needed} bytes, the file has "
                f"{os.path.getsize(self.path)}"
            )
        self._file = RawArrayFile(self.path, shape, dtype, offset=offset, order="F" if fortran else "C")
        super().__init__(None, native_shape=shape, dtype=dtype, path=self.path)

    def _read(self, bounds: Bounds) -> np.ndarray:
        return self._file.read(bounds)

    def close(self) -> None:
        self._file.close()


class ZarrWriter(ImageWriter):
    """Write a (C, *spatial) zarr array tile by tile, built in ``<path>.partial`` and renamed on close.

    ``chunks``: zarr chunk shape (default: all channels x 64 per axis in 3D, x 512 in 2D). ``spacing`` (mm per
    spatial axis), ``affine`` and its ``affine_space`` ("RAS"/"LPS") are stored in ``attrs["tilegrad"]``. Tiles aligned with chunks write fastest.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        dtype: Any = np.float32,
        *,
        chunks: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        affine: np.ndarray | None = None,
        affine_space: str | None = None,
        overwrite: bool = False,
        keep_partial: bool = False,
        resume: bool = False,
    ) -> None:
        zarr = _zarr()
        shape = tuple(int(s) for s in shape)
        if chunks is None:
            edge = 64 if len(shape) > 3 else 512
            chunks = (shape[0], *(min(edge, s) for s in shape[1:]))
        chunks = tuple(int(c) for c in chunks)
        if len(chunks) != len(shape) or any(c < 1 for c in chunks):
            raise ConfigError(f"chunks must give a positive size per axis of {shape}; received {chunks}")
        super().__init__(
            path, shape, dtype, chunks=chunks, overwrite=overwrite, keep_partial=keep_partial, resume=resume
        )
        if resume:  # the chunks written so far
            self._array = self._reopen(zarr, chunks)
        else:
            self._array = zarr.open_array(
                store=str(self.partial_path),
                mode="w",
                shape=self.shape,
                chunks=chunks,
                dtype=self.dtype,
                fill_value=0,
            )
        meta: dict[str, Any] = {}
        if spacing is not None:
            if len(spacing) != len(shape) - 1:
                raise ShapeError(f"spacing needs {len(shape) - 1} values; received {spacing}")
            meta["spacing_mm"] = [float(s) for s in spacing]
        if affine is not None:
            meta["affine"] = np.asarray(affine, dtype=float).tolist()
            if affine_space is not None:
                meta["affine_space"] = affine_space
        if meta:
            self._array.attrs.update({"tilegrad": meta})

    def _reopen(self, zarr: Any, chunks: tuple[int, ...]) -> Any:
        try:
            array = zarr.open_array(store=str(self.partial_path), mode="r+")
        except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
            raise DataError(
                f"cannot resume {self.partial_path}: it is not a readable zarr array ({exc})"
            ) from None
        found = (tuple(array.shape), np.dtype(array.dtype), tuple(array.chunks))
        if found != (self.shape, self.dtype, chunks):
            raise DataError(
                f"cannot resume {self.partial_path}: it holds shape {found[0]}, {found[1]}, chunks {found[2]}; this "
                f"writer writes {self.shape}, {self.dtype}, chunks {chunks}. Start over (overwrite=True)"
            )
        return array

    def _write(self, bounds: Any, value: np.ndarray) -> None:
        self._array[tuple(slice(*b) for b in bounds)] = value

    def _finalize(self) -> None:
        pass

    def _release(self) -> None:
        self._array = None
