"""Small image factories shared by the io tests (files are generated, never downloaded)."""

import numpy as np
import pytest


@pytest.fixture
def rgb_slide():
    """A 3-channel uint8 image with structure at every scale (odd size, not a multiple of the tile)."""
    rng = np.random.default_rng(42)
    y, x = np.mgrid[0:333, 0:517]
    base = (128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)).astype(np.int16)
    noise = rng.integers(-20, 20, (3, 333, 517))
    return np.clip(base[None] + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def box_mean():
    return _box_mean


def _box_mean(array, factor):
    """Reference pyramid level: the mean of each factor x factor box of a (C, H, W) array over the pixels that
    exist (boxes at odd edges are smaller), rounded once (half to even) for integers (what TiffWriter documents)."""
    c, h, w = array.shape
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    sums = np.zeros((c, hp, wp))
    sums[:, :h, :w] = array
    counts = np.zeros((hp, wp))
    counts[:h, :w] = 1
    shape = (c, hp // factor, factor, wp // factor, factor)
    out = sums.reshape(shape).sum(axis=(2, 4)) / counts.reshape(shape[1:]).sum(axis=(1, 3))
    if np.issubdtype(array.dtype, np.integer):
        out = np.rint(out)
    return out.astype(array.dtype)
