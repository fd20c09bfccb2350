"""NIfTI volumes (nibabel): a lazy reader over nibabel's array proxy and a tile-by-tile writer.

Layout: nibabel's voxel order is kept, so a file of shape (X, Y, Z) reads as (1, X, Y, Z) and the affine maps
spatial indices (i, j, k) to world (RAS+, mm) exactly as in nibabel. A 4th axis is the channel axis (X, Y, Z, C);
5-D files (X, Y, Z, 1, C) take the 5th axis as channels.

Reading slices nibabel's proxy (``img.dataobj[...]``), which for an uncompressed ``.nii`` reads only the bytes of
the region; ``.nii.gz`` is decompressed up to the region on each read (gzip cannot seek), which is correct but slow
for regions far into a big file -- store large volumes uncompressed or as zarr. Scaled files (``scl_slope``) read
as floating point, as in nibabel.

>>> import numpy as np, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "vol.nii.gz"
>>> affine = np.diag([0.8, 0.8, 2.0, 1.0])
>>> vol = np.arange(2 * 6 * 5 * 4, dtype=np.int16).reshape(2, 6, 5, 4)
>>> with NiftiWriter(path, vol.shape, np.int16, affine=affine) as out:
...     out[:, :3] = vol[:, :3]
...     out[:, 3:] = vol[:, 3:]
>>> image = NiftiImage(path)
>>> image.shape, image.spacing
((2, 6, 5, 4), (0.8, 0.8, 2.0))
>>> bool((image[1, 2:4, ::2] == vol[1, 2:4, ::2]).all()) and np.allclose(image.affine, affine)
True
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, ShapeError
from ._deps import require
from ._indexing import Bounds
from ._rawfile import RawArrayFile
from .base import ArrayImage
from .writer import ImageWriter

__all__ = ["NiftiImage", "NiftiWriter"]

_MM_PER_UNIT = {"mm": 1.0, "micron": 1e-3, "meter": 1e3, "unknown": 1.0}
_HEADER_BYTES = 352  # 348-byte NIfTI-1 header + 4-byte extension flag; data starts here in a single .nii file


def _nibabel() -> Any:
    return require("nibabel", "io", "reading and writing NIfTI")


def _load(path: Path) -> Any:
    """nib.load, or for a single-file NIfTI with another suffix (nibabel goes by suffix) its file map directly."""
    nib = _nibabel()
    if path.name.lower().endswith((".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")):
        return nib.load(path, mmap=False)  # reads, not a mapping: NOTE [ No memory maps for big images ]
    with open(path, "rb") as f:
        head = f.read(348)
    cls = nib.Nifti2Image if head[4:8] == b"n+2\x00" else nib.Nifti1Image
    holder = nib.fileholders.FileHolder(str(path))
    return cls.from_file_map({"image": holder, "header": holder}, mmap=False)


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class NiftiImage(ArrayImage):
    """Lazy (C, X, Y[, Z]) reader of a NIfTI-1/2 file (``.nii``, ``.nii.gz``, ``.hdr/.img`` pairs)."""

    def __init__(self, path: str | os.PathLike) -> None:
        nib = _nibabel()
        self.path = Path(path)
        try:
            img = _load(self.path)
        except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError, zlib.error) as exc:
            raise DataError(f"{self.path} is not a readable NIfTI file: {exc}") from None
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image, nib.Nifti1Pair, nib.Nifti2Pair)):
            raise DataError(f"{self.path} is a {type(img).__name__}, not NIfTI; convert it to .nii")
        shape = tuple(int(s) for s in img.shape)
        n = len(shape)
        if n == 2 or n == 3:
            axes: tuple[int | None, ...] = (None, *range(n))
            fixed: dict[int, int] = {}
        elif n == 4:
            axes, fixed = (3, 0, 1, 2), {}
        elif n == 5 and shape[3] == 1:
            axes, fixed = (4, 0, 1, 2), {3: 0}
        else:
            raise DataError(
                f"{self.path} has shape {shape}; tilegrad reads NIfTI images (X, Y[, Z][, C]) or (X, Y, Z, 1, C)"
            )
        self._axes, self._fixed, self._native_ndim = axes, fixed, n
        self._shape = tuple(1 if a is None else shape[a] for a in axes)
        self._check_size(img)
        proxy = img.dataobj
        if getattr(proxy, "slope", 1.0) == 1.0 and getattr(proxy, "inter", 0.0) == 0.0:
            self._dtype = np.dtype(img.get_data_dtype()).newbyteorder("=")
        else:
            self._dtype = np.asarray(self._guard(lambda: proxy[(0,) * n])).dtype
        space_unit = img.header.get_xyzt_units()[0]
        zooms = img.header.get_zooms()[: len(self._shape) - 1]
        # Zooms are float32 in the header: take the shortest decimal that round-trips (0.8, not 0.800000011920929).
        unit = _MM_PER_UNIT.get(space_unit, 1.0)
        self._spacing = tuple(float(str(np.float32(z))) * unit for z in zooms)
        self._affine = np.asarray(img.affine, dtype=np.float64)
        self._affine_space = "RAS"
        self._array = None

    def _check_size(self, img: Any) -> None:
        """An uncompressed file shorter than header + data is truncated: say so now, not at some later read."""
        image_file = img.file_map["image"].filename
        if image_file is None or _is_gzip(Path(image_file)):
            return
        needed = int(img.dataobj.offset) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
        have = os.path.getsize(image_file)
        if have < needed:
            raise DataError(
                f"{image_file} is truncated: header and voxel data of shape {img.shape} "
                f"({img.get_data_dtype()}) need {needed} bytes, the file has {have}"
            )

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except (EOFError, OSError, zlib.error, ValueError) as exc:
            raise DataError(f"{self.path}: voxel data cannot be read ({type(exc).__name__}: {exc})") from exc

    def _open(self) -> Any:
        return _load(self.path).dataobj

    def _native_array(self) -> Any:
        return self._handle

    def read_bounds(self, bounds: Bounds) -> np.ndarray:
        return self._guard(lambda: self._read(bounds))


class NiftiWriter(ImageWriter):
    """Write a (C, X, Y[, Z]) volume tile by tile into ``.nii`` or ``.nii.gz``.

    ``affine``: 4x4 voxel-to-world matrix (use the source's ``image.affine``); without it, ``spacing`` (mm per
    spatial axis) gives a diagonal affine. C > 1 is stored as a 4th axis (X, Y, Z, C).

    Voxels go straight into ``<path>.partial`` (``.nii``) or a ``<path>.partial.nii`` scratch file (``.nii.gz``,
    gzip-compressed in a stream at close) with positional writes (NOTE [ No memory maps for big images ]). ``chunks`` sets the never-written check (default 32).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        dtype: Any = np.float32,
        *,
        affine: np.ndarray | None = None,
        spacing: Sequence[float] | None = None,
        chunks: Sequence[int] | None = None,
        overwrite: bool = False,
        keep_partial: bool = False,
        resume: bool = False,
    ) -> None:
        nib = _nibabel()
        name = Path(path).name
        if not (name.endswith(".nii") or name.endswith(".nii.gz")):
            raise ConfigError(f"NIfTI output must end in .nii or .nii.gz; received {name!r}")
        n_spatial = len(tuple(shape)) - 1
        if n_spatial not in (2, 3):
            raise ShapeError(
                f"NiftiWriter writes (C, X, Y) or (C, X, Y, Z) images; received shape {tuple(shape)}"
            )
        super().__init__(
            path,
            shape,
            dtype,
            chunks=chunks or (32,) * n_spatial,
            overwrite=overwrite,
            keep_partial=keep_partial,
            resume=resume,
        )
        self.compressed = name.endswith(".gz")
        self.dtype = self.dtype.newbyteorder("<") if self.dtype.itemsize > 1 else self.dtype
        if affine is None:
            diag = list(spacing) if spacing is not None else [1.0] * n_spatial
            if len(diag) != n_spatial:
                raise ShapeError(
                    f"spacing needs {n_spatial} values (one per spatial axis); received {spacing}"
                )
            affine = np.diag([*diag, *([1.0] * (4 - n_spatial))])
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ShapeError(f"affine must be a 4x4 matrix; received shape {affine.shape}")
        self.affine = affine
        c = self.shape[0]
        self._file_shape = (*self.shape[1:], c) if c > 1 else self.shape[1:]
        header = nib.Nifti1Header()
        try:
            header.set_data_dtype(self.dtype)
        except nib.spatialimages.HeaderDataError as exc:
            raise ConfigError(f"NIfTI cannot store dtype {self.dtype}: {exc}") from None
        header.set_data_shape(self._file_shape)
        header.set_qform(affine, code="scanner")
        header.set_sform(affine, code="scanner")
        header.set_xyzt_units(xyz="mm")
        header.set_data_offset(_HEADER_BYTES)
        self._scratch = (
            self.partial_path.with_name(self.partial_path.name + ".nii") if self.compressed else None
        )
        target = self._scratch or self.partial_path
        block = header.binaryblock + b"\x00" * (_HEADER_BYTES - len(header.binaryblock))
        if resume:  # the voxels written so far, under the same header (shape, dtype, affine)
            self._file: RawArrayFile | None = RawArrayFile.reopen(
                target, self._file_shape, self.dtype, offset=_HEADER_BYTES, order="F", header=block
            )
            return
        with open(target, "wb") as f:
            f.write(block)
        self._file = RawArrayFile.create(
            target, self._file_shape, self.dtype, offset=_HEADER_BYTES, order="F"
        )

    def _write(self, bounds: Bounds, value: np.ndarray) -> None:
        if self.shape[0] > 1:
            self._file.write((*bounds[1:], bounds[0]), np.moveaxis(value, 0, -1))
        else:
            self._file.write(bounds[1:], value[0])

    def _finalize(self) -> None:
        self._release()
        if self.compressed:
            with open(self._scratch, "rb") as src, gzip.open(self.partial_path, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst, length=16 * 2**20)

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
