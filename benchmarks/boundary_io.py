"""Throughput of boundary stores (tilegrad/boundary.py) for tile-sized boxes: the numbers the planner's cost model
uses for the disk tier (plan.py: DISK_WRITE, DISK_READ, DISK_ADD, DISK_COLD_READ; NOTE [ Storage tiers ]).

A (1, C, R, S) map (--rows R, default S; or (1, C, S, S, S) with --ndim 3) in a DiskStore is used as the engine uses
a boundary: its producer writes disjoint cores (--write-box, default --box) in raster order; its readers read
overlapping boxes, a core of --box grown by --halo on each side (clipped to the map), in raster order; the gradient
gets adds into the same boxes (read-modify-write). Then the file's pages are dropped from the page cache (fsync, then
posix_fadvise DONTNEED on the file alone: other processes' cache is untouched) and the boxes are read, and added
into, again: from the disk itself. Each phase reports GB/s of the boxes' bytes (1 GB = 1e9 bytes; an add counts
once, like the cost model's DISK_ADD), in wall and in CPU time (user + system of this process). A plain copy of a
box (tensor.clone) is timed for scale: on a machine shared with other jobs, memory bandwidth moves every figure.

The script uses the stores' public interface only, so the same command measures another checkout of tilegrad
(PYTHONPATH=<checkout>/src) for an A/B of file layouts (BENCHMARKS.md: the chunked layout tried in the seventh
session, commit 3325d66). Run:

    python benchmarks/boundary_io.py --channels 64 --size 16384 --rows 1024 --box 364 --halo 48
    python benchmarks/boundary_io.py --ndim 3 --channels 16 --size 80 --box 40 --halo 8
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time

import torch

from tilegrad import format_bytes
from tilegrad._allocator import pin_mmap_threshold
from tilegrad.boundary import DiskStore, Scratch


def grid(shape: tuple[int, ...], core: int, halo: int):
    """The boxes of a raster-order grid of cores ``core`` wide, each grown by ``halo`` and clipped to ``shape``."""
    for corner in itertools.product(*(range(0, s, core) for s in shape)):
        yield tuple(slice(max(c - halo, 0), min(c + core + halo, s)) for c, s in zip(corner, shape))


def sizes(box: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


def timed(fn) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of this process: user + system, all threads, bytes) of ``fn()``."""
    start, cpu = time.perf_counter(), time.process_time()
    nbytes = fn()
    return time.perf_counter() - start, time.process_time() - cpu, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=8192, help="side of the map (pixels)")
    parser.add_argument("--rows", type=int, default=None, help="2D: rows of the map (default: --size)")
    parser.add_argument("--ndim", type=int, default=2, choices=(1, 2, 3), help="spatial dims of the map")
    parser.add_argument("--box", type=int, default=512, help="core of a reader's box (pixels)")
    parser.add_argument(
        "--halo", type=int, default=0, help="a reader's box: its core grown by this on each side"
    )
    parser.add_argument("--write-box", type=int, default=None, help="the producer's cores (default: --box)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--scratch-dir", default=None, help="default: the system temp directory")
    parser.add_argument(
        "--no-cold", action="store_true", help="skip the phases after dropping the page cache"
    )
    parser.add_argument("--label", default="", help="printed in the first column (the checkout measured)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pin_mmap_threshold("cpu")  # the engine's CPU allocator policy
    dtype = getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    spatial = (args.size,) * args.ndim
    if args.rows is not None and args.ndim >= 2:
        spatial = (args.rows, *spatial[1:])
    shape = (args.batch, args.channels, *spatial)
    nbytes = args.batch * args.channels * itemsize
    for s in spatial:
        nbytes *= s
    write_box = args.write_box or args.box
    reads = list(grid(spatial, args.box, args.halo))
    writes = list(grid(spatial, write_box, 0))
    biggest = max(reads, key=lambda b: torch.Size(sizes(b)).numel())
    tile = torch.randn(args.batch, args.channels, *sizes(biggest)).to(dtype)

    def part(b: tuple[slice, ...]) -> torch.Tensor:
        return tile[(slice(None), slice(None), *(slice(0, n) for n in sizes(b)))]

    with Scratch(args.scratch_dir, nbytes) as scratch:
        store = DiskStore(shape, dtype, scratch, "map", "cpu")
        chunk = getattr(store, "chunk", None)  # a chunked layout's chunk (commit 3325d66)
        print(
            f"map {shape} {args.dtype} = {format_bytes(nbytes)}, {len(writes)} cores of {write_box}, {len(reads)} "
            f"boxes of {args.box} + halo {args.halo}, chunk {chunk or 'none (file is (*spatial, N, C))'}, scratch "
            f"in {args.scratch_dir or tempfile.gettempdir()}"
        )

        def write() -> int:
            for b in writes:
                store.write(b, part(b))
            return nbytes

        def read() -> int:
            total = 0
            for b in reads:
                total += store.read(b).numel() * itemsize
            return total

        def add() -> int:
            for b in reads:
                store.add(b, part(b))
            return sum(part(b).numel() * itemsize for b in reads)

        def clone() -> int:
            total = 0
            for b in reads:
                total += part(b).clone().numel() * itemsize
            return total

        def drop() -> None:
            os.fsync(store._fd)
            os.posix_fadvise(store._fd, 0, 0, os.POSIX_FADV_DONTNEED)

        phases = [("write", write), ("read (page cache)", read), ("add (page cache)", add)]
        if not args.no_cold:
            phases += [("drop", drop), ("read (from disk)", read), ("drop", drop), ("add (from disk)", add)]
        phases.append(("clone of each box", clone))
        for name, fn in phases:
            if name == "drop":
                fn()
                continue
            seconds, cpu, moved = timed(fn)
            print(
                f"| {args.label} | {'x'.join(map(str, spatial))} x {args.channels} | {chunk} | {args.box}+{args.halo} "
                f"| {name} | {seconds:.2f} | {moved / seconds / 1e9:.2f} | {cpu:.2f} | {moved / max(cpu, 1e-9) / 1e9:.2f} "
                f"| {1000 * seconds / len(writes if name == 'write' else reads):.1f} |",
                flush=True,
            )
        store.close()


if __name__ == "__main__":
    main()
