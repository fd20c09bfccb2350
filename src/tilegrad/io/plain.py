"""Plain raster images (PNG, JPEG, BMP, ...) through Pillow, loaded eagerly: they are small by nature.

Modes map to channels as L -> 1, LA -> 2, RGB -> 3, RGBA -> 4 (palette images become RGB or RGBA; 16-bit grey
stays uint16). PNG/JPEG carry no reliable pixel size, so ``spacing`` is None. Images too large for Pillow's
decompression-bomb guard are refused: store gigapixel images as tiled TIFF.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ._deps import require
from .base import ArrayImage

__all__ = ["PillowImage"]


class PillowImage(ArrayImage):
    """(C, H, W) image read with Pillow."""

    def __init__(self, path: str | os.PathLike) -> None:
        pil = require("PIL.Image", "io", "reading PNG/JPEG")
        path = Path(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", pil.DecompressionBombWarning)
                with pil.open(path) as img:
                    img.load()
                    array = self._to_array(img, pil)
        except (pil.DecompressionBombError, pil.DecompressionBombWarning) as exc:
            raise DataError(
                f"{path} is too large to read in one piece ({exc}); convert it to tiled TIFF"
            ) from None
        except (pil.UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{path} is not a readable image (truncated or corrupt?): {exc}") from None
        super().__init__(array, axes=(2, 0, 1), path=path)

    @staticmethod
    def _to_array(img: Any, pil: Any) -> np.ndarray:
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("L" if img.mode == "1" else "RGB")
        array = np.asarray(img)
        if array.ndim == 2:
            array = array[..., np.newaxis]
        return np.ascontiguousarray(array)
