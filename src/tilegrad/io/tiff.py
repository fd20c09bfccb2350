"""Tiled / pyramidal TIFF and OME-TIFF: a lazy reader (tifffile + zarr) and a pyramid writer.

Reading goes through tifffile's zarr store of one pyramid level, so ``image[:, y0:y1, x0:x1]`` decodes only the
tiles the region touches. Pixel size comes from OME-XML (``PhysicalSizeX/Y/Z`` with units), Aperio's ``MPP =``,
ImageJ's ``unit=micron`` or the baseline ``X/YResolution`` tags in inch or centimetre units.

The writer (:class:`TiffWriter`) produces a tiled pyramid that tifffile, OpenSlide ("generic tiled TIFF") and most
viewers read: level 0 first, then each reduced level (the 2^k x 2^k box mean of level 0) as its own top-level directory
(``SubFileType = 1``), pixel size in ``X/YResolution`` (centimetre units).

>>> import numpy as np, tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "slide.tif"
>>> rgb = np.random.default_rng(0).integers(0, 256, (3, 300, 500), dtype=np.uint8)
>>> with TiffWriter(path, rgb.shape, np.uint8, tile=128, mpp=0.5) as out:
...     out[:, :, :256] = rgb[:, :, :256]        # tiles in any order, any size
...     out[:, :, 256:] = rgb[:, :, 256:]
>>> image = TiffImage(path)
>>> image.shape, image.mpp, [lv.shape for lv in image.levels]
((3, 300, 500), 0.5, [(3, 300, 500), (3, 150, 250), (3, 75, 125)])
>>> bool((image[:, 10:20, 490:] == rgb[:, 10:20, 490:]).all())
True
>>> image.level(1).mpp
1.0
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError, ShapeError
from ._deps import require
from ._indexing import Bounds
from ._rawfile import RawArrayFile
from .base import ArrayImage, Level, downsample_factors
from .writer import ImageWriter

__all__ = ["TiffImage", "TiffWriter"]

_SPATIAL = "ZYX"
_CHANNEL = "CS"
_UM_PER_UNIT = {
    "pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "\\u00B5m": 1.0,
    "mm": 1e3, "cm": 1e4, "m": 1e6,
}  # fmt: skip


def _tifffile() -> Any:
    return require("tifffile", "io", "reading and writing TIFF")


def _zarr() -> Any:
    return require("zarr", "io", "reading TIFF tiles lazily")


class _LogCapture(logging.Handler):
    """Collects tifffile's error log lines: tifffile logs (not raises) broken IFD chains of truncated files."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _map_axes(axes: str, shape: Sequence[int], where: str) -> tuple[tuple[int | None, ...], dict[int, int]]:
    """Image axes (C, [Z,] Y, X) from a tifffile axes string such as 'YXS', 'CYX', 'TZCYX', 'QYX'."""
    channel = [i for i, a in enumerate(axes) if a in _CHANNEL and shape[i] > 1]
    if len(channel) > 1:
        raise DataError(
            f"{where} has axes {axes!r} with shape {tuple(shape)}: both C and S hold several channels"
        )
    spatial = [i for i, a in enumerate(axes) if a in _SPATIAL]
    if not {"Y", "X"} <= {axes[i] for i in spatial}:
        raise DataError(f"{where} has axes {axes!r}: expected an image with Y and X axes")
    # A plain page stack (tifffile calls its axis I or Q: no metadata says what it is) reads as Z.
    stack = [i for i, a in enumerate(axes) if a in "IQ" and shape[i] > 1]
    if "Z" not in axes and len(stack) == 1 and stack[0] < min(spatial):
        spatial = [stack[0], *spatial]
    fixed = {}
    for i, a in enumerate(axes):
        if i in channel or i in spatial:
            continue
        if shape[i] != 1:
            raise DataError(
                f"{where} has axes {axes!r} with shape {tuple(shape)}: axis {a!r} holds {shape[i]} images, but "
                "tilegrad reads one (C, [Z,] Y, X) image. Open another series (series=...) or split the file"
            )
        fixed[i] = 0
    chan: int | None = channel[0] if channel else None
    return (chan, *spatial), fixed


def _ome_spacing_mm(tif: Any, series: int) -> dict[str, float]:
    """PhysicalSize{X,Y,Z} of the series' OME Pixels element, in millimetres."""
    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError as exc:
        raise DataError(f"{tif.filename}: OME-XML metadata cannot be parsed ({exc})") from None
    images = [el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Image"]
    if not images:
        return {}
    image = images[min(series, len(images) - 1)]
    pixels = next((el for el in image if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    out = {}
    for axis in "XYZ":
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            continue
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if unit not in _UM_PER_UNIT:
            raise DataError(f"{tif.filename}: OME PhysicalSize{axis}Unit {unit!r} is not a length unit")
        out[axis] = float(value) * _UM_PER_UNIT[unit] / 1000.0
    return out


def _page_spacing_mm(tif: Any, page: Any) -> dict[str, float]:
    """Pixel size from Aperio's description, ImageJ metadata or X/YResolution with an inch/cm unit."""
    description = page.description or ""
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    if tif.is_svs and match:
        mpp = float(match.group(1))
        return {"X": mpp / 1000.0, "Y": mpp / 1000.0}
    out: dict[str, float] = {}
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return out
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    per_unit_um = {2: 25400.0, 3: 10000.0}.get(unit)
    if tif.is_imagej and unit == 1:
        meta = tif.imagej_metadata or {}
        if str(meta.get("unit", "")).lower() in ("micron", "microns", "um", "µm", "\\u00b5m"):
            per_unit_um = 1.0
            if "spacing" in meta:
                out["Z"] = float(meta["spacing"]) / 1000.0
    if per_unit_um is None:
        return {}
    for axis in "XY":
        num, den = tags[f"{axis}Resolution"].value
        if num == 0 or den == 0 or (num == den and unit != 1):  # 1 px per inch: the "no resolution" default
            return {}
        out[axis] = per_unit_um * den / num / 1000.0
    return out


class TiffImage(ArrayImage):
    """Lazy (C, [Z,] Y, X) reader of one pyramid level of a TIFF / OME-TIFF series.

    ``level``: pyramid level (0 = full resolution). ``series``: which image series of the file (default 0).
    """

    def __init__(self, path: str | os.PathLike, level: int = 0, series: int = 0) -> None:
        tifffile = _tifffile()
        self.path = Path(path)
        self._series_index = series
        capture = _LogCapture()
        logger = logging.getLogger("tifffile")
        logger.addHandler(capture)
        try:
            with tifffile.TiffFile(self.path) as tif:
                _ = len(tif.pages)  # walks the whole IFD chain, logging broken links
                self._parse(tif, level, series, capture)
        except tifffile.TiffFileError as exc:
            raise DataError(f"{self.path} is not a readable TIFF file: {exc}") from None
        finally:
            logger.removeHandler(capture)

    def _parse(self, tif: Any, level: int, series: int, capture: _LogCapture) -> None:
        name = str(self.path)
        if not tif.series:
            raise DataError(f"{name} contains no image series")
        if not 0 <= series < len(tif.series):
            raise DataError(
                f"{name} has {len(tif.series)} image series (0..{len(tif.series) - 1}); received {series}"
            )
        s = tif.series[series]
        levels = s.levels
        if not 0 <= level < len(levels):
            raise DataError(
                f"{name} has {len(levels)} pyramid level(s) (0..{len(levels) - 1}); received level={level}"
            )
        self._check_complete(tif, levels, capture)
        where = f"{name} series {series}"
        axes, fixed = _map_axes(s.axes, s.shape, where)
        self._axes, self._fixed = axes, fixed
        self._native_ndim = len(s.axes)
        self._level_index = level
        shapes = []
        for lv in levels:
            lv_axes, _ = _map_axes(lv.axes, lv.shape, where)
            shapes.append(tuple(1 if a is None else int(lv.shape[a]) for a in lv_axes))
        base = shapes[0][1:]
        self._levels = tuple(Level(sh, downsample_factors(base, sh[1:])) for sh in shapes)
        self._shape = shapes[level]
        self._dtype = np.dtype(s.dtype)
        spatial_names = [s.axes[a] for a in axes[1:]]
        sizes = _ome_spacing_mm(tif, series) if tif.is_ome else {}
        if not sizes:
            sizes = _page_spacing_mm(tif, s.pages[0] if s.pages else tif.pages[0])
        own = {} if tif.is_ome or tif.is_svs or level == 0 else _page_spacing_mm(tif, levels[level].pages[0])
        if all(n in own for n in spatial_names):  # the level's own resolution tags (exact for our pyramids)
            self._spacing = tuple(own[n] for n in spatial_names)
        elif all(n in sizes for n in spatial_names):  # level 0's size times the shape ratio
            down = self._levels[level].downsample
            self._spacing = tuple(sizes[n] * d for n, d in zip(spatial_names, down))
        else:
            self._spacing = None
        self._affine = None
        self._array = None

    def _check_complete(self, tif: Any, levels: Sequence[Any], capture: _LogCapture) -> None:
        """Refuse truncated files: a broken IFD chain, or tile/strip data past the end of the file."""
        if capture.messages:
            raise DataError(
                f"{self.path} is truncated or corrupt: tifffile reported {capture.messages[0]!r}. "
                "Re-copy or re-export the file"
            )
        size = os.path.getsize(self.path)
        for lv in levels:
            for page in lv.pages:
                if page is None:
                    continue
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    raise DataError(
                        f"{self.path} is truncated: image data of a {page.shape} page ends at byte "
                        f"{int((offsets + counts).max())} but the file has {size} bytes. Re-copy or re-export it"
                    )

    def _open(self) -> Any:
        tif = _tifffile().TiffFile(self.path)
        store = tif.aszarr(series=self._series_index, level=self._level_index)
        array = _zarr().open(store, mode="r")
        return tif, store, array

    def _close_state(self, state: Any) -> None:
        tif, store, _ = state
        store.close()
        tif.close()

    def _native_array(self) -> Any:
        return self._handle[2]

    def read_bounds(self, bounds: Bounds) -> np.ndarray:
        try:
            return self._read(bounds)
        except (ValueError, RuntimeError, OSError) as exc:  # decoder errors (imagecodecs) are RuntimeErrors
            raise DataError(f"{self.path}: cannot decode image data in region {bounds}: {exc}") from exc

    def _open_level(self, k: int) -> TiffImage:
        return TiffImage(self.path, level=k, series=self._series_index)


# ---------------------------------------------------------------------------------------------------------- writer


def _sum_dtype(dtype: np.dtype, levels: int) -> np.dtype:
    """Exact sums over a level's 2^k x 2^k box of level-0 values: int32 or int64 for integers, float64 otherwise."""
    if dtype == np.bool_ or np.issubdtype(dtype, np.integer):
        info = np.iinfo(np.uint8 if dtype == np.bool_ else dtype)
        bound = max(abs(int(info.min)), int(info.max)) * 4 ** max(levels - 1, 0)
        return np.dtype(np.int32 if bound < 2**31 else np.int64)
    return np.dtype(np.float64)


def _sum_2x(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """2x2 sums of an (h, w, C) block; a missing row/column at an odd edge counts as zero (the counts of
    :func:`_box_counts` leave it out of the mean)."""
    h, w, c = block.shape
    acc = np.zeros((h + h % 2, w + w % 2, c), dtype=dtype)
    acc[:h, :w] = block
    rows = acc[0::2] + acc[1::2]  # pairwise sums: much faster than a strided reduction over a reshape
    return rows[:, 0::2] + rows[:, 1::2]


def _box_counts(start: int, stop: int, k: int, size: int) -> np.ndarray:
    """Level-0 pixels in each level-k box from ``start`` to ``stop`` along an axis of ``size`` level-0 pixels."""
    first = np.arange(start, stop) * 2**k
    return np.minimum(first + 2**k, size) - first


class TiffWriter(ImageWriter):
    """Write a (C, H, W) image tile by tile into a tiled pyramidal TIFF readable by tifffile and OpenSlide.

    ``tile``: TIFF tile edge (multiple of 16). ``levels``: number of pyramid levels including level 0; by default
    halve until the image fits in one tile. ``compression``: ``"zlib"`` (lossless, default), ``"jpeg"`` (uint8
    only, lossy) or None. ``mpp``: microns per pixel of level 0, stored in X/YResolution.

    Tiles written with ``writer[...] = tile`` go to an uncompressed level-0 scratch file ``<path>.partial.level0``
    (raw, next to the output, written with positional writes: NOTE [ No memory maps for big images ]). ``close()``
    then builds the reduced levels band by band, writes the TIFF to ``<path>.partial`` and renames it to ``path``.

    NOTE [ Pyramid levels are rounded once ]
    Level k holds the mean of each 2^k x 2^k box of level 0 (over the pixels that exist at the image's edges),
    rounded once (half to even) for integer images. Building level k from the *rounded* level k-1 would round
    k times and drift by a grey level; so the scratch file of level k holds the exact box *sums* (int32/int64,
    or float64 for float images), each built from the sums of level k-1 by 2x2 addition, and a level's pixels
    are the sums divided by the box sizes when its tiles are written. Memory stays at a band of tiles (a few MiB);
    disk needs the uncompressed image plus the sum scratch files (4/3 of the image's pixels at 4 or 8 bytes
    each), deleted at close.
    OpenSlide reads uint8 images with 1 (grey) or 3 (RGB) channels.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: Sequence[int],
        dtype: Any = np.uint8,
        *,
        tile: int = 256,
        levels: int | None = None,
        compression: str | None = "zlib",
        mpp: float | None = None,
        overwrite: bool = False,
        keep_partial: bool = False,
        resume: bool = False,
    ) -> None:
        _tifffile()
        if len(shape) != 3:
            raise ShapeError(
                f"TiffWriter writes 2D images of shape (C, H, W); received shape {tuple(shape)}. "
                "Write volumes with NiftiWriter or ZarrWriter"
            )
        if tile <= 0 or tile % 16:
            raise ConfigError(f"TIFF tiles must be a positive multiple of 16 pixels; received tile={tile}")
        if compression not in (None, "zlib", "jpeg"):
            raise ConfigError(f"compression must be 'zlib', 'jpeg' or None; received {compression!r}")
        if compression == "jpeg" and (np.dtype(dtype) != np.uint8 or shape[0] not in (1, 3)):
            raise ConfigError(
                "JPEG compression needs uint8 images with 1 or 3 channels; use compression='zlib'"
            )
        if mpp is not None and not mpp > 0:
            raise ConfigError(f"mpp must be a positive number of microns per pixel; received {mpp}")
        super().__init__(
            path,
            shape,
            dtype,
            chunks=(tile, tile),
            overwrite=overwrite,
            keep_partial=keep_partial,
            resume=resume,
        )
        self.tile = tile
        self.compression = compression
        self.mpp = mpp
        h, w = self.shape[1:]
        if levels is None:
            levels = 1
            while max(math.ceil(h / 2 ** (levels - 1)), math.ceil(w / 2 ** (levels - 1))) > tile:
                levels += 1
        if levels < 1:
            raise ConfigError(f"levels must be >= 1; received {levels}")
        self.n_levels = levels
        self._scratch_paths = [
            self.partial_path.with_name(f"{self.partial_path.name}.level{k}") for k in range(levels)
        ]
        make = (
            RawArrayFile.reopen if resume else RawArrayFile.create
        )  # resume: the level-0 tiles written so far
        self._base: RawArrayFile | None = make(self._scratch_paths[0], (h, w, self.shape[0]), self.dtype)

    def _write(self, bounds: Bounds, value: np.ndarray) -> None:
        channel, rows, cols = bounds
        self._base.write((rows, cols, channel), value.transpose(1, 2, 0))

    def _release(self) -> None:
        if self._base is not None:
            self._base.close()
        self._base = None

    def _level_shapes(self) -> list[tuple[int, int]]:
        h, w = self.shape[1:]
        return [(math.ceil(h / 2**k), math.ceil(w / 2**k)) for k in range(self.n_levels)]

    def _band_width(self, rows: int, bytes_per_element: int) -> int:
        """Columns handled at once: whole tiles, so that ``rows`` x columns x C elements take about 4 MiB."""
        per_column = rows * self.shape[0] * bytes_per_element
        return max(1, (4 * 2**20 // per_column) // self.tile) * self.tile

    def _read(self, f: RawArrayFile, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        h, w, c = f.shape
        return f.read(((rows[0], min(rows[1], h), 1), (cols[0], min(cols[1], w), 1), (0, c, 1)))

    def _tiles(self, f: RawArrayFile, k: int) -> Iterator[np.ndarray]:
        """TIFF tiles of level k in row-major order, zero-padded at the edges, read a band of tiles at a time;
        ``f`` holds level 0's pixels (k = 0) or level k's box sums (NOTE [ Pyramid levels are rounded once ])."""
        t = self.tile
        band = self._band_width(t, f.dtype.itemsize)
        h, w, c = f.shape
        for y in range(0, h, t):
            for x0 in range(0, w, band):
                block = self._read(f, (y, y + t), (x0, x0 + band))
                if k:
                    block = self._mean(block, k, y, x0)
                for x in range(0, block.shape[1], t):
                    tile = block[:, x : x + t]
                    if tile.shape[:2] != (t, t):
                        padded = np.zeros((t, t, c), dtype=self.dtype)
                        padded[: tile.shape[0], : tile.shape[1]] = tile
                        tile = padded
                    yield tile if c > 1 else tile[..., 0]

    def _mean(self, sums: np.ndarray, k: int, y: int, x: int) -> np.ndarray:
        """Level-k pixels from the box sums of a block whose first pixel is (y, x): rounded once."""
        h0, w0 = self.shape[1:]
        rows = _box_counts(y, y + sums.shape[0], k, h0)
        cols = _box_counts(x, x + sums.shape[1], k, w0)
        mean = sums / (rows[:, None, None] * cols[None, :, None]).astype(np.float64)
        if self.dtype == np.bool_:
            return mean > 0  # a box with any set pixel stays set
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            mean = np.clip(np.rint(mean), info.min, info.max)
        return mean.astype(self.dtype)

    def _build_level(self, src: RawArrayFile, k: int, shape: tuple[int, int]) -> RawArrayFile:
        """Box sums of level k from those of level k-1 (level 0's pixels for k = 1), a band of tiles at a time."""
        sums = _sum_dtype(self.dtype, self.n_levels)
        dst = RawArrayFile.create(self._scratch_paths[k], (*shape, self.shape[0]), sums)
        t = self.tile
        band = self._band_width(4 * t, sums.itemsize) // 2 * 2  # 2x2 source px per output px
        for y in range(0, shape[0], t):
            for x in range(0, shape[1], band):
                block = self._read(src, (2 * y, 2 * (y + t)), (2 * x, 2 * (x + band)))
                small = _sum_2x(block, sums)
                dst.write(
                    ((y, y + small.shape[0], 1), (x, x + small.shape[1], 1), (0, self.shape[0], 1)), small
                )
        return dst

    def _finalize(self) -> None:
        tifffile = _tifffile()
        channels = self.shape[0]
        photometric = "rgb" if channels == 3 and self.dtype == np.uint8 else "minisblack"
        raw_bytes = self.nbytes * 4 // 3
        bigtiff = raw_bytes > 2**31  # compressed size is unknown in advance: be generous
        compression = {"zlib": "zlib", "jpeg": "jpeg", None: None}[self.compression]
        src = self._base
        opened: list[RawArrayFile] = []
        with contextlib.ExitStack() as stack, tifffile.TiffWriter(self.partial_path, bigtiff=bigtiff) as tw:
            stack.callback(lambda: [f.close() for f in opened])
            for k, shape in enumerate(self._level_shapes()):
                array = src if k == 0 else self._build_level(src, k, shape)
                opened.append(array)
                options: dict[str, Any] = {}
                if self.mpp is not None:
                    px_per_cm = 1e4 / (self.mpp * 2**k)
                    options.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
                tw.write(
                    self._tiles(array, k),
                    shape=(*shape, channels) if channels > 1 else shape,
                    dtype=self.dtype,
                    tile=(self.tile, self.tile),
                    photometric=photometric,
                    planarconfig="contig" if channels > 1 else None,
                    compression=compression,
                    subfiletype=1 if k else 0,
                    metadata=None,
                    **options,
                )
                src = array
