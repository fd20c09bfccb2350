"""Tiled pyramidal TIFF and OME-TIFF: our writer, tifffile's files, OpenSlide reading our output, errors."""

import numpy as np
import pytest
import tifffile

from tilegrad.errors import ConfigError, DataError, ShapeError
from tilegrad.io import OpenSlideImage, TiffImage, TiffWriter, open_image


def _write_in_tiles(path, image, **options):
    with TiffWriter(path, image.shape, image.dtype, **options) as out:
        for y in range(
            0, image.shape[1], 100
        ):  # blocks not aligned with the TIFF's tiles, written out of order
            for x in reversed(range(0, image.shape[2], 150)):
                out[:, y : y + 100, x : x + 150] = image[:, y : y + 100, x : x + 150]
    return path


def test_round_trip_rgb_pyramid(tmp_path, rgb_slide, box_mean):
    path = _write_in_tiles(tmp_path / "slide.tif", rgb_slide, tile=64, mpp=0.25)
    image = open_image(path)
    assert isinstance(image, TiffImage)
    assert image.shape == (3, 333, 517) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[...], rgb_slide)
    np.testing.assert_array_equal(image[1, 100:110, ::-7], rgb_slide[1, 100:110, ::-7])
    assert image.mpp == pytest.approx(0.25)
    assert image.spacing == pytest.approx((0.25e-3, 0.25e-3))
    # Levels halve (rounding up) until one tile holds the image; level k is the 2^k x 2^k box mean of level 0,
    # rounded once. Regression: built from the rounded level k-1, level 3 was off by one grey level in places.
    assert [lv.shape[1:] for lv in image.levels] == [(333, 517), (167, 259), (84, 130), (42, 65), (21, 33)]
    for k in range(1, 5):
        level = image.level(k)
        np.testing.assert_array_equal(level[...], box_mean(rgb_slide, 2**k))
        assert level.mpp == pytest.approx(0.25 * 2**k)
        assert level.level_index == k


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((1, 70, 90), np.uint8),  # greyscale
        ((1, 70, 90), np.uint16),  # 16-bit grey
        ((2, 70, 90), np.float32),  # two float channels (e.g. a probability map)
        ((4, 33, 17), np.uint8),  # RGBA-like, smaller than a tile
    ],
)
def test_round_trip_other_layouts(tmp_path, shape, dtype, box_mean):
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 1000).astype(dtype)
    path = tmp_path / "x.tif"
    with TiffWriter(path, shape, dtype, tile=32) as out:
        out[...] = data
    image = open_image(path)
    assert image.shape == shape and image.dtype == dtype
    np.testing.assert_array_equal(image.read(), data)
    assert image.mpp is None
    for k in range(1, len(image.levels)):  # float levels: the box mean, in the image's dtype
        np.testing.assert_array_equal(image.level(k).read(), box_mean(data, 2**k))


def test_jpeg_compression_is_lossy_but_close(tmp_path, rgb_slide):
    path = _write_in_tiles(tmp_path / "j.tif", rgb_slide, tile=64, compression="jpeg")
    got = open_image(path).read().astype(int)
    assert np.abs(got - rgb_slide).mean() < 8


def test_openslide_reads_our_pyramid(tmp_path, rgb_slide):
    openslide = pytest.importorskip("openslide")
    path = _write_in_tiles(tmp_path / "slide.tif", rgb_slide, tile=64, mpp=0.5)
    slide = openslide.OpenSlide(str(path))
    assert slide.properties["openslide.vendor"] == "generic-tiff"
    assert slide.level_count == 5
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    ours = TiffImage(path)
    for k in range(slide.level_count):
        via_openslide = OpenSlideImage(path, level=k)
        assert via_openslide.shape == ours.level(k).shape
        np.testing.assert_array_equal(via_openslide.read(), ours.level(k).read())
    region = np.asarray(slide.read_region((200, 100), 0, (50, 40)))[..., :3].transpose(2, 0, 1)
    np.testing.assert_array_equal(region, rgb_slide[:, 100:140, 200:250])
    reader = open_image(path, backend="openslide")
    assert reader.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(reader[:, 5::31, ::-13], rgb_slide[:, 5::31, ::-13])


def test_ome_tiff_pyramid_with_physical_size(tmp_path):
    """An OME-TIFF written by tifffile with SubIFD levels and a PhysicalSize in nanometres."""
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4000, (2, 256, 320), dtype=np.uint16)  # (C, Y, X)
    path = tmp_path / "image.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        meta = {"axes": "CYX", "PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 250.0,
                "PhysicalSizeYUnit": "nm"}  # fmt: skip
        tw.write(data, tile=(64, 64), subifds=2, metadata=meta)
        tw.write(data[:, ::2, ::2], tile=(64, 64), subfiletype=1)
        tw.write(data[:, ::4, ::4], tile=(64, 64), subfiletype=1)
    image = open_image(path)
    assert image.shape == (2, 256, 320)
    assert image.mpp == pytest.approx(0.25)
    assert len(image.levels) == 3
    np.testing.assert_array_equal(image[1, 10:90, 200:], data[1, 10:90, 200:])
    half = open_image(path, mpp=0.5)
    assert half.level_index == 1 and half.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(half.read(), data[:, ::2, ::2])


def test_ome_tiff_volume_has_z_spacing(tmp_path):
    data = np.arange(4 * 32 * 48, dtype=np.uint16).reshape(4, 32, 48)  # (Z, Y, X), one channel
    path = tmp_path / "vol.ome.tif"
    tifffile.imwrite(
        path,
        data,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
    )
    image = open_image(path)
    assert image.shape == (1, 4, 32, 48)
    assert image.spacing == pytest.approx((2e-3, 0.5e-3, 0.5e-3))
    np.testing.assert_array_equal(image[0, ::-1, 3], data[::-1, 3])


def test_mpp_level_choice_refuses_far_values(tmp_path, rgb_slide):
    path = _write_in_tiles(tmp_path / "slide.tif", rgb_slide, tile=64, mpp=0.25)
    assert open_image(path, mpp=1.0).level_index == 2
    with pytest.raises(DataError, match=r"no level within 10% of 0.7 .*level 1: 0\.5"):
        open_image(path, mpp=0.7)
    with pytest.raises(ConfigError, match="either level"):
        open_image(path, level=1, mpp=0.5)
    with pytest.raises(DataError, match=r"5 pyramid level\(s\)"):
        open_image(path, level=5)


def test_truncated_tiff_is_refused(tmp_path, rgb_slide):
    path = _write_in_tiles(tmp_path / "slide.tif", rgb_slide, tile=64, mpp=0.25)
    data = path.read_bytes()
    for fraction in (
        0.3,
        0.9,
        0.995,
    ):  # inside level-0 data; inside a lower level; inside the last level's data
        cut = tmp_path / f"cut{fraction}.tif"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(DataError, match=rf"cut{fraction}\.tif.*truncated"):
            open_image(cut)


def test_not_a_tiff(tmp_path):
    path = tmp_path / "fake.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 50)
    with pytest.raises(DataError, match=r"fake\.tif"):
        open_image(path)


def test_writer_refuses_bad_arguments(tmp_path):
    with pytest.raises(ShapeError, match=r"\(C, H, W\)"):
        TiffWriter(tmp_path / "v.tif", (1, 8, 8, 8), np.uint8)
    with pytest.raises(ConfigError, match="multiple of 16"):
        TiffWriter(tmp_path / "v.tif", (3, 8, 8), np.uint8, tile=100)
    with pytest.raises(ConfigError, match="JPEG"):
        TiffWriter(tmp_path / "v.tif", (3, 8, 8), np.float32, compression="jpeg")
    assert not list(tmp_path.iterdir())


def test_plain_page_stack_reads_as_a_volume(tmp_path):
    data = np.arange(5 * 20 * 30, dtype=np.uint16).reshape(5, 20, 30)
    tifffile.imwrite(tmp_path / "stack.tif", data)  # no OME/ImageJ metadata: tifffile's axes are 'QYX'
    image = open_image(tmp_path / "stack.tif")
    assert image.shape == (1, 5, 20, 30)
    np.testing.assert_array_equal(image[0, ::-2, 3], data[::-2, 3])
    tifffile.imwrite(tmp_path / "movie.tif", data[:, None], metadata={"axes": "TZYX"})  # time is not space
    with pytest.raises(DataError, match=r"axis 'T' holds 5 images"):
        open_image(tmp_path / "movie.tif")
