"""One entry point for every format: :func:`open_image` (readers) and :func:`create_writer` (writers).

The format is recognised from the file's first bytes (TIFF, PNG, JPEG, DICOM, NIfTI, gzip, .npy) and, for
directories, from their content (zarr metadata, DICOM files); the suffix only decides between formats the bytes
cannot tell apart. Numpy arrays, memmaps, zarr arrays and tilegrad images pass through.

>>> import numpy as np
>>> image = open_image(np.zeros((3, 40, 60), np.uint8))
>>> image.shape
(3, 40, 60)
>>> open_image("/no/such/slide.svs")
Traceback (most recent call last):
...
tilegrad.errors.DataError: /no/such/slide.svs does not exist
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, ShapeError
from .arrays import NpyImage, ZarrImage, ZarrWriter
from .base import ArrayImage, LazyImage
from .dicom import DicomImage
from .nifti import NiftiImage, NiftiWriter
from .plain import PillowImage
from .slide import OpenSlideImage
from .tiff import TiffImage, TiffWriter
from .writer import ImageWriter, NpyWriter

__all__ = ["create_writer", "open_image", "select_level"]

BACKENDS = ("tiff", "openslide", "nifti", "dicom", "pillow", "zarr", "npy")

# OpenSlide formats that are not TIFF files (index file plus data directory, or vendor containers).
_OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")


def _magic(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(352)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if (
        head[:8] == b"\x89PNG\r\n\x1a\n"
        or head[:3] == b"\xff\xd8\xff"
        or head[:2] == b"BM"
        or head[:4] == b"GIF8"
    ):
        return "pillow"
    if head[128:132] == b"DICM":
        return "dicom"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    return None


def _detect(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        if any((path / marker).exists() for marker in ("zarr.json", ".zarray", ".zgroup")):
            return "zarr"
        return "dicom"  # DicomImage explains when the directory holds no DICOM files
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes)")
    if name.endswith(_OPENSLIDE_SUFFIXES):
        return "openslide"
    kind = _magic(path)
    if kind == "gzip":
        if name.endswith(".nii.gz"):
            return "nifti"
        raise DataError(f"{path} is gzip-compressed but not a .nii.gz volume; decompress it first")
    if kind is None and name.endswith((".hdr", ".img")):
        return "nifti"  # Analyze-style pair: nibabel decides
    if kind is None:
        raise DataError(
            f"{path} is not an image format tilegrad reads (first bytes {path.read_bytes()[:8]!r}). Supported: "
            "TIFF/OME-TIFF, OpenSlide formats, NIfTI (.nii, .nii.gz), DICOM, PNG/JPEG, zarr, .npy"
        )
    return kind


def select_level(image: LazyImage, mpp: float, *, tolerance: float = 0.1) -> int:
    """Index of the pyramid level whose microns per pixel is within ``tolerance`` (relative) of ``mpp``.

    No resampling happens: if no level is close enough, a DataError lists the levels that exist.
    """
    if not mpp > 0:
        raise ConfigError(f"mpp must be a positive number of microns per pixel; received {mpp}")
    if image.mpp is None:
        raise DataError(
            f"{image.label} has no pixel size metadata, so mpp={mpp} cannot choose a level; pass level=... "
            f"instead (levels: {image.describe_levels()})"
        )
    mpps = [
        image.level(k).mpp for k in range(len(image.levels))
    ]  # each level's own metadata where it has one
    errors = [abs(m - mpp) / mpp for m in mpps]
    best = int(np.argmin(errors))
    if errors[best] > tolerance:
        listing = ", ".join(f"level {i}: {m:.4g}" for i, m in enumerate(mpps))
        raise DataError(
            f"{image.label} has no level within {tolerance:.0%} of {mpp} µm/pixel ({listing}). Choose one of "
            "these mpp values or a level, or resample the image"
        )
    return best


def open_image(
    source: Any,
    level: int | None = None,
    mpp: float | None = None,
    *,
    backend: str | None = None,
) -> LazyImage:
    """Open ``source`` as a lazy (C, *spatial) image.

    ``source``: a path (file or directory), a tilegrad image, or an array with numpy slicing (numpy array or
    memmap, zarr array) already in (C, *spatial) layout. ``level``: pyramid level (0 = full resolution);
    ``mpp``: choose the level with this many microns per pixel (see :func:`select_level`). ``backend``: force one
    of ``tiff, openslide, nifti, dicom, pillow, zarr, npy`` instead of detecting the format.

    Raises :class:`tilegrad.errors.DataError` for missing, unsupported, truncated or corrupt files (naming the
    file and what is wrong), :class:`tilegrad.errors.ConfigError` for option mistakes (an unknown ``backend``,
    ``level`` with ``mpp``) and :class:`tilegrad.errors.MissingDependencyError` naming the extra to install.
    """
    if level is not None and mpp is not None:
        raise ConfigError(f"pass either level ({level}) or mpp ({mpp}), not both")
    image = _open(source, backend)
    if mpp is not None:
        level = select_level(image, mpp)
    if level is not None:
        image = image.level(level)
    return image


def _open(source: Any, backend: str | None) -> LazyImage:
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}; received {backend!r}")
    if isinstance(source, LazyImage):
        return source
    if not isinstance(source, (str, os.PathLike)):
        if hasattr(source, "shape") and hasattr(source, "__getitem__") and hasattr(source, "dtype"):
            return ArrayImage(source)
        raise DataError(
            f"open_image takes a path, a tilegrad image or an array with .shape/.dtype and slicing; received "
            f"{type(source).__name__}"
        )
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    kind = backend or _detect(path)
    if kind == "tiff":
        return TiffImage(path)
    if kind == "openslide":
        return OpenSlideImage(path)
    if kind == "nifti":
        return NiftiImage(path)
    if kind == "dicom":
        return DicomImage(path)
    if kind == "pillow":
        return PillowImage(path)
    if kind == "zarr":
        return ZarrImage(path)
    return NpyImage(path)


def _scaled_metadata(like: LazyImage, shape: Sequence[int]) -> dict[str, Any]:
    """Spacing / affine / mpp of ``like`` adjusted to an output of spatial ``shape`` covering the same extent."""
    if len(shape) - 1 != like.ndim - 1:
        raise ShapeError(
            f"like= has {like.ndim - 1} spatial axes {like.spatial_shape}; the output shape {tuple(shape)} has "
            f"{len(shape) - 1}"
        )
    scale = np.array(like.spatial_shape, dtype=np.float64) / np.array(shape[1:], dtype=np.float64)
    meta: dict[str, Any] = {}
    if like.spacing is not None:
        meta["spacing"] = tuple(float(s) for s in np.array(like.spacing) * scale)
    if like.affine is not None:
        # Output voxel i covers input voxels [i*s, (i+1)*s): its centre is input voxel (i + 0.5) * s - 0.5.
        source = like.affine
        n = len(scale)
        affine = source.copy()
        affine[:3, :n] = source[:3, :n] * scale
        affine[:3, 3] = source[:3, 3] + source[:3, :n] @ (0.5 * scale - 0.5)
        meta["affine"] = affine
        meta["affine_space"] = like.affine_space
    return meta


def create_writer(
    path: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any = np.float32,
    *,
    like: LazyImage | None = None,
    **options: Any,
) -> ImageWriter:
    """A writer chosen by the suffix of ``path``: ``.tif/.tiff`` (pyramidal TIFF), ``.nii/.nii.gz``, ``.zarr``,
    ``.npy``. ``like``: copy pixel size (and affine) from a source image, scaled if the output's spatial size
    differs (e.g. a 2x super-resolution output gets half the spacing); a DICOM (LPS) affine becomes RAS+ in NIfTI.
    Other ``options`` go to the writer.
    """
    name = Path(path).name.lower()
    meta = _scaled_metadata(like, shape) if like is not None else {}
    if name.endswith((".tif", ".tiff")):
        if "spacing" in meta and "mpp" not in options:
            options["mpp"] = float(np.mean(meta["spacing"][-2:])) * 1000.0
        return TiffWriter(path, shape, dtype, **options)
    if name.endswith((".nii", ".nii.gz")):
        if "affine" in meta:
            affine = meta["affine"]
            if meta["affine_space"] == "LPS":  # DICOM patient axes -> NIfTI's RAS+: negate x and y
                affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
            options.setdefault("affine", affine)
        elif "spacing" in meta:
            options.setdefault("spacing", meta["spacing"])
        return NiftiWriter(path, shape, dtype, **options)
    if name.endswith(".zarr"):
        for key in ("spacing", "affine", "affine_space"):
            if key in meta:
                options.setdefault(key, meta[key])
        return ZarrWriter(path, shape, dtype, **options)
    if name.endswith(".npy"):
        return NpyWriter(path, shape, dtype, **options)
    raise ConfigError(
        f"cannot tell the output format of {path}: use a .tif, .tiff, .nii, .nii.gz, .zarr or .npy name"
    )
