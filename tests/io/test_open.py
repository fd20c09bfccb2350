"""open_image: format detection, clear errors, optional dependencies, readers in worker processes."""

import multiprocessing
import os
import pickle
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import tilegrad
from tilegrad.errors import ConfigError, DataError, MissingDependencyError
from tilegrad.io import NiftiImage, TiffImage, TiffWriter, open_image


def _tiff(path, data):
    with TiffWriter(path, data.shape, data.dtype, tile=32) as out:
        out[...] = data
    return path


def test_format_comes_from_content_not_suffix(tmp_path):
    data = np.arange(3 * 40 * 50, dtype=np.uint8).reshape(3, 40, 50)
    misnamed = _tiff(tmp_path / "slide.tif", data).rename(tmp_path / "slide.data")
    assert isinstance(open_image(misnamed), TiffImage)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v.nii")
    assert isinstance(open_image((tmp_path / "v.nii").rename(tmp_path / "v.bin")), NiftiImage)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"just some text, not an image" * 20, "not an image format tilegrad reads"),
        (b"\x1f\x8b\x08\x00" + b"\x00" * 40, "gzip-compressed but not a .nii.gz"),
    ],
)
def test_unsupported_files(tmp_path, content, message):
    path = tmp_path / "thing.dat"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        open_image(path)
    assert "thing.dat" in str(info.value)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tif does not exist"):
        open_image(tmp_path / "nope.tif")
    with pytest.raises(ConfigError, match="backend must be one of"):
        open_image(_tiff(tmp_path / "a.tif", np.zeros((1, 8, 8), np.uint8)), backend="gdal")
    with pytest.raises(DataError, match="takes a path"):
        open_image(12)


def test_no_level_metadata_means_mpp_cannot_choose(tmp_path):
    path = _tiff(tmp_path / "a.tif", np.zeros((1, 64, 64), np.uint8))
    with pytest.raises(DataError, match=r"no pixel size metadata.*level="):
        open_image(path, mpp=0.5)


def test_importing_tilegrad_io_loads_no_optional_library():
    code = (
        "import sys, tilegrad.io, tilegrad.io.open;"
        "heavy = {'tifffile', 'zarr', 'nibabel', 'pydicom', 'PIL', 'openslide'} & set(sys.modules);"
        "print(sorted(heavy))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(tilegrad.__file__).parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"


def test_missing_optional_library_names_the_extra(tmp_path, monkeypatch):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v.nii")
    monkeypatch.setitem(sys.modules, "nibabel", None)  # makes `import nibabel` raise ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'tilegrad\[io\]'"):
        open_image(tmp_path / "v.nii")
    monkeypatch.setitem(sys.modules, "openslide", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'tilegrad\[openslide\]'"):
        open_image(tmp_path / "v.nii", backend="openslide")


def _read_corner(image):
    return image[:, :5, :5]


def test_readers_pickle_and_work_in_forked_workers(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (3, 64, 80), dtype=np.uint8)
    image = open_image(_tiff(tmp_path / "a.tif", data))
    image[:, 0, 0]  # opens the file handle in this process before forking
    clone = pickle.loads(pickle.dumps(image))
    np.testing.assert_array_equal(clone[:, 30:40], data[:, 30:40])
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_read_corner, [image, image.level(1)])
    np.testing.assert_array_equal(results[0], data[:, :5, :5])
    assert results[1].shape == (3, 5, 5)
