"""One lifecycle contract across every writer: open -> write tiles -> close, atomic completion, misuse refused."""

import numpy as np
import pytest
import torch

from tilegrad.errors import ConfigError, DataError, ShapeError, WriterStateError
from tilegrad.io import NiftiWriter, NpyWriter, TiffWriter, ZarrWriter, create_writer, open_image

# (file name, shape, dtype, writer class): each case must satisfy the whole contract below.
WRITERS = [
    ("slide.tif", (3, 70, 90), np.uint8, TiffWriter),
    ("vol.nii", (1, 20, 18, 9), np.float32, NiftiWriter),
    ("vol.nii.gz", (2, 20, 18, 9), np.int16, NiftiWriter),
    ("pred.zarr", (2, 20, 18, 9), np.float32, ZarrWriter),
    ("pred.npy", (1, 70, 90), np.float64, NpyWriter),
]
IDS = [w[0] for w in WRITERS]


def _data(shape, dtype):
    return (np.random.default_rng(0).random(shape) * 100).astype(dtype)


def _fill(out, data):
    """Tiles along the first spatial axis, last tile first."""
    n = data.shape[1]
    for start in reversed(range(0, n, 8)):
        out[:, start : start + 8] = data[:, start : start + 8]


@pytest.mark.parametrize("name, shape, dtype, cls", WRITERS, ids=IDS)
def test_output_appears_only_on_successful_close(tmp_path, name, shape, dtype, cls):
    path = tmp_path / name
    data = _data(shape, dtype)
    out = create_writer(path, shape, dtype)
    assert isinstance(out, cls)
    _fill(out, data)
    assert not path.exists()  # nothing under the final name before close ...
    assert all(".partial" in p.name for p in tmp_path.iterdir())  # ... only clearly marked partial files
    out.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # scratch files are gone
    np.testing.assert_array_equal(open_image(path).read(), data)
    out.close()  # closing twice is harmless
    with pytest.raises(WriterStateError, match="closed; writes after close"):
        out[:, 0] = 0
    with pytest.raises(WriterStateError, match="nothing to abort"):
        out.abort()


@pytest.mark.parametrize("name, shape, dtype, cls", WRITERS, ids=IDS)
def test_an_error_while_writing_leaves_nothing(tmp_path, name, shape, dtype, cls):
    path = tmp_path / name
    with pytest.raises(RuntimeError), create_writer(path, shape, dtype) as out:
        out[:, :4] = _data(shape, dtype)[:, :4]
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WriterStateError, match="aborted"):
        out[:, 0] = 0


@pytest.mark.parametrize("name, shape, dtype, cls", WRITERS, ids=IDS)
def test_ctrl_c_keeps_the_written_tiles_as_partial_and_resume_continues_them(
    tmp_path, name, shape, dtype, cls
):
    path = tmp_path / name
    data = _data(shape, dtype)
    with pytest.raises(KeyboardInterrupt), create_writer(path, shape, dtype) as out:
        out[:, :8] = data[:, :8]
        raise KeyboardInterrupt
    names = [p.name for p in tmp_path.iterdir()]
    assert names and all(
        n.startswith(name + ".partial") for n in names
    )  # kept, and never under the final name
    assert out.partial_files and not path.exists()
    with pytest.raises(ConfigError, match=r"earlier, unfinished run.*resume=True.*overwrite=True"):
        create_writer(path, shape, dtype)
    resumed = create_writer(path, shape, dtype, resume=True)
    resumed.mark_written((slice(None), slice(0, 8)))  # written by the interrupted run, not again
    resumed[:, 8:] = data[:, 8:]
    resumed.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    np.testing.assert_array_equal(open_image(path).read(), data)


@pytest.mark.parametrize("name, shape, dtype, cls", WRITERS, ids=IDS)
def test_overwrite_discards_the_partial_files_of_an_interrupted_run(tmp_path, name, shape, dtype, cls):
    path = tmp_path / name
    with pytest.raises(KeyboardInterrupt), create_writer(path, shape, dtype) as out:
        out[:, :8] = 1
        raise KeyboardInterrupt
    fresh = create_writer(path, shape, dtype, overwrite=True)
    fresh[:, 8:] = 2
    with pytest.raises(DataError, match="never written"):  # the old tiles do not count for the new run
        fresh.close()
    fresh.abort()
    assert list(tmp_path.iterdir()) == []


def test_resume_errors(tmp_path):
    with pytest.raises(ConfigError, match="no partial files"):
        NpyWriter(tmp_path / "x.npy", (1, 10, 10), resume=True)
    out = NpyWriter(tmp_path / "x.npy", (1, 10, 10))
    with pytest.raises(WriterStateError, match=r"mark_written\(\) is for resumed writers"):
        out.mark_written((slice(None), slice(0, 5)))
    out.abort(keep_partial=True)
    with pytest.raises(DataError, match=r"cannot resume .*x.npy.partial: it has 528 bytes.*needs 608"):
        NpyWriter(tmp_path / "x.npy", (1, 10, 12), resume=True)
    with pytest.raises(DataError, match=r"cannot resume .*x.npy.partial: its header differs"):
        NpyWriter(tmp_path / "x.npy", (1, 20, 5), resume=True)  # same size, another shape
    with pytest.raises(DataError, match=r"cannot resume .*chunks"):
        ZarrWriter(tmp_path / "y.zarr", (1, 10, 10), np.uint8, chunks=(1, 5, 5), keep_partial=True).abort()
        ZarrWriter(tmp_path / "y.zarr", (1, 10, 10), np.uint8, chunks=(1, 10, 10), resume=True)


@pytest.mark.parametrize("name, shape, dtype, cls", WRITERS, ids=IDS)
def test_keep_partial_keeps_marked_files(tmp_path, name, shape, dtype, cls):
    out = create_writer(tmp_path / name, shape, dtype, keep_partial=True)
    out[:, :4] = 1
    out.abort()
    names = [p.name for p in tmp_path.iterdir()]
    assert names and all(n.startswith(name + ".partial") for n in names)


@pytest.mark.parametrize("name, shape, dtype, cls", WRITERS, ids=IDS)
def test_wrong_shapes_and_dtypes_are_refused(tmp_path, name, shape, dtype, cls):
    out = create_writer(tmp_path / name, shape, dtype)
    with pytest.raises(ShapeError, match=r"cannot write an array of shape \(1, 5\) into .*selects shape"):
        out[:, :4] = np.ones((1, 5))
    with pytest.raises(IndexError):
        out[:, shape[1]] = 0
    if np.issubdtype(dtype, np.integer):
        with pytest.raises(DataError, match="Convert explicitly"):
            out[:, :4] = np.ones(1, np.float32)
        with pytest.raises(DataError, match="not representable"):
            out[:, :4] = 0.5
    out.abort()


@pytest.mark.parametrize("name, shape, dtype, cls", WRITERS, ids=IDS)
def test_close_refuses_never_written_regions(tmp_path, name, shape, dtype, cls):
    out = create_writer(tmp_path / name, shape, dtype)
    data = _data(shape, dtype)
    out[:, :-1] = data[:, :-1]  # the last row/slab is missing
    with pytest.raises(DataError, match="never written"):
        out.close()
    assert not (tmp_path / name).exists()
    out[:, -1] = torch.from_numpy(data[:, -1])  # tensors are accepted; the writer is still open
    out.close()
    np.testing.assert_array_equal(open_image(tmp_path / name).read(), data)


def test_incomplete_output_can_be_accepted_explicitly(tmp_path):
    out = NpyWriter(tmp_path / "x.npy", (1, 10, 10), np.float32)
    out[:, :5] = 1.0
    out.close(require_complete=False)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy")[0, :, 0], [1.0] * 5 + [0.0] * 5)


def test_existing_output_needs_overwrite(tmp_path):
    path = tmp_path / "x.zarr"
    with ZarrWriter(path, (1, 4, 4), np.uint8) as out:
        out[...] = 1
    with pytest.raises(ConfigError, match="already exists; pass overwrite=True"):
        ZarrWriter(path, (1, 4, 4), np.uint8)
    with ZarrWriter(path, (1, 4, 4), np.uint8, overwrite=True) as out:
        out[...] = 2
    assert open_image(path)[0, 0, 0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.zarr"]


def test_bad_shapes_and_names(tmp_path):
    with pytest.raises(ShapeError, match=r"\(C, \*spatial\)"):
        NpyWriter(tmp_path / "x.npy", (10,))
    with pytest.raises(ConfigError, match="cannot tell the output format"):
        create_writer(tmp_path / "x.png", (3, 4, 4))
    with pytest.raises(ConfigError, match="does not exist"):
        NpyWriter(tmp_path / "no" / "x.npy", (1, 4))
