"""Positional box reads/writes of raw C- and Fortran-order arrays agree with numpy on the same bytes."""

import numpy as np
import pytest

from tilegrad.io._rawfile import RawArrayFile

BOXES = [
    ((0, 4, 1), (0, 5, 1), (0, 6, 1)),  # everything: one run
    ((1, 3, 1), (0, 5, 1), (0, 6, 1)),  # full trailing axes: one run
    ((1, 3, 1), (2, 4, 1), (1, 5, 1)),  # interior box: a run per (i, j)
    ((0, 4, 3), (1, 5, 2), (0, 6, 5)),  # strided
    ((3, 4, 1), (4, 5, 1), (5, 6, 1)),  # one element
]


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("box", BOXES)
def test_box_reads_and_writes_match_numpy(tmp_path, order, box):
    shape = (4, 5, 6)
    path = tmp_path / "raw.bin"
    header = b"H" * 16
    path.write_bytes(header)
    raw = RawArrayFile.create(path, shape, np.int32, offset=16, order=order)
    reference = np.zeros(shape, np.int32)
    key = tuple(slice(*b) for b in box)
    value = np.arange(reference[key].size, dtype=np.int32).reshape(reference[key].shape) + 1
    raw.write(box, value)
    reference[key] = value
    np.testing.assert_array_equal(raw.read(box), reference[key])
    np.testing.assert_array_equal(raw.read([(0, s, 1) for s in shape]), reference)
    on_disk = np.frombuffer(path.read_bytes()[16:], np.int32).reshape(shape, order=order)
    np.testing.assert_array_equal(on_disk, reference)
    assert path.read_bytes()[:16] == header
    raw.close()
