"""Lazy flips and 90-degree rotations equal numpy's np.flip / np.rot90 on the loaded array."""

import itertools

import numpy as np
import pytest
import torch

from tilegrad.errors import ShapeError
from tilegrad.io import ArrayImage, FlipRotateView, random_flip_rotate

RNG = np.random.default_rng(0)
IMAGE_2D = RNG.integers(0, 1000, (2, 5, 7))  # odd, non-square sizes catch swapped axes
IMAGE_3D = RNG.integers(0, 1000, (1, 3, 4, 6))

# All 8 orientations of the plane: 4 rotations, with and without a flip of the last axis.
DIHEDRAL = list(itertools.product(range(4), [(), (-1,)]))
KEYS = [
    (...,),
    (slice(None), slice(1, 4), slice(None, None, 2)),
    (1, slice(None, None, -1)),
    (slice(None), -1, slice(5, 0, -2)),
]


def _expected(array, k, flip, axes=(-2, -1)):
    out = np.flip(array, flip) if flip else array
    return np.rot90(out, k, axes=axes)


@pytest.mark.parametrize("k, flip", DIHEDRAL)
@pytest.mark.parametrize("key", KEYS)
def test_2d_views_equal_numpy(k, flip, key):
    view = FlipRotateView(ArrayImage(IMAGE_2D), k=k, flip=flip)
    expected = _expected(IMAGE_2D, k, flip)
    assert view.shape == expected.shape
    np.testing.assert_array_equal(view[key], expected[key])


@pytest.mark.parametrize("k, flip", DIHEDRAL)
@pytest.mark.parametrize("axes", [(-2, -1), (1, 2), (1, 3)])
def test_3d_views_equal_numpy(k, flip, axes):
    view = FlipRotateView(ArrayImage(IMAGE_3D), k=k, flip=flip, axes=axes)
    expected = _expected(IMAGE_3D, k, flip, axes)
    np.testing.assert_array_equal(view.read(), expected)
    np.testing.assert_array_equal(view[0, 1:, ::-2, 1:5], expected[0, 1:, ::-2, 1:5])


def test_views_compose():
    inner = FlipRotateView(ArrayImage(IMAGE_2D), k=1, flip=(1,))
    outer = FlipRotateView(inner, k=3, flip=(2,))
    expected = _expected(_expected(IMAGE_2D, 1, (1,)), 3, (2,))
    np.testing.assert_array_equal(outer[:, ::2, 1:], expected[:, ::2, 1:])


def test_view_reads_only_the_mapped_region():
    reads = []

    class Recording(ArrayImage):
        def _read(self, bounds):
            reads.append(bounds)
            return super()._read(bounds)

    view = FlipRotateView(Recording(IMAGE_2D), k=1)  # view (C, W, H): view row r = base column W-1-r
    view[:, 0:2, 1:3]
    assert reads == [((0, 2, 1), (1, 3, 1), (5, 7, 1))]


@pytest.mark.parametrize("k, flip", DIHEDRAL)
def test_affine_and_spacing_follow_the_transform(k, flip):
    affine = np.array([[0.5, 0, 0, 10], [0, 2.0, 0, -3], [0, 0, 1, 0], [0, 0, 0, 1]])
    base = ArrayImage(IMAGE_2D, spacing=(0.5, 2.0), affine=affine)
    view = FlipRotateView(base, k=k, flip=flip)
    expected = _expected(np.indices(IMAGE_2D.shape[1:]), k, flip)  # base index of every view pixel
    for r, c in [(0, 0), (1, 2), (view.shape[1] - 1, view.shape[2] - 1)]:
        base_index = expected[:, r, c]
        world_view = view.affine @ np.array([r, c, 0, 1])
        world_base = affine @ np.array([*base_index, 0, 1])
        np.testing.assert_allclose(world_view, world_base)
    assert view.spacing == ((0.5, 2.0) if k % 2 == 0 else (2.0, 0.5))


@pytest.mark.parametrize("k, flip", DIHEDRAL)
def test_apply_and_invert_match_the_view(k, flip):
    view = FlipRotateView(ArrayImage(IMAGE_2D), k=k, flip=flip)
    np.testing.assert_array_equal(view.apply(IMAGE_2D), view.read())
    np.testing.assert_array_equal(view.invert(view.read()), IMAGE_2D)
    tensor = torch.from_numpy(IMAGE_2D)
    assert torch.equal(view.apply(tensor), torch.from_numpy(view.read()))
    assert torch.equal(view.invert(view.apply(tensor)), tensor)


def test_random_views_cover_all_eight_orientations():
    rng = np.random.default_rng(1)
    seen = {random_flip_rotate(ArrayImage(IMAGE_2D), rng).read().tobytes() for _ in range(200)}
    assert len(seen) == 8


def test_channel_axis_cannot_be_flipped():
    with pytest.raises(ShapeError, match="spatial axes"):
        FlipRotateView(ArrayImage(IMAGE_2D), flip=(0,))
    with pytest.raises(ShapeError, match="two different"):
        FlipRotateView(ArrayImage(IMAGE_2D), axes=(1, 1))
