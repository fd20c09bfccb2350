"""Throughput of boundary stores (tilegrad/boundary.py) for tile-sized boxes of a 2D map: the numbers the engine's
cost model uses for the host and disk tiers (NOTE [ Storage tiers ]).

A (1, C, S, S) map (or (1, C, S, S, S) with --ndim 3) is written box by box in raster order, read back, added into (a gradient's read-modify-write),
and read again after its pages were dropped from the page cache (fsync, then posix_fadvise DONTNEED on the file
alone: other processes' cache is untouched), i.e. from the disk itself. Each phase reports GB/s of the map's bytes
(1 GB = 1e9 bytes) and, for reads, how much of the time is the pread itself (the rest is the permute from the
file's (*box, N, C) layout to (N, C, *box)). A TensorStore on the CPU (the device tier when computing on the CPU)
is timed on the same boxes of a smaller map for reference, and so is a plain copy of a box (tensor.clone): on a
machine shared with other jobs, memory bandwidth moves every figure. Run:

    python benchmarks/boundary_io.py --channels 64 --size 8192 --box 512
    python benchmarks/boundary_io.py --ndim 3 --channels 16 --size 256 --box 64 --memory-size 128
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
from tilegrad.boundary import DiskStore, Scratch, TensorStore

NDIM = 2  # spatial dims of the map (--ndim)


def boxes(size: int, box: int):
    """The boxes of a raster-order grid over a size^NDIM map."""
    for corner in itertools.product(range(0, size, box), repeat=NDIM):
        yield tuple(slice(c, min(c + box, size)) for c in corner)


def part(tile: torch.Tensor, b: tuple[slice, ...]) -> torch.Tensor:
    return tile[(slice(None), slice(None), *(slice(0, s.stop - s.start) for s in b))]


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: user + system, all threads) of ``fn()``."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def pread_only(store: DiskStore, size: int, box: int) -> None:
    """The preads of a read (span by span into the staging buffer) without the transpose into (N, C, *box)."""
    for b in boxes(size, box):
        spans = list(store._spans([(s.start, s.stop) for s in b]))
        staging = store._span_staging(spans)
        for offset, _, count, run, step in spans:
            store._span_io(False, staging, offset, count, run, step)


def clones(channels: int, box: int, dtype: torch.dtype, count: int) -> None:
    tile = torch.randn(1, channels, *[box] * NDIM).to(dtype)
    for _ in range(count):
        tile.clone()


def phases(
    store, size: int, box: int, channels: int, dtype: torch.dtype, cold: bool
) -> dict[str, tuple[float, float]]:
    tile = torch.randn(1, channels, *[box] * NDIM).to(dtype)

    def write() -> None:
        for b in boxes(size, box):
            store.write(b, part(tile, b))

    def read() -> None:
        for b in boxes(size, box):
            store.read(b)

    def add() -> None:
        for b in boxes(size, box):
            store.add(b, part(tile, b))

    out = {"write": timed(write), "read (cached)": timed(read), "add": timed(add)}
    if isinstance(store, DiskStore):
        out["read (cached), pread only"] = timed(lambda: pread_only(store, size, box))
        if cold:
            os.fsync(store._fd)
            os.posix_fadvise(store._fd, 0, 0, os.POSIX_FADV_DONTNEED)
            out["read (from disk)"] = timed(read)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=8192, help="side of the map (pixels)")
    parser.add_argument("--ndim", type=int, default=2, choices=(1, 2, 3), help="spatial dims of the map")
    parser.add_argument("--box", type=int, nargs="+", default=[512], help="box side(s) (pixels)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--scratch-dir", default=None, help="default: the system temp directory")
    parser.add_argument(
        "--memory-size", type=int, default=2048, help="side of the map for the TensorStore rows"
    )
    parser.add_argument("--no-cold", action="store_true", help="skip the read after dropping the page cache")
    args = parser.parse_args()
    global NDIM
    NDIM = args.ndim
    torch.set_num_threads(1)
    pin_mmap_threshold("cpu")  # the engine's CPU allocator policy: every box buffer is a fresh mapping
    dtype = getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shape = (1, args.channels, *[args.size] * NDIM)
    nbytes = args.channels * args.size**NDIM * itemsize
    print(
        f"map {shape} {args.dtype} = {format_bytes(nbytes)}, scratch in {args.scratch_dir or tempfile.gettempdir()}"
    )
    print("| store | map | box | phase | seconds | GB/s | CPU seconds | GB/s of CPU time | per box (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for box in args.box:
        count = len(list(boxes(args.size, box)))
        with Scratch(args.scratch_dir, nbytes) as scratch:
            store = DiskStore(shape, dtype, scratch, "map", "cpu")
            for phase, (seconds, cpu) in phases(
                store, args.size, box, args.channels, dtype, not args.no_cold
            ).items():
                moved = nbytes * (2 if phase == "add" else 1)  # add reads and writes the box
                print(
                    f"| DiskStore | {args.size}^{NDIM} x {args.channels} | {box}^{NDIM} | {phase} | {seconds:.2f} | "
                    f"{moved / seconds / 1e9:.2f} | {cpu:.2f} | {moved / max(cpu, 1e-9) / 1e9:.2f} | "
                    f"{1000 * seconds / count:.1f} |",
                    flush=True,
                )
        size = args.memory_size
        memory = TensorStore((1, args.channels, *[size] * NDIM), dtype, "cpu")
        mem_bytes = args.channels * size**NDIM * itemsize
        mem_count = len(list(boxes(size, box)))
        for phase, (seconds, cpu) in phases(memory, size, box, args.channels, dtype, False).items():
            moved = mem_bytes * (2 if phase == "add" else 1)
            print(
                f"| TensorStore (cpu) | {size}^{NDIM} x {args.channels} | {box}^{NDIM} | {phase} | {seconds:.2f} | "
                f"{moved / seconds / 1e9:.2f} | {cpu:.2f} | {moved / max(cpu, 1e-9) / 1e9:.2f} | "
                f"{1000 * seconds / mem_count:.1f} |",
                flush=True,
            )
        memory.close()
        seconds, cpu = timed(lambda b=box, n=mem_count: clones(args.channels, b, dtype, n))
        print(
            f"| plain copy (tensor.clone) | - | {box}^{NDIM} | clone | {seconds:.2f} | "
            f"{mem_bytes / seconds / 1e9:.2f} | {cpu:.2f} | {mem_bytes / max(cpu, 1e-9) / 1e9:.2f} | "
            f"{1000 * seconds / mem_count:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
