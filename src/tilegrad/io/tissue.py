"""Thumbnails and tissue masks of slides, computed from a low pyramid level in bounded memory.

:func:`thumbnail` picks the coarsest pyramid level that is still at least ``max_size`` pixels along its longest
axis, then box-averages it by an integer factor, reading a strip at a time. :func:`tissue_mask` thresholds the
thumbnail with Otsu's method: on HSV saturation for colour images (stained tissue is coloured, glass is grey/white)
or on grey level for single-channel images (tissue is darker than the background). ``mask.bbox()`` gives the
tissue's bounding box in image pixels, e.g. to trim a slide before training.

>>> import numpy as np
>>> from tilegrad.io import ArrayImage
>>> slide = np.full((3, 400, 600), 240, np.uint8)           # white glass
>>> slide[0, 100:200, 300:500] = 200; slide[1:, 100:200, 300:500] = 60   # a pink-purple tissue blob
>>> mask = tissue_mask(ArrayImage(slide), max_size=150)
>>> mask.array.shape, mask.scale
((100, 150), (4.0, 4.0))
>>> mask.bbox()
(slice(100, 200, None), slice(300, 500, None))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .base import LazyImage

__all__ = ["Thumbnail", "otsu_threshold", "thumbnail", "tissue_mask"]

_STRIP_ELEMENTS = 2**21  # source elements read per strip while box-averaging (8 MiB as float32)


@dataclass(frozen=True)
class Thumbnail:
    """A small array of an image plus its scale: ``scale[i]`` image pixels per thumbnail pixel along spatial axis i.

    ``array`` is (C, *spatial) for thumbnails, or boolean (*spatial) for tissue masks.
    """

    array: np.ndarray
    scale: tuple[float, ...]

    def bbox(self, margin: int = 0) -> tuple[slice, ...] | None:
        """Bounding box of the True pixels of a mask in image pixels (grown by ``margin`` thumbnail pixels), or
        None if the mask is empty."""
        if self.array.dtype != bool:
            raise DataError("bbox() needs a boolean mask (from tissue_mask), not a thumbnail")
        if not self.array.any():
            return None
        out = []
        for axis, s in enumerate(self.scale):
            other = tuple(i for i in range(self.array.ndim) if i != axis)
            hits = np.flatnonzero(self.array.any(axis=other))
            lo = max(int(hits[0]) - margin, 0)
            hi = min(int(hits[-1]) + 1 + margin, self.array.shape[axis])
            out.append(slice(round(lo * s), round(hi * s)))
        return tuple(out)


def _pick_level(image: LazyImage, max_size: int) -> tuple[LazyImage, tuple[float, ...]]:
    """Coarsest level with longest side >= max_size, and its size relative to ``image``'s own level."""
    levels = image.levels
    current = levels[image.level_index].downsample
    best = image.level_index
    for k, lv in enumerate(levels):
        if max(lv.shape[1:]) >= max_size and np.prod(lv.downsample) > np.prod(levels[best].downsample):
            best = k
    chosen = image.level(best)
    rel = tuple(d / c for d, c in zip(levels[best].downsample, current))
    return chosen, rel


def thumbnail(image: LazyImage, max_size: int = 1024) -> Thumbnail:
    """A (C, *spatial) float32 thumbnail whose longest side is at most ``max_size``, box-averaged from a low level.

    Memory: one strip of the chosen level (about 2 M elements) plus the thumbnail.
    """
    if max_size < 1:
        raise ConfigError(f"max_size must be >= 1; received {max_size}")
    if not isinstance(image, LazyImage):
        from .open import open_image

        image = open_image(image)
    source, rel = _pick_level(image, max_size)
    spatial = source.shape[1:]
    factor = max(1, math.ceil(max(spatial) / max_size))
    factors = tuple(min(factor, n) for n in spatial)  # an axis shorter than the factor collapses to one pixel
    out_shape = tuple(n // f for n, f in zip(spatial, factors))
    channels = source.shape[0]
    out = np.empty((channels, *out_shape), dtype=np.float32)
    row_elements = channels * math.prod(spatial[1:]) * factors[0]
    rows_per_strip = max(1, _STRIP_ELEMENTS // max(row_elements, 1))
    for r0 in range(0, out_shape[0], rows_per_strip):
        r1 = min(r0 + rows_per_strip, out_shape[0])
        counts = (r1 - r0, *out_shape[1:])
        key = (
            slice(None),
            *(
                slice(start * f, (start + n) * f)
                for start, n, f in zip((r0, *(0,) * (len(counts) - 1)), counts, factors)
            ),
        )
        block = source[key]
        if max(factors) == 1:
            out[:, r0:r1] = block
            continue
        shape = [channels]
        for n, f in zip(counts, factors):
            shape += [n, f]
        out[:, r0:r1] = block.reshape(shape).mean(
            axis=tuple(range(2, 2 * len(counts) + 1, 2)), dtype=np.float32
        )
    scale = tuple(r * f for r, f in zip(rel, factors))
    return Thumbnail(out, scale)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut of a histogram that maximises between-class variance.

    >>> otsu_threshold(np.array([0.0] * 50 + [1.0] * 50)) < 1.0
    True
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise DataError("cannot threshold an empty or all-NaN image")
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centres) / np.maximum(weight1, 1)
    mean2 = (np.cumsum((counts * centres)[::-1]) / np.maximum(weight2[::-1], 1))[::-1]
    variance = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[int(np.argmax(variance))])


def _saturation(rgb: np.ndarray) -> np.ndarray:
    high = rgb.max(axis=0)
    low = rgb.min(axis=0)
    return np.where(high > 0, (high - low) / np.where(high > 0, high, 1), 0.0)


def tissue_mask(image: LazyImage | Thumbnail | Any, max_size: int = 1024) -> Thumbnail:
    """Boolean tissue mask of a slide (or of a :class:`Thumbnail`) by Otsu thresholding.

    Colour images (3+ channels): saturation above the threshold. Single-channel: grey level below it. An image
    without contrast (one value everywhere) yields an all-False mask.
    """
    thumb = image if isinstance(image, Thumbnail) else thumbnail(image, max_size)
    array = thumb.array.astype(np.float32, copy=False)
    if array.shape[0] >= 3:
        feature = _saturation(array[:3])
        if feature.max() == feature.min():
            return Thumbnail(np.zeros(feature.shape, bool), thumb.scale)
        mask = feature > otsu_threshold(feature)
    else:
        feature = array[0]
        if feature.max() == feature.min():
            return Thumbnail(np.zeros(feature.shape, bool), thumb.scale)
        mask = feature < otsu_threshold(feature)
    return Thumbnail(mask, thumb.scale)
