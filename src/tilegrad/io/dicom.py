"""DICOM (pydicom): a series of single-frame files in a directory, one multi-frame file, or one 2D image.

Series are read as (C, Z, Y, X): slices sorted along the slice normal (the cross product of the row and column
direction cosines in ImageOrientationPatient) by ImagePositionPatient, rows, columns. Only headers are read at open;
pixel data is decoded per slice (per frame for multi-frame files) when a region needs it, and the most recently
decoded slices (up to 32 MiB) are kept for the next tiles.

Metadata: ``spacing`` = (slice spacing from the sorted positions, PixelSpacing row, PixelSpacing column) in mm;
``affine`` maps (k, row, column) indices to patient coordinates (LPS, mm). RescaleSlope/Intercept are applied, and
then the image reads as float32. A series with duplicate positions, mixed orientations or non-uniform slice gaps
(missing files) is refused with a DataError, as is a directory holding several series (pass ``series_uid``).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ._deps import require
from ._indexing import Bounds
from .base import LazyImage

__all__ = ["DicomImage"]

_CACHE_BYTES = 32 * 2**20  # decoded slices kept per reader (per process)


def _pydicom() -> Any:
    return require("pydicom", "io", "reading DICOM")


@dataclass(frozen=True)
class _Slice:
    path: Path
    frame: int | None  # frame index in a multi-frame file, None for single-frame files
    position: np.ndarray | None
    slope: float
    intercept: float


def _floats(value: Any) -> list[float] | None:
    return None if value is None else [float(v) for v in value]


def _get(ds: Any, *path: str) -> Any:
    """Attribute path through the first item of sequences: _get(ds, 'SharedFunctionalGroupsSequence', ...)."""
    node = ds
    for name in path:
        node = getattr(node, name, None)
        if node is None:
            return None
        if name.endswith("Sequence"):
            if len(node) == 0:
                return None
            node = node[0]
    return node


def _int(ds: Any, name: str, where: Path, default: int | None = None) -> int:
    """An integer header element; a truncated header leaves an empty value, which is reported as such."""
    value = getattr(ds, name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(
            f"{where}: header element {name} holds {value!r}, not a number: the file is truncated or corrupt. "
            "Re-copy or re-export it"
        ) from None


def _pixel_dtype(ds: Any, where: Path) -> np.dtype:
    bits = _int(ds, "BitsAllocated", where, 0)
    signed = _int(ds, "PixelRepresentation", where, 0) == 1
    if bits not in (8, 16, 32):
        raise DataError(f"{where}: BitsAllocated {bits} is not supported (expected 8, 16 or 32)")
    return np.dtype(f"{'i' if signed else 'u'}{bits // 8}")


class DicomImage(LazyImage):
    """Lazy reader of a DICOM series directory, a multi-frame file or a single 2D DICOM image."""

    def __init__(self, path: str | os.PathLike, *, series_uid: str | None = None) -> None:
        pydicom = _pydicom()
        self.path = Path(path)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_pid: int | None = None
        if self.path.is_dir():
            headers = self._scan_directory(pydicom, series_uid)
        else:
            headers = [(self.path, self._read_header(pydicom, self.path))]
        first = headers[0][1]
        frames = _int(first, "NumberOfFrames", headers[0][0], 1) if getattr(first, "NumberOfFrames", 1) else 1
        if len(headers) == 1 and frames > 1:
            slices, spacing_z, normal = self._multiframe(first, frames)
        elif len(headers) == 1:
            slices, spacing_z, normal = [self._single(headers[0][0], first)], None, None
        else:
            slices, spacing_z, normal = self._series(headers)
        self._slices = slices
        where = headers[0][0]
        self._rows, self._cols = _int(first, "Rows", where), _int(first, "Columns", where)
        samples = _int(first, "SamplesPerPixel", where, 1)
        self._volume = spacing_z is not None or len(slices) > 1
        spatial = (len(slices), self._rows, self._cols) if self._volume else (self._rows, self._cols)
        self._shape = (samples, *spatial)
        rescaled = any(s.slope != 1.0 or s.intercept != 0.0 for s in slices)
        self._dtype = np.dtype(np.float32) if rescaled else _pixel_dtype(first, self.path)
        pixel = _floats(
            _get(first, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence", "PixelSpacing")
        )
        pixel = pixel or _floats(getattr(first, "PixelSpacing", None))
        if pixel is None:
            self._spacing = None
        elif self._volume:
            self._spacing = (spacing_z, pixel[0], pixel[1]) if spacing_z is not None else None
        else:
            self._spacing = (pixel[0], pixel[1])
        self._affine = self._make_affine(first, pixel, normal)
        self._affine_space = "LPS"

    # ------------------------------------------------------------------ headers
    def _read_header(self, pydicom: Any, path: Path) -> Any:
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise DataError(f"{path} is not a readable DICOM file: {exc}") from None

    def _scan_directory(self, pydicom: Any, series_uid: str | None) -> list[tuple[Path, Any]]:
        by_series: dict[str, list[tuple[Path, Any]]] = {}
        for p in sorted(self.path.iterdir()):
            if not p.is_file():
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except pydicom.errors.InvalidDicomError:
                continue  # DICOMDIR companions, notes, thumbnails: not part of a series
            except (OSError, EOFError, ValueError) as exc:
                raise DataError(f"{p} (in DICOM series {self.path}) cannot be read: {exc}") from None
            if "PixelData" not in ds and not hasattr(ds, "Rows"):
                continue
            by_series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((p, ds))
        if not by_series:
            raise DataError(f"{self.path} contains no DICOM image files")
        if series_uid is not None:
            if series_uid not in by_series:
                raise DataError(f"{self.path} has no series {series_uid!r}; it has {sorted(by_series)}")
            return by_series[series_uid]
        if len(by_series) > 1:
            listing = "; ".join(
                f"{uid} ({len(v)} files, {getattr(v[0][1], 'SeriesDescription', '')!s})"
                for uid, v in by_series.items()
            )
            raise DataError(
                f"{self.path} holds {len(by_series)} DICOM series: {listing}. Pass series_uid=..."
            )
        return next(iter(by_series.values()))

    @staticmethod
    def _rescale(ds: Any) -> tuple[float, float]:
        slope = getattr(ds, "RescaleSlope", None)
        intercept = getattr(ds, "RescaleIntercept", None)
        if slope is None:
            slope = _get(ds, "PixelValueTransformationSequence", "RescaleSlope")
            intercept = _get(ds, "PixelValueTransformationSequence", "RescaleIntercept")
        return float(1.0 if slope is None else slope), float(0.0 if intercept is None else intercept)

    def _single(self, path: Path, ds: Any) -> _Slice:
        return _Slice(path, None, None, *self._rescale(ds))

    def _orientation(self, ds: Any) -> np.ndarray | None:
        iop = _floats(getattr(ds, "ImageOrientationPatient", None))
        iop = iop or _floats(
            _get(ds, "SharedFunctionalGroupsSequence", "PlaneOrientationSequence", "ImageOrientationPatient")
        )
        return None if iop is None else np.asarray(iop, dtype=np.float64)

    def _series(
        self, headers: list[tuple[Path, Any]]
    ) -> tuple[list[_Slice], float | None, np.ndarray | None]:
        first = headers[0][1]
        for p, ds in headers:
            if (int(ds.Rows), int(ds.Columns)) != (int(first.Rows), int(first.Columns)):
                raise DataError(
                    f"{p}: slice of {ds.Rows}x{ds.Columns} pixels in a series of {first.Rows}x{first.Columns} "
                    f"({self.path})"
                )
        orientation = self._orientation(first)
        positions = [_floats(getattr(ds, "ImagePositionPatient", None)) for _, ds in headers]
        if orientation is None or any(pos is None for pos in positions):
            raise DataError(
                f"{self.path}: slices lack ImageOrientationPatient/ImagePositionPatient, so their order and spacing "
                "are unknown"
            )
        for p, ds in headers:
            if not np.allclose(self._orientation(ds), orientation, atol=1e-4):
                raise DataError(f"{p}: ImageOrientationPatient differs from the rest of series {self.path}")
        normal = np.cross(orientation[:3], orientation[3:])
        slices = [
            _Slice(p, None, np.asarray(pos), *self._rescale(ds)) for (p, ds), pos in zip(headers, positions)
        ]
        return self._sorted(slices, normal)

    def _multiframe(self, ds: Any, frames: int) -> tuple[list[_Slice], float | None, np.ndarray | None]:
        per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
        shared_scale = self._rescale(_get(ds, "SharedFunctionalGroupsSequence") or ds)
        slices = []
        for k in range(frames):
            item = per_frame[k] if per_frame is not None and len(per_frame) == frames else None
            pos = (
                _floats(_get(item, "PlanePositionSequence", "ImagePositionPatient"))
                if item is not None
                else None
            )
            scale = (
                self._rescale(item)
                if item is not None and "PixelValueTransformationSequence" in item
                else None
            )
            slices.append(
                _Slice(self.path, k, None if pos is None else np.asarray(pos), *(scale or shared_scale))
            )
        orientation = self._orientation(ds)
        if orientation is not None and all(s.position is not None for s in slices):
            return self._sorted(slices, np.cross(orientation[:3], orientation[3:]))
        between = getattr(ds, "SpacingBetweenSlices", None) or _get(
            ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence", "SpacingBetweenSlices"
        )
        return slices, (None if between is None else float(between)), None

    def _sorted(self, slices: list[_Slice], normal: np.ndarray) -> tuple[list[_Slice], float, np.ndarray]:
        along = np.array([float(s.position @ normal) for s in slices])
        order = np.argsort(along, kind="stable")
        slices = [slices[i] for i in order]
        along = along[order]
        gaps = np.diff(along)
        if gaps.size == 0:
            return slices, None, normal
        if np.any(gaps < 1e-4):
            i = int(np.argmax(gaps < 1e-4))
            raise DataError(
                f"{self.path}: {slices[i].path.name} and {slices[i + 1].path.name} are at the same position "
                f"({along[i]:.4f} mm along the slice normal): several acquisitions in one series?"
            )
        spacing = float(np.median(gaps))
        bad = np.abs(gaps - spacing) > 0.01 * spacing + 1e-3
        if np.any(bad):
            i = int(np.argmax(bad))
            raise DataError(
                f"{self.path}: non-uniform slice spacing, {gaps[i]:.4f} mm between {slices[i].path.name} and "
                f"{slices[i + 1].path.name} where the series has {spacing:.4f} mm: are slices missing?"
            )
        return slices, spacing, normal

    def _make_affine(
        self, ds: Any, pixel: Sequence[float] | None, normal: np.ndarray | None
    ) -> np.ndarray | None:
        orientation = self._orientation(ds)
        first = self._slices[0]
        origin = first.position
        if origin is None:
            origin_list = _floats(getattr(ds, "ImagePositionPatient", None))
            origin = None if origin_list is None else np.asarray(origin_list)
        if orientation is None or pixel is None or origin is None:
            return None
        row_dir, col_dir = orientation[:3], orientation[3:]
        affine = np.eye(4)
        column_axis = row_dir * pixel[1]  # moving along a row = increasing column index
        row_axis = col_dir * pixel[0]
        if self._volume:
            if normal is None or self._spacing is None:
                return None
            last = self._slices[-1].position
            step = (
                (last - origin) / (len(self._slices) - 1) if last is not None else normal * self._spacing[0]
            )
            affine[:3, :3] = np.stack([step, row_axis, column_axis], axis=1)
        else:
            affine[:3, :3] = np.stack([row_axis, column_axis, np.cross(row_dir, col_dir)], axis=1)
        affine[:3, 3] = origin
        return affine

    # ------------------------------------------------------------------ pixels
    def _decode(self, s: _Slice) -> np.ndarray:
        pydicom = _pydicom()
        try:
            if s.frame is None:
                array = pydicom.pixels.pixel_array(s.path)
            else:
                array = pydicom.pixels.pixel_array(s.path, index=s.frame)
        except (ValueError, RuntimeError, NotImplementedError, OSError, EOFError, AttributeError) as exc:
            raise DataError(f"{s.path}: {self._why_undecodable(s, exc)}") from exc
        if array.ndim == 2:
            array = array[..., np.newaxis]
        if array.shape[:2] != (self._rows, self._cols):
            raise DataError(
                f"{s.path}: pixel data of shape {array.shape} where the header says {self._rows}x{self._cols}"
            )
        if self._dtype == np.float32:
            array = array.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)
        return array

    def _why_undecodable(self, s: _Slice, exc: BaseException) -> str:
        """Tell a truncated file from a compressed one that needs a decoder plugin."""
        pydicom = _pydicom()
        cause = f"{type(exc).__name__}: {exc}"
        try:
            ds = pydicom.dcmread(s.path)
            syntax = ds.file_meta.TransferSyntaxUID
            have = len(ds.PixelData) if "PixelData" in ds else 0
        except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, AttributeError):
            return f"pixel data cannot be read ({cause}): the file is truncated or corrupt. Re-copy or re-export it"
        if syntax.is_compressed:
            return (
                f"pixel data in the compressed transfer syntax {syntax.name} cannot be decoded ({cause}). Install "
                "a pydicom decoder plugin (pylibjpeg, gdcm), or the file is corrupt"
            )
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1))
        need = frames * self._rows * self._cols * samples * int(getattr(ds, "BitsAllocated", 8)) // 8
        if have < need:
            return (
                f"the file is truncated: its pixel data has {have} bytes, but {frames} frame(s) of {self._rows}x{self._cols}x"
                f"{samples} at {ds.BitsAllocated} bits need {need}. Re-copy or re-export the file"
            )
        return f"pixel data cannot be decoded ({cause})"

    def _decoded(self, k: int) -> np.ndarray:
        """Slice k, decoded; the most recent slices (up to _CACHE_BYTES) are kept, because tile-by-tile reads of a
        volume visit the same slices once per in-plane tile and a slice can only be decoded whole."""
        pid = os.getpid()
        if self._cache_pid != pid:
            self._cache, self._cache_pid = OrderedDict(), pid
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        plane = self._decode(self._slices[k])
        self._cache[k] = plane
        while sum(p.nbytes for p in self._cache.values()) > _CACHE_BYTES and len(self._cache) > 1:
            self._cache.popitem(last=False)
        return plane

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_cache": OrderedDict(), "_cache_pid": None}

    def _read(self, bounds: Bounds) -> np.ndarray:
        (c0, c1, cs), *spatial = bounds
        if self._volume:
            (z0, z1, zs), (y0, y1, ys), (x0, x1, xs) = spatial
            picked = range(z0, z1, zs)
        else:
            (y0, y1, ys), (x0, x1, xs) = spatial
            picked = range(1)
        planes = [self._decoded(k)[y0:y1:ys, x0:x1:xs, c0:c1:cs] for k in picked]
        out = np.stack(planes, axis=0).astype(self._dtype, copy=False)  # (Z, Y, X, C)
        out = np.moveaxis(out, -1, 0)
        return out if self._volume else out[:, 0]
