"""NIfTI: tile-by-tile writing, reading nibabel's files (channels, scaling, 2D), affines, laziness, errors."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from tilegrad import measure_peak_memory
from tilegrad.errors import ConfigError, DataError
from tilegrad.io import NiftiImage, NiftiWriter, create_writer, open_image

AFFINE = np.array(
    [[-0.9, 0.1, 0.0, 90.0], [0.0, 0.95, -0.2, -126.0], [0.05, 0.0, 2.5, -72.0], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("channels", [1, 3])
def test_writer_round_trip_through_nibabel(tmp_path, suffix, channels):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=(channels, 13, 10, 7)).astype(np.float32)
    path = tmp_path / f"out{suffix}"
    with NiftiWriter(path, volume.shape, np.float32, affine=AFFINE, chunks=(4, 4, 4)) as out:
        for z in range(0, 7, 3):  # slabs along the last axis, then a patch-wise overwrite of one corner
            out[..., z : z + 3] = volume[..., z : z + 3]
        out[:, :4, :4, :4] = volume[:, :4, :4, :4]
    if suffix == ".nii.gz":
        with gzip.open(path) as f:  # a real gzip stream, not a renamed .nii
            f.read(10)
    reference = nib.load(path)
    np.testing.assert_allclose(reference.affine, AFFINE, atol=1e-6)
    data = np.asarray(reference.dataobj)
    expected = volume[0] if channels == 1 else np.moveaxis(volume, 0, -1)
    np.testing.assert_array_equal(data, expected)
    image = open_image(path)
    assert isinstance(image, NiftiImage)
    assert image.shape == volume.shape and image.dtype == np.float32
    np.testing.assert_array_equal(image[:, 2:9, ::-3, 1], volume[:, 2:9, ::-3, 1])
    np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)
    assert image.spacing == pytest.approx(tuple(np.sqrt((AFFINE[:3, :3] ** 2).sum(0))), rel=1e-5)


@pytest.mark.parametrize(
    "file_shape, expected",
    [
        ((6, 5, 4), (1, 6, 5, 4)),  # plain 3D volume
        ((6, 5, 4, 2), (2, 6, 5, 4)),  # 4th axis: channels
        ((6, 5, 4, 1, 3), (3, 6, 5, 4)),  # NIfTI vector volume (X, Y, Z, 1, C)
        ((6, 5), (1, 6, 5)),  # a 2D image
    ],
)
def test_reads_nibabel_layouts(tmp_path, file_shape, expected):
    data = np.arange(np.prod(file_shape), dtype=np.int16).reshape(file_shape)
    path = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    image = open_image(path)
    assert image.shape == expected
    channel_last = data.reshape((*file_shape[:3], -1)) if len(file_shape) > 3 else data[..., None]
    np.testing.assert_array_equal(image.read(), np.moveaxis(channel_last, -1, 0))
    assert image.spacing == (1.5, 1.5, 3.0)[: len(expected) - 1]


def test_scaled_data_reads_as_float_like_nibabel(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, -10.0)
    path = tmp_path / "scaled.nii"
    nib.save(img, path)
    reference = nib.load(path).get_fdata(dtype=np.float64)
    image = open_image(path)
    assert image.dtype.kind == "f"
    np.testing.assert_allclose(image[0], reference)


def test_small_region_of_a_large_memmapped_file_is_not_loaded(tmp_path):
    """A 16^3 read of a 64 MiB uncompressed volume touches kilobytes, not the file."""
    path = tmp_path / "big.nii"
    shape = (256, 256, 256)
    with NiftiWriter(path, (1, *shape), np.float32, chunks=(256, 256, 16)) as out:
        for z in range(0, 256, 64):
            out[0, :, :, z : z + 64] = np.float32(z)
    file_bytes = path.stat().st_size
    image = open_image(path)
    region_peak = measure_peak_memory(lambda: image[0, 100:116, 50:66, 200:216])
    whole_peak = measure_peak_memory(lambda: image[...])
    np.testing.assert_array_equal(image[0, 0, 0, 190:200], [128] * 2 + [192] * 8)
    assert whole_peak > file_bytes * 0.9  # the meter sees a full read ...
    assert region_peak < file_bytes / 16  # ... and the region read stays far below it


def test_truncated_files_are_refused(tmp_path):
    data = np.ones((20, 20, 20), np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "full.nii")
    raw = (tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut\.nii is truncated.*need 32352 bytes, the file has 16176"):
        open_image(tmp_path / "cut.nii")
    nib.save(
        nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)), np.eye(4)), tmp_path / "full.nii.gz"
    )
    raw = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"cut\.nii\.gz"):
        open_image(tmp_path / "cut.nii.gz")[...]


def test_writer_like_source_scales_the_affine(tmp_path):
    source_path = tmp_path / "src.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 6, 4), np.float32), AFFINE), source_path)
    source = open_image(source_path)
    with create_writer(tmp_path / "sr.nii.gz", (1, 16, 12, 8), like=source) as out:  # 2x super-resolution
        out[...] = 1.0
    result = open_image(tmp_path / "sr.nii.gz")
    np.testing.assert_allclose(result.spacing, np.array(source.spacing) / 2, rtol=1e-5)
    # Output voxels 0 and 1 split input voxel 0: their centres lie a quarter voxel either side of its centre.
    centre = AFFINE @ np.array([0, 0, 0, 1.0])
    quarter = AFFINE[:3, :3] @ np.array([0.25, 0.25, 0.25])
    np.testing.assert_allclose(
        result.affine @ np.array([0, 0, 0, 1.0]), [*(centre[:3] - quarter), 1], atol=1e-5
    )
    np.testing.assert_allclose(
        result.affine @ np.array([1, 1, 1, 1.0]), [*(centre[:3] + quarter), 1], atol=1e-5
    )


def test_writer_refuses_bad_names_and_dtypes(tmp_path):
    with pytest.raises(ConfigError, match=r"\.nii or \.nii\.gz"):
        NiftiWriter(tmp_path / "x.nifti", (1, 4, 4, 4))
    with pytest.raises(ConfigError, match="cannot store dtype"):
        NiftiWriter(tmp_path / "x.nii", (1, 4, 4, 4), np.float16)
