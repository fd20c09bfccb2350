"""Lazy image I/O: read slides and volumes region by region, write outputs tile by tile.

Readers (:func:`open_image`) give a (C, *spatial) :class:`LazyImage` with numpy-style slicing and the file's pixel
size, affine and pyramid; writers (:func:`create_writer`) are array sinks with an open -> write -> close lifecycle
that never leave a half-written file under the final name. Heavy libraries (tifffile, zarr, nibabel, pydicom,
Pillow, OpenSlide) are imported only when a format needs them. See docs/io.md.

>>> import numpy as np, tempfile, pathlib
>>> import tilegrad.io as tio
>>> path = pathlib.Path(tempfile.mkdtemp()) / "out.tif"
>>> with tio.create_writer(path, (3, 512, 512), np.uint8, tile=256, mpp=0.25) as out:
...     for y in (0, 256):
...         for x in (0, 256):
...             out[:, y : y + 256, x : x + 256] = 255
>>> slide = tio.open_image(path, mpp=0.5)        # picks pyramid level 1
>>> slide.shape, slide.level_index
((3, 256, 256), 1)
"""

from __future__ import annotations

from .arrays import NpyImage, ZarrImage, ZarrWriter
from .base import ArrayImage, LazyImage, Level
from .dicom import DicomImage
from .nifti import NiftiImage, NiftiWriter
from .open import create_writer, open_image, select_level
from .plain import PillowImage
from .slide import OpenSlideImage
from .tiff import TiffImage, TiffWriter
from .tissue import Thumbnail, otsu_threshold, thumbnail, tissue_mask
from .transforms import FlipRotateView, random_flip_rotate
from .writer import ImageWriter, NpyWriter

__all__ = [
    "ArrayImage",
    "DicomImage",
    "FlipRotateView",
    "ImageWriter",
    "LazyImage",
    "Level",
    "NiftiImage",
    "NiftiWriter",
    "NpyImage",
    "NpyWriter",
    "OpenSlideImage",
    "PillowImage",
    "Thumbnail",
    "TiffImage",
    "TiffWriter",
    "ZarrImage",
    "ZarrWriter",
    "create_writer",
    "open_image",
    "otsu_threshold",
    "random_flip_rotate",
    "select_level",
    "thumbnail",
    "tissue_mask",
]
