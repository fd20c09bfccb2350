"""Tiny generated slides for the training tests: real PNG files, and a tiled TIFF with one damaged tile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The smallest training setup the command-line tests share: a 4-channel small_cnn on the CPU, tile 32.
SMALL = [
    "--model",
    "small_cnn",
    "--model-kwargs",
    '{"width": 4}',
    "--tile",
    "32",
    "--no-progress",
    "--device",
    "cpu",
]


def write_slides(
    root: Path,
    n: int = 6,
    size: tuple[int, int] = (48, 40),
    n_val: int = 2,
    seed: int = 0,
    name: str = "slides.csv",
) -> Path:
    """n random RGB slides; positives (odd index) carry a dark 6x6 square. Returns the CSV path."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["image,label,split"]
    for i in range(n):
        img = rng.integers(80, 230, (*size, 3), dtype=np.uint8)
        label = i % 2
        if label:
            y, x = rng.integers(0, size[0] - 6), rng.integers(0, size[1] - 6)
            img[y : y + 6, x : x + 6] = 20
        Image.fromarray(img).save(root / "img" / f"s{i}.png")
        split = "val" if i >= n - n_val else "train"
        lines.append(f"img/s{i}.png,{label},{split}")
    csv = root / name
    csv.write_text("\n".join(lines) + "\n")
    return csv


def write_damaged_tiff(path: Path, size: int = 96, tile: int = 32) -> Path:
    """A zlib-compressed tiled RGB TIFF (3x3 tiles) whose middle tile's bytes are overwritten with garbage.

    Its headers and its last tile are intact, so opening it and reading its last pixel work.
    """
    import tifffile

    from tilegrad.io import create_writer

    image = np.random.default_rng(1).integers(80, 230, (3, size, size), dtype=np.uint8)
    with create_writer(path, image.shape, np.uint8, tile=tile, levels=1, overwrite=True) as writer:
        writer[...] = image
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        middle = len(page.dataoffsets) // 2
        offset, count = page.dataoffsets[middle], page.databytecounts[middle]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\xff" * count
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def slides(tmp_path: Path) -> Path:
    return write_slides(tmp_path)


@pytest.fixture(scope="session")
def make_slides():
    """The slide writer itself, for tests that need other sizes or module-scoped data."""
    return write_slides
