"""Peak memory of tilegrad.io writers and readers on a slide far larger than a tile.

Writes an RGB slide of --size x --size pixels in 512 x 512 tiles three ways and reads it back:

- tilegrad TiffWriter (tiles to a raw scratch file with positional writes; pyramid built band by band at close),
- the same tiles into an np.memmap .npy (touched pages of a mapping count as resident memory),
- the conventional route: assemble the whole image in RAM, then tifffile writes the pyramid.

Peak = tilegrad.measure_peak_memory (resident high-water mark above the start). Run:

    python benchmarks/io_memory.py --size 8192
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from tilegrad import format_bytes, measure_peak_memory
from tilegrad.io import TiffWriter, open_image, thumbnail

TILE = 512


def make_tile(y: int, x: int) -> np.ndarray:
    yy, xx = np.mgrid[y : y + TILE, x : x + TILE]
    base = ((np.sin(xx / 37.0) + np.cos(yy / 53.0)) * 60 + 128).astype(np.uint8)
    return np.stack([base, base // 2 + 60, 255 - base])


def tiles(size: int):
    for y in range(0, size, TILE):
        for x in range(0, size, TILE):
            yield y, x, make_tile(y, x)


def tilegrad_tiff(path: Path, size: int) -> dict[str, float]:
    out = TiffWriter(path, (3, size, size), np.uint8, tile=256, mpp=0.5)

    def write() -> None:
        for y, x, t in tiles(size):
            out[:, y : y + TILE, x : x + TILE] = t

    t0 = time.perf_counter()
    write_peak = measure_peak_memory(write)
    close_peak = measure_peak_memory(out.close)
    return {"write": write_peak, "close": close_peak, "seconds": time.perf_counter() - t0}


def memmap_npy(path: Path, size: int) -> dict[str, float]:
    def write() -> None:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(3, size, size))
        for y, x, t in tiles(size):
            array[:, y : y + TILE, x : x + TILE] = t
        array.flush()
        del array

    t0 = time.perf_counter()
    peak = measure_peak_memory(write)
    return {"write": peak, "close": 0, "seconds": time.perf_counter() - t0}


def in_memory_tiff(path: Path, size: int) -> dict[str, float]:
    def write() -> None:
        image = np.empty((size, size, 3), np.uint8)
        for y, x, t in tiles(size):
            image[y : y + TILE, x : x + TILE] = t.transpose(1, 2, 0)
        with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tw:
            level = image
            for k in range(6):
                tw.write(
                    level, tile=(256, 256), compression="zlib", photometric="rgb", subfiletype=1 if k else 0
                )
                level = level[::2, ::2]

    t0 = time.perf_counter()
    peak = measure_peak_memory(write)
    return {"write": peak, "close": 0, "seconds": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=8192, help="slide edge in pixels (multiple of 512)")
    args = parser.parse_args()
    size = args.size
    image_bytes = 3 * size * size
    print(f"slide {size} x {size} RGB = {format_bytes(image_bytes)} raw, written in {TILE} x {TILE} tiles\n")
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        rows = [
            ("tilegrad TiffWriter", tilegrad_tiff(tmp / "a.tif", size)),
            ("np.memmap .npy", memmap_npy(tmp / "b.npy", size)),
            ("whole image + tifffile", in_memory_tiff(tmp / "c.tif", size)),
        ]
        print(
            f"{'writer':<24} {'peak writing':>14} {'peak at close':>14} {'peak / image':>13} {'seconds':>8}"
        )
        for name, r in rows:
            peak = max(r["write"], r["close"])
            print(
                f"{name:<24} {format_bytes(r['write']):>14} {format_bytes(r['close']):>14} "
                f"{peak / image_bytes:>13.3f} {r['seconds']:>8.1f}"
            )
        slide = open_image(tmp / "a.tif")
        first = measure_peak_memory(lambda: slide[:, 1000:1512, 1000:1512])  # also opens and parses the file
        region = measure_peak_memory(lambda: slide[:, size - 700 : size - 188, 3000:3512])
        thumb = measure_peak_memory(lambda: thumbnail(slide, 1024))
        whole = measure_peak_memory(slide.read)
        print(f"\nreads of the tilegrad TIFF ({len(slide.levels)} levels):")
        for name, peak in [
            ("first 512 x 512 region (opens the file)", first),
            ("another 512 x 512 region", region),
            ("thumbnail (<= 1024 px, from level 3)", thumb),
            ("whole level 0", whole),
        ]:
            print(f"  {name:<42} {format_bytes(peak):>11}  ({peak / image_bytes:.4f} of the image)")


if __name__ == "__main__":
    main()
