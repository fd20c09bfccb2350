"""PNG/JPEG through Pillow, zarr stores (ours and OME-Zarr), .npy files and array pass-through."""

import numpy as np
import pytest
import zarr
from PIL import Image

from tilegrad.errors import DataError, ShapeError
from tilegrad.io import ArrayImage, NpyImage, PillowImage, ZarrImage, ZarrWriter, open_image

RNG = np.random.default_rng(7)


@pytest.mark.parametrize(
    "mode, array",
    [
        ("RGB", RNG.integers(0, 256, (21, 34, 3), dtype=np.uint8)),
        ("RGBA", RNG.integers(0, 256, (21, 34, 4), dtype=np.uint8)),
        ("L", RNG.integers(0, 256, (21, 34), dtype=np.uint8)),
        ("I;16", RNG.integers(0, 65536, (21, 34), dtype=np.uint16)),
    ],
)
def test_png_round_trip(tmp_path, mode, array):
    path = tmp_path / "x.png"
    pil = Image.fromarray(array)
    assert pil.mode == mode
    pil.save(path)
    image = open_image(path)
    assert isinstance(image, PillowImage)
    expected = array.reshape(21, 34, -1).transpose(2, 0, 1)
    assert image.shape == expected.shape and image.dtype == array.dtype
    np.testing.assert_array_equal(image[:, 3:, ::-2], expected[:, 3:, ::-2])
    assert image.spacing is None


def test_jpeg_matches_pillow_decode(tmp_path):
    array = RNG.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpeg"
    Image.fromarray(array).save(path, quality=90)
    np.testing.assert_array_equal(open_image(path).read(), np.asarray(Image.open(path)).transpose(2, 0, 1))


def test_truncated_png_is_refused(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(RNG.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError, match=r"x\.png is not a readable image \(truncated or corrupt\?\)"):
        open_image(path)


def test_zarr_writer_round_trip_with_metadata(tmp_path):
    data = RNG.normal(size=(2, 9, 40, 33)).astype(np.float32)
    path = tmp_path / "pred.zarr"
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    with ZarrWriter(
        path, data.shape, np.float32, chunks=(2, 4, 16, 16), spacing=(1.0, 0.5, 0.5), affine=affine
    ) as out:
        for z in range(0, 9, 4):
            out[:, z : z + 4] = data[:, z : z + 4]
    assert not (tmp_path / "pred.zarr.partial").exists()
    np.testing.assert_array_equal(zarr.open(str(path), mode="r")[:], data)  # plain zarr can read it
    image = open_image(path)
    assert isinstance(image, ZarrImage) and image.shape == data.shape
    np.testing.assert_array_equal(image[1, ::-2, 5:30, -1], data[1, ::-2, 5:30, -1])
    assert image.spacing == (1.0, 0.5, 0.5)
    np.testing.assert_array_equal(image.affine, affine)


def test_ome_zarr_multiscales(tmp_path):
    path = tmp_path / "image.ome.zarr"
    root = zarr.open_group(str(path), mode="w")
    base = RNG.integers(0, 255, (1, 3, 64, 48), dtype=np.uint8)  # (t, c, y, x)
    for k in range(2):
        level = base[:, :, :: 2**k, :: 2**k]
        root.create_array(str(k), shape=level.shape, dtype=level.dtype, chunks=(1, 3, 32, 32))[:] = level
    root.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [
                {"name": "t", "type": "time"},
                {"name": "c", "type": "channel"},
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
            ],
            "datasets": [
                {
                    "path": str(k),
                    "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 0.5 * 2**k, 0.5 * 2**k]}],
                }
                for k in range(2)
            ],
        }
    ]
    image = open_image(path)
    assert image.shape == (3, 64, 48) and image.mpp == pytest.approx(0.5)
    assert [lv.shape for lv in image.levels] == [(3, 64, 48), (3, 32, 24)]
    np.testing.assert_array_equal(image[2, 10:20], base[0, 2, 10:20])
    level = open_image(path, mpp=1.0)
    assert level.level_index == 1
    np.testing.assert_array_equal(level.read(), base[0, :, ::2, ::2])


def test_arrays_pass_through_without_copies(tmp_path):
    memmap = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=(2, 50, 60))
    memmap[:] = RNG.random((2, 50, 60))
    memmap.flush()
    assert open_image(memmap).shape == (2, 50, 60)
    npy = open_image(tmp_path / "a.npy")
    assert isinstance(npy, NpyImage)
    np.testing.assert_array_equal(npy[1, ::7], memmap[1, ::7])
    z = zarr.create_array(store=str(tmp_path / "z.zarr"), shape=(1, 30, 30), chunks=(1, 10, 10), dtype="i4")
    z[:] = np.arange(900).reshape(1, 30, 30)
    np.testing.assert_array_equal(open_image(z)[0, 5], np.arange(150, 180))
    grey = ArrayImage(np.zeros((5, 7)), axes=(None, 0, 1))
    assert grey.shape == (1, 5, 7)
    with pytest.raises(ShapeError, match="channel axis"):
        ArrayImage(np.zeros(5))


@pytest.mark.parametrize("order", ["C", "F"])
def test_npy_files_are_read_by_region_in_either_order(tmp_path, order):
    data = np.asarray(RNG.normal(size=(3, 11, 13)), order=order)
    np.save(tmp_path / "a.npy", data)
    image = open_image(tmp_path / "a.npy")
    np.testing.assert_array_equal(image[1:, 2:9:3, ::-4], data[1:, 2:9:3, ::-4])
    np.testing.assert_array_equal(image.read(), data)
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-8])
    with pytest.raises(DataError, match=r"cut\.npy is truncated"):
        open_image(tmp_path / "cut.npy")


def test_corrupt_zarr_chunk_is_a_data_error_naming_the_store(tmp_path):
    path = tmp_path / "pred.zarr"
    with ZarrWriter(path, (1, 64, 64), np.float32, chunks=(1, 32, 32)) as out:
        out[...] = np.random.default_rng(0).random((1, 64, 64))
    chunk = next(p for p in sorted(path.rglob("*")) if p.is_file() and p.name[0].isdigit())
    chunk.write_bytes(chunk.read_bytes()[:10])  # a torn chunk file
    image = open_image(path)
    assert image[:, 32:, 32:].shape == (1, 32, 32)  # other chunks still read
    with pytest.raises(
        DataError, match=r"pred\.zarr: cannot decode the zarr chunks of region \[0:1, 0:64, 0:64\].*corrupt"
    ):
        image[...]
