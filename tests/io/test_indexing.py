"""Keys on lazy images behave like the same keys on numpy arrays, and fancy indexing is refused clearly."""

import numpy as np
import pytest

from tilegrad.errors import ShapeError
from tilegrad.io import ArrayImage
from tilegrad.io._indexing import normalize_key, read_strided_in_blocks

A = np.arange(3 * 7 * 10, dtype=np.int32).reshape(3, 7, 10)

KEYS = [
    (...),  # everything
    (0,),  # one channel
    (-1, 2, 3),  # a single element: numpy returns a scalar
    (slice(None), slice(2, 5), slice(1, 9)),  # a region
    (..., slice(None, None, 3)),  # Ellipsis then a strided axis
    (slice(None), slice(None, None, -1)),  # reversed axis
    (slice(1, None, -1), slice(6, 0, -2), slice(-3, None)),  # negative steps and negative starts
    (slice(None), slice(5, 2)),  # empty selection
    (1, ..., 4),  # Ellipsis in the middle
    (slice(0, 100), slice(-100, 100, 4)),  # out-of-range slice bounds clip as in numpy
    (np.int64(2), slice(None), np.int32(-1)),  # numpy integers
]


@pytest.mark.parametrize("key", KEYS)
def test_keys_match_numpy(key):
    image = ArrayImage(A)
    got = image[key]
    expected = A[key]
    assert np.shape(got) == np.shape(expected)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    "key, error",
    [
        ((0, 0, 0, 0), IndexError),  # too many indices
        ((3,), IndexError),  # out of bounds
        ((..., ...), IndexError),  # two ellipses
        ((np.array([0, 1]),), ShapeError),  # fancy indexing
        ((None,), ShapeError),  # newaxis
        ((slice(None, None, 0),), ValueError),  # zero step, as numpy
    ],
)
def test_bad_keys_are_refused(key, error):
    with pytest.raises(error):
        ArrayImage(A)[key]


def test_fancy_indexing_message_says_what_to_do():
    with pytest.raises(ShapeError, match="Read a region first"):
        ArrayImage(A)[[0, 1]]


def test_normalize_key_plan():
    plan = normalize_key((1, slice(None, None, -3)), (3, 7))
    assert plan[0].drop and plan[0].start == 1
    assert (plan[1].start, plan[1].step, plan[1].count) == (6, -3, 3)
    assert plan[1].increasing() == (0, 7, 3)


@pytest.mark.parametrize("max_elements", [1, 5, 17, 10_000])
def test_strided_block_reads_never_exceed_the_box_limit(max_elements):
    boxes = []

    def read_box(box):
        boxes.append(box)
        return A[0][tuple(slice(lo, hi) for lo, hi in box)]

    bounds = ((1, 7, 2), (0, 10, 3))
    np.testing.assert_array_equal(read_strided_in_blocks(read_box, bounds, max_elements), A[0, 1:7:2, 0:10:3])
    sizes = [np.prod([hi - lo for lo, hi in b]) for b in boxes]
    assert max(sizes) <= max(max_elements, 1)


@pytest.mark.parametrize("key", KEYS)
def test_results_are_fresh_writable_arrays_torch_can_take(key):
    torch = pytest.importorskip("torch")
    source = A.copy()
    got = ArrayImage(source)[key]
    if isinstance(got, np.ndarray) and got.size:
        assert got.flags.writeable and not np.shares_memory(got, source)
        torch.from_numpy(got)  # no negative strides
