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
def box_downsample():
    return _box_downsample


def _box_downsample(array):
    """Reference 2x2 box filter of a (C, H, W) array, odd edges replicated (what TiffWriter documents)."""
    a = array.astype(np.float64)
    if a.shape[1] % 2:
        a = np.concatenate([a, a[:, -1:]], axis=1)
    if a.shape[2] % 2:
        a = np.concatenate([a, a[:, :, -1:]], axis=2)
    out = a.reshape(a.shape[0], a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean(axis=(2, 4))
    if np.issubdtype(array.dtype, np.integer):
        out = np.rint(out)
    return out.astype(array.dtype)
