"""Whole-slide formats through OpenSlide (Aperio, Hamamatsu, MIRAX, Leica, Ventana, Philips, DICOM WSI, generic
tiled TIFF): ``pip install 'tilegrad[openslide]'``.

Reads give (3, H, W) uint8 RGB: OpenSlide's RGBA is composited onto the slide's background colour (white unless the
file says otherwise), so transparent areas outside the scanned region read as background, as in OpenSlide's own
thumbnails. ``mpp`` comes from ``openslide.mpp-x``/``-y``.

OpenSlide addresses regions in level-0 coordinates; a region of level k starts at ``round(x * downsample_k)``.
When a level's size is not an exact fraction of level 0 (odd sizes), OpenSlide may resample by a fraction of a pixel;
for bit-exact reads of tiled TIFF use :class:`tilegrad.io.TiffImage` (what ``open_image`` does for TIFF files).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ._deps import require
from ._indexing import Bounds, read_strided_in_blocks
from .base import LazyImage, Level, downsample_factors

__all__ = ["OpenSlideImage"]

_MAX_BOX_PIXELS = 2**24  # largest region requested from OpenSlide at once (64 MiB of RGBA)


def _openslide() -> Any:
    return require("openslide", "openslide", "reading whole-slide formats through OpenSlide")


class OpenSlideImage(LazyImage):
    """Lazy (3, H, W) reader of one level of a slide that OpenSlide can open."""

    def __init__(self, path: str | os.PathLike, level: int = 0) -> None:
        openslide = _openslide()
        self.path = Path(path)
        try:
            slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise DataError(f"{self.path} cannot be opened by OpenSlide: {exc}") from None
        try:
            dims = [(int(h), int(w)) for w, h in slide.level_dimensions]
            if not 0 <= level < len(dims):
                raise DataError(
                    f"{self.path} has {len(dims)} pyramid level(s) (0..{len(dims) - 1}); received level={level}"
                )
            self._level_index = level
            self._levels = tuple(Level((3, *hw), downsample_factors(dims[0], hw)) for hw in dims)
            self._ds = float(slide.level_downsamples[level])
            self._shape = (3, *dims[level])
            self._dtype = np.dtype(np.uint8)
            props = slide.properties
            mpp_x, mpp_y = props.get("openslide.mpp-x"), props.get("openslide.mpp-y")
            if mpp_x and mpp_y:
                down = self._levels[level].downsample
                self._spacing = (float(mpp_y) / 1000.0 * down[0], float(mpp_x) / 1000.0 * down[1])
            background = props.get("openslide.background-color", "FFFFFF")
            self._background = np.array([int(background[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)
        finally:
            slide.close()

    def _open(self) -> Any:
        return _openslide().OpenSlide(str(self.path))

    def _close_state(self, state: Any) -> None:
        state.close()

    def _read_box(self, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        (y0, y1), (x0, x1) = box
        location = (round(x0 * self._ds), round(y0 * self._ds))
        try:
            region = self._handle.read_region(location, self._level_index, (x1 - x0, y1 - y0))
        except _openslide().OpenSlideError as exc:
            raise DataError(
                f"{self.path}: OpenSlide cannot read region y {y0}:{y1}, x {x0}:{x1}: {exc}"
            ) from exc
        rgba = np.asarray(region, dtype=np.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + self._background * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8).transpose(2, 0, 1)  # (3, h, w)

    def _read(self, bounds: Bounds) -> np.ndarray:
        (c0, c1, cs), *spatial = bounds

        def box(b: tuple[tuple[int, int], ...]) -> np.ndarray:
            return np.moveaxis(self._read_box(b), 0, -1)  # (h, w, 3): split along space only

        out = read_strided_in_blocks(box, tuple(spatial), _MAX_BOX_PIXELS)
        return np.moveaxis(out, -1, 0)[c0:c1:cs]

    def _open_level(self, k: int) -> OpenSlideImage:
        return OpenSlideImage(self.path, level=k)
