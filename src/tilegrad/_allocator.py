"""CPU allocator policy while tilegrad streams: keep the resident set at what the tensors need.

NOTE [ Heap growth under a budget ]
glibc's malloc serves a block above its mmap threshold with a fresh mapping that goes back to the kernel on free,
and a smaller one from the heap, where freed space is reused but fragments. The threshold starts at 128 KiB and is
raised to the size of every mapped block that is freed (up to 32 MiB), so from the first tile on most activation
buffers come from the heap, and fragmentation grows the resident set to 1.5-2x the bytes ever live at once
(measured: MONAI UNet 16-32-64 on 96^3 in 64^3 tiles, 34 MiB resident for 18.6 MiB predicted; UNet 8-16-32 in one
96^3 tile, 50 MiB for 32.3 MiB, over a 48 MiB budget). When tilegrad streams on the CPU (``infer`` with a
budget, a ``StreamingModule`` running tiles) it therefore fixes the threshold (``mallopt(M_MMAP_THRESHOLD)``) for
the rest of the process: at 128 KiB, tile buffers were mapped and unmapped per use, and the measured peaks became 18
and 32 MiB, as predicted. On other C libraries nothing is changed. The same holds for streamed training: ResNet-34 at 4096 x 4096 with a fixed 1024 tile measured 2.34 GiB resident for
1.95 GiB predicted under glibc's default policy. Set ``TILEGRAD_KEEP_MALLOC=1`` to leave glibc's policy alone.

For the streamed engine (``StreamingModule``) the threshold is 4 MiB, and the engine hands the heap's free pages back to the kernel (``malloc_trim``)
after each segment's tiles, forward and backward (``trim_heap``). A threshold of 128 KiB mapped nearly every tile
buffer afresh, and each of its pages faulted on first touch: MONAI UNet 16-32-64-128 at 160^3 under 138 MiB took
about a million minor faults per step, 1.3 s of its 5.3 s CPU. Tiles of one segment have (nearly) the same shapes,
so below the threshold they reuse the heap's chunks without faulting; between segments, where shapes change, the
trim returns what fragmentation would otherwise keep. Measured on that step (one process each, load 5): 128 KiB
without trim 5.3-5.4 s CPU, peak 110 MiB; 2, 4 and 8 MiB with the trim 3.8-4.3 s, 108.6 MiB; 1 / 2 / 16 MiB without
it 5.0 / 4.4-4.9 / 3.7 s, 117 / 124-129 / 138 MiB; 32 MiB with the trim 3.7 s, 115 or 156 MiB (run to run).
Without a backward there is no such reuse to keep: a forward without gradients trims after every tile, and
``tilegrad.infer`` keeps 128 KiB (MONAI UNet 16-32-64 on 96^3 under 24 MiB measured 24.1 and 32.4 MiB with 4 MiB).
The trim costs little there: timed inside segmented ``tilegrad.infer`` (``benchmarks/heap_trim.py``, MONAI UNet
16-32-64 at 128^3 under 40 MiB, 28 trims, load 2.0), 0.003 s of 3.0 s CPU (0.1%, about 0.1 ms a call), so it stays
per tile. Only work on the CPU is trimmed (``trim_heap(device)``): on CUDA a tile's tensors live in device memory; what it
leaves on this heap is the CPU staging of lazy-input and disk-tier boxes, one box at a time, not trimmed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

import torch

__all__ = ["pin_mmap_threshold", "trim_heap"]

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
INFER_THRESHOLD = 128 * 1024  # tilegrad.infer: measured peaks as predicted (above)
STREAM_THRESHOLD = 4 * 2**20  # the streamed engine, which trims the heap between segments (below)
_pinned: int | None = None  # the threshold fixed last
_trim = None  # glibc's malloc_trim, once a threshold is fixed


def pin_mmap_threshold(device: torch.device | str = "cpu", threshold: int = INFER_THRESHOLD) -> None:
    """NOTE [ Heap growth under a budget ]: a fixed mmap threshold, on glibc, for CPU work (set again when a caller
    asks for another one)."""
    global _pinned, _trim
    if _pinned == threshold or torch.device(device).type != "cpu" or not sys.platform.startswith("linux"):
        return
    _pinned = threshold
    if os.environ.get("TILEGRAD_KEEP_MALLOC"):
        return
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is not None and mallopt(_M_MMAP_THRESHOLD, threshold):
        _trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
        log.info("tilegrad fixed glibc's mmap threshold at %d KiB (TILEGRAD_KEEP_MALLOC=1 keeps the default)",
                 threshold // 1024)  # fmt: skip


def trim_heap(device: torch.device | str = "cpu") -> None:
    """NOTE [ Heap growth under a budget ]: the heap's free pages back to the kernel, where the threshold is fixed,
    after CPU work (on another device the tiles' tensors are not on this heap: nothing to hand back)."""
    if _trim is not None and torch.device(device).type == "cpu":
        _trim(0)
