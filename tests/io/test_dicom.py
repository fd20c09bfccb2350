"""DICOM: series directories sorted by position, multi-frame files, spacing/affine, rescale, clear refusals."""

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from tilegrad.errors import DataError
from tilegrad.io import DicomImage, open_image

ROWS, COLS = 12, 9
ORIENTATION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # rows along +x, columns along +y: slice normal +z
PIXEL_SPACING = [0.7, 0.6]  # between rows, between columns (mm)


def _dataset(pixels, series_uid, **attrs):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds


def _write_series(directory, volume, z_positions, series_uid=None, **attrs):
    """One file per slice, named in an order that is NOT the spatial order."""
    series_uid = series_uid or generate_uid()
    directory.mkdir(exist_ok=True)
    order = np.random.default_rng(0).permutation(len(z_positions))
    for name_index, k in enumerate(order):
        ds = _dataset(
            volume[k],
            series_uid,
            ImagePositionPatient=[-10.0, 20.0, float(z_positions[k])],
            ImageOrientationPatient=ORIENTATION,
            PixelSpacing=PIXEL_SPACING,
            InstanceNumber=int(name_index),
            **attrs,
        )
        ds.save_as(directory / f"IM{name_index:04d}.dcm", enforce_file_format=True)
    return directory


@pytest.fixture
def volume():
    return np.random.default_rng(1).integers(-1000, 2000, (6, ROWS, COLS)).astype(np.int16)


def test_series_is_sorted_by_position_with_spacing_and_affine(tmp_path, volume):
    z = 40.0 - 2.5 * np.arange(6)  # acquired head to feet: positions decrease
    directory = _write_series(tmp_path / "series", volume, z)
    (directory / "notes.txt").write_text("not DICOM")  # ignored
    image = open_image(directory)
    assert isinstance(image, DicomImage)
    assert image.shape == (1, 6, ROWS, COLS) and image.dtype == np.int16
    np.testing.assert_array_equal(image[0], volume[::-1])  # ascending along the normal (+z)
    np.testing.assert_array_equal(image[0, 1:5:2, 3:, ::-2], volume[::-1][1:5:2, 3:, ::-2])
    assert image.spacing == pytest.approx((2.5, 0.7, 0.6))
    # Affine: (slice, row, column) index -> patient position (LPS).
    np.testing.assert_allclose(image.affine @ [0, 0, 0, 1], [-10.0, 20.0, z.min(), 1])
    np.testing.assert_allclose(
        image.affine @ [2, 3, 4, 1], [-10.0 + 4 * 0.6, 20.0 + 3 * 0.7, z.min() + 5.0, 1]
    )


def test_rescale_slope_and_intercept_are_applied(tmp_path, volume):
    directory = _write_series(
        tmp_path / "ct", volume, np.arange(6) * 1.25, RescaleSlope=2, RescaleIntercept=-1024
    )
    image = open_image(directory)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image[0, 2], volume[2].astype(np.float32) * 2 - 1024)


def test_multiframe_file(tmp_path, volume):
    frames = Sequence()
    z = np.array([5.0, 0.0, 10.0, 15.0, 20.0, 25.0])  # frames stored out of spatial order
    for k in range(6):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float(z[k])]
        item.PlanePositionSequence = Sequence([position])
        frames.append(item)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = PIXEL_SPACING
    orientation = Dataset()
    orientation.ImageOrientationPatient = ORIENTATION
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds = _dataset(
        volume,
        generate_uid(),
        NumberOfFrames=6,
        PerFrameFunctionalGroupsSequence=frames,
        SharedFunctionalGroupsSequence=Sequence([shared]),
    )
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    image = open_image(path)
    assert image.shape == (1, 6, ROWS, COLS)
    order = np.argsort(z)
    np.testing.assert_array_equal(image[0], volume[order])
    np.testing.assert_array_equal(image[0, -1, 2:4], volume[order][-1, 2:4])
    assert image.spacing == pytest.approx((5.0, 0.7, 0.6))


def test_single_2d_image(tmp_path, volume):
    path = tmp_path / "one.dcm"
    _dataset(volume[0], generate_uid(), PixelSpacing=PIXEL_SPACING).save_as(path, enforce_file_format=True)
    image = open_image(path)
    assert image.shape == (1, ROWS, COLS) and image.spacing == pytest.approx((0.7, 0.6))
    np.testing.assert_array_equal(image[0], volume[0])


def test_missing_slice_is_refused(tmp_path, volume):
    z = np.array([0.0, 2.0, 4.0, 8.0, 10.0, 12.0])  # the slice at 6 mm is missing
    directory = _write_series(tmp_path / "gap", volume, z)
    with pytest.raises(
        DataError, match=r"non-uniform slice spacing, 4\.0+ mm .* 2\.0+ mm: are slices missing"
    ):
        open_image(directory)


def test_two_series_in_one_directory_must_be_chosen(tmp_path, volume):
    directory = _write_series(tmp_path / "mixed", volume[:3], [0.0, 1.0, 2.0], series_uid="1.2.3.4")
    for k, name in enumerate(["X1.dcm", "X2.dcm"]):
        _dataset(
            volume[k], "1.2.3.5", ImagePositionPatient=[0, 0, float(k)], ImageOrientationPatient=ORIENTATION,
            PixelSpacing=PIXEL_SPACING,
        ).save_as(directory / name, enforce_file_format=True)  # fmt: skip
    with pytest.raises(DataError, match=r"holds 2 DICOM series.*series_uid"):
        open_image(directory)
    assert DicomImage(directory, series_uid="1.2.3.5").shape == (1, 2, ROWS, COLS)


def test_directory_without_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="contains no DICOM image files"):
        open_image(tmp_path / "empty")


def test_truncated_pixel_data_is_reported(tmp_path, volume):
    path = tmp_path / "one.dcm"
    _dataset(volume[0], generate_uid(), PixelSpacing=PIXEL_SPACING).save_as(path, enforce_file_format=True)
    full = path.read_bytes()
    path.write_bytes(full[:-40])
    # regression: this was reported as "Compressed transfer syntaxes need a decoder plugin"
    with pytest.raises(
        DataError, match=r"one\.dcm: the file is truncated: its pixel data has 176 bytes, .* need 216"
    ):
        open_image(path)[...]
    path.write_bytes(full[:-230])  # cut inside the header: elements read as empty values
    with pytest.raises(
        DataError, match=r"one\.dcm: header element \w+ holds '', not a number: the file is truncated"
    ):
        open_image(path)


def test_tile_by_tile_reads_decode_each_slice_once(tmp_path, volume, monkeypatch):
    image = open_image(_write_series(tmp_path / "s", volume, np.arange(6) * 2.0))
    decoded = []
    original = DicomImage._decode
    monkeypatch.setattr(DicomImage, "_decode", lambda self, s: decoded.append(s.path) or original(self, s))
    for y in range(0, ROWS, 4):  # in-plane tiles over the full depth: every tile visits every slice
        for x in range(0, COLS, 3):
            np.testing.assert_array_equal(image[0, :, y : y + 4, x : x + 3], volume[:, y : y + 4, x : x + 3])
    assert len(decoded) == 6 and len(set(decoded)) == 6


def test_dicom_to_nifti_keeps_world_coordinates(tmp_path, volume):
    """A DICOM series written as NIfTI with like=: same voxel, same place (LPS -> RAS+ handled)."""
    nib = pytest.importorskip("nibabel")
    from tilegrad.io import create_writer

    series = open_image(_write_series(tmp_path / "s", volume, np.arange(6) * 2.0))
    assert series.affine_space == "LPS"
    with create_writer(tmp_path / "ct.nii.gz", series.shape, np.int16, like=series) as out:
        out[...] = series.read()
    ras = nib.load(tmp_path / "ct.nii.gz").affine
    lps_point = series.affine @ [3, 2, 1, 1]
    np.testing.assert_allclose(ras @ [3, 2, 1, 1], [-lps_point[0], -lps_point[1], lps_point[2], 1], atol=1e-4)
