"""Thumbnails from low pyramid levels and Otsu tissue masks."""

import numpy as np
import pytest

from tilegrad.io import (
    ArrayImage,
    FlipRotateView,
    TiffWriter,
    open_image,
    otsu_threshold,
    thumbnail,
    tissue_mask,
)


def _slide(height=600, width=900):
    """White glass with two stained blobs and mild noise."""
    rng = np.random.default_rng(5)
    slide = np.full((3, height, width), 235, np.int16) + rng.integers(-8, 8, (3, height, width))
    y, x = np.mgrid[0:height, 0:width]
    blob = ((y - 200) ** 2 + (x - 250) ** 2 < 90**2) | ((y - 420) ** 2 + (x - 640) ** 2 < 60**2)
    slide[0, blob] = 190
    slide[1, blob] = 80
    slide[2, blob] = 150
    return np.clip(slide, 0, 255).astype(np.uint8), blob


def test_otsu_matches_scikit_image():
    filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(0)
    for values in (rng.normal(size=5000), np.concatenate([rng.normal(0, 1, 3000), rng.normal(6, 2, 1000)])):
        assert otsu_threshold(values) == pytest.approx(filters.threshold_otsu(values), rel=1e-12)


def test_thumbnail_reads_a_low_level_and_box_averages(tmp_path):
    slide, _ = _slide()
    path = tmp_path / "s.tif"
    with TiffWriter(path, slide.shape, np.uint8, tile=64) as out:
        out[...] = slide
    image = open_image(path)
    reads = []
    original = type(image)._read

    def recording(self, bounds):
        reads.append((self.level_index, bounds))
        return original(self, bounds)

    type(image)._read = recording
    try:
        thumb = thumbnail(image, max_size=100)
    finally:
        type(image)._read = original
    # Level 3 (75 x 113) is the coarsest level at least 100 px long; it is then averaged 2x2.
    assert {level for level, _ in reads} == {3}
    assert thumb.array.shape == (3, 37, 56)
    assert thumb.scale == pytest.approx((600 / 75 * 2, 900 / 113 * 2))  # level-0 size / level size x 2
    level3 = image.level(3).read().astype(np.float32)
    expected = level3[:, :74, :112].reshape(3, 37, 2, 56, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(thumb.array, expected, rtol=1e-6)


def test_tissue_mask_finds_the_stain(tmp_path):
    slide, blob = _slide()
    mask = tissue_mask(ArrayImage(slide), max_size=300)
    assert mask.array.dtype == bool and mask.scale == (3.0, 3.0)
    truth = blob[1::3, 1::3]  # centre pixel of each 3x3 block
    assert (mask.array == truth).mean() > 0.98
    rows, cols = mask.bbox()
    assert abs(rows.start - 110) <= 3 and abs(rows.stop - 481) <= 3
    assert abs(cols.start - 160) <= 3 and abs(cols.stop - 701) <= 3


def test_grey_tissue_is_darker_than_background():
    slide, blob = _slide()
    grey = slide.mean(axis=0, keepdims=True).astype(np.uint8)
    mask = tissue_mask(ArrayImage(grey), max_size=900)
    assert (mask.array == blob).mean() > 0.99


def test_tissue_mask_follows_flips_and_rotations():
    slide, _ = _slide(300, 450)
    view = FlipRotateView(ArrayImage(slide), k=1, flip=(2,))
    mask = tissue_mask(view, max_size=450)
    np.testing.assert_array_equal(mask.array, view.apply(tissue_mask(ArrayImage(slide), 450).array[None])[0])


def test_blank_slide_gives_empty_mask():
    mask = tissue_mask(ArrayImage(np.full((3, 50, 50), 240, np.uint8)))
    assert not mask.array.any() and mask.bbox() is None
