"""Planner: given a trunk, an input shape and a tile size or a memory budget, decide how to stream it.

A plan cuts the trunk's traced graph into *segments* (tilegrad/graph.py, NOTE [ Segments over a graph ]). Each
segment is streamed tile by tile with only its own halo; the tensors between segments (*boundaries*, skip tensors
included) are stored whole in a storage tier (tilegrad/boundary.py: the compute device, host memory, or a scratch
directory on disk). One segment is the leanest plan: memory is one tile's activations plus the input and the
parameters, whatever the image size, but every tile carries the whole trunk's halo. More segments mean smaller
halos (less recomputation) in exchange for storing the boundaries. With a streamed head (tilegrad/heads.py) the
trunk's output is never stored: the last segment's tiles feed the head's reduction directly.

NOTE [ Cost model ]
One number per plan, ``time_ratio``: predicted time of a training step over that of the conventional step
(forward + backward = 3 forward passes). In seconds:
* compute: a forward pass of a segment over the image takes its FLOPs at ``FLOP_RATE`` plus the bytes its nodes
  write at ``BYTE_RATE`` (element-wise layers, normalisation and few-channel 3D convolutions are bound by memory:
  FLOPs alone made a 3D U-Net's conventional step 3x too fast and every fixed cost 3x too heavy against it); a
  streamed segment costs 4 such passes (forward, recompute, backward = 2) times its *overlap* (window area read
  over all tiles / image area); a kept segment (one tile, graph kept: NOTE [ Kept segments ] in execute.py) costs
  the conventional 3;
* depthwise convolutions run far below those rates on the CPU: ``DEPTHWISE_CONV`` times their FLOPs and bytes;
* per tile: a fixed overhead (Python, dispatch, first touch of fresh buffers) per tile pass, ``TILE_SECONDS`` plus
  ``NODE_SECONDS`` per node of the segment;
* small-tile kernels: PyTorch runs a CPU convolution on oneDNN only above a size (for 3D, N*C*D*H > 20480 of its
  input); below it the native unfold kernel costs ``SLOW_CONV`` times as much per output (16->32 and 64->128 3D
  convolutions: 2.5-3.3x measured). A convolution that the whole image runs on oneDNN and a tile's box (the window
  over its input's scale) does not has its FLOPs counted ``SLOW_CONV`` times in that segment's passes: in float32
  only in the backward's 2 passes, since the engine runs the forward and the recomputation on oneDNN (NOTE
  [ Small-tile convolutions on oneDNN ] in execute.py: no oneDNN backward is exposed);
* disk: bytes written, read and added into by boundaries on the disk tier at ``DISK_WRITE``, ``DISK_READ`` (from
  the page cache) or ``DISK_COLD_READ`` (from the disk), and ``DISK_ADD`` bytes per second (sources are read once
  per tile, overlap included; gradients are read-modify-written): NOTE [ Page cache ].
Statistics (NOTE [ Streamed statistics ] in statistics.py) cost no pass of the segments: they are accumulated from
the cores their input's segment writes, and their gradient is added in that segment's backward; their own work (a
sum and a variance of each core, the gradient's share) is ``STAT_TRAFFIC`` times their input's bytes at
``BYTE_RATE``; inside a whole piece (NOTE [ Whole pieces ] in graph.py) they are the layers' own. A statistic's
input is stored or recomputed by its readers (NOTE [ Recomputed statistic inputs ] in statistics.py): no new term
prices the choice, the plan's segments differ (the readers' segments hold the nodes computing the input, so their
passes, overlap, tile fixed costs and working sets count the recomputation, and the input's boundary has no store,
no disk IO and no device bytes); ``recomputed`` tries each statistic input of the chosen plan and keeps the faster
plan that fits. The rates are this
machine's (a CPU core pair, float32); a ratio only needs them in the right proportion. Device
memory is a sweep over the steps of a training step (forward over segments, backward in reverse): the parameters
and their gradients, the input (if in memory), the boundaries and boundary gradients alive on the device at that
step, and the step's tile working set (NOTE [ Tile memory ]). Host and disk bytes are reported, not budgeted.

NOTE [ Page cache ]
A boundary on the disk tier is written by its producer and read back soon after (its readers' forward, their
backward's recomputation, its gradient by the producer's backward): while the files fit in the memory the machine
has free, the kernel's page cache serves those reads, which then cost a copy (``DISK_READ``) rather than the disk
(``DISK_COLD_READ``, 2.4x slower in wall time on this machine). Which reads the cache serves is decided like an LRU
cache of ``page_cache_bytes`` (the available memory, less the budget on the CPU; on CUDA the budget is device
memory, another pool than host RAM): the step's touches of disk-tier stores are listed in order (forward, then
backward in reverse); for a read of a store of S bytes, *newer* is the bytes of the
live stores touched since its last pass, *beside* those touched in that same step (tiles interleave them with it:
the cache holds them in proportion) and *during* those the reading step touches too. A training step mostly scans a
store in the reverse order of its previous pass (NOTE [ Tile order ] in execute.py): the reader starts on the part
the cache still holds, held = (C - newer) * S / (S + beside), while what it touches meanwhile evicts the other end,
so a share held / (S + during), at most 1, is served from the cache. In the same order (inference), LRU misses
everywhere once the store no longer fits: a read is served whole if newer + beside + S + during / 2 <= C, else not
at all. At 65536^2 the maps (8-64 GiB) dwarf the cache and most reads go to the disk either way; at 16384^2
(1-4 GiB maps, 23 GiB of them with gradients) the cache serves them. A gradient store is freed after its producer's backward;
its first adds read unwritten (zero) blocks, which costs no disk read. Writes go to the cache and are written back
in the background: the model does not charge the disk's write bandwidth (0.15-0.3 GB/s here), which a plan writing
faster than that for minutes would hit. Fitted on one machine (23 GiB of RAM, a virtual disk): rates and cache size
are this machine's.

NOTE [ Tile memory ]
A tile's working set is the sources it reads, what autograd saves while it is recomputed (the segment's saved bytes
on the whole image, scaled by the window's share of the image) and a transient of ``BACKWARD_TRANSIENT`` times its
largest tensor (gradient buffers, convolution workspaces). A segment whose backward does not recompute its last
convolution (NOTE [ Last convolution not recomputed ] in execute.py: in a network cut at every normalisation,
nearly every segment) holds less: ``TAIL_TRANSIENT`` times its largest tensor plus that convolution's backward
workspace at the tile's box (memory/kernels.py; the unfold kernel's is 27x its input in 3D). Measured on MONAI UNet
16-32-64-128 at 160^3 (tiles of 56-160 px, batch norm): 0.7-1.1x of this prediction, where the 6.5 rule gave
0.6-0.9x (and 2.3x under a tile that ran the unfold kernel). With a fixed tile and no budget, the tile sets the limit:
any plan whose predicted peak is at most the one-segment plan's plus half of one tile's working set may be chosen,
so memory stays flat in the image size and the planner cuts more (and stores more, on disk if needed) as the image
grows.

NOTE [ Inference tile memory ]
Without gradients a tile holds only what is alive at each node, and a CPU convolution adds scratch that can dwarf
it: below a size (for 3D, N*C*D*H <= 20480 of its input) PyTorch runs the native unfold kernel, which builds
C_in x 27 x its output positions (memory/kernels.py), 54x a 2-channel map. So a segment's inference working set is
a sweep over its nodes in order at the tile's boxes (a node's box: the window over its scale, at most its map): the
sources' boxes for the whole tile (the image in memory is read as a view, which a convolution copies while it reads
a box of it), each result until its last reader (an alias, such as eval-mode dropout or an identity, shares its
input's memory: ``NodeProfile.alias``), and at each convolution the scratch of the kernel PyTorch picks for its
box. A grid's edge tiles are smaller, and a smaller box can drop a convolution onto the unfold kernel: MONAI UNet
16-32-64 at 128^3 in 80^3 windows ran a 16->16 convolution of an 80x54x80 edge tile with 75 MiB of scratch, the
80^3 tiles with oneDNN's 8 MiB. The sweep is therefore repeated at each of the grid's tile shapes (products of the
distinct window lengths per dim, ``tiling.grid_lengths``) that raises some convolution's scratch; any other shape
holds less than the largest. (In float32 the engine runs a plain convolution's forward on oneDNN where PyTorch
would pick the unfold kernel, NOTE [ Small-tile convolutions on oneDNN ] in execute.py: its scratch is oneDNN's
there.) A plan's steps (``_inference_steps``): a store on the device lives from its
producer's start to its last reader's end (the engine frees it there); the producer's own store, and the output
for the last segment, fill tile by tile, so its tiles run next to at most all of it, a one-tile segment next to
none of it until its result is written; a one-tile segment reads a whole map on the device as a view. The rule
this replaced (the sources plus twice the largest tensor, or the whole model simulated on the whole image and
scaled per pixel) left the scratch of small tiles out: measured peaks were 2-6x the prediction; with the sweep,
0.93-1.09x for the segmented MONAI 3D UNets measured (benchmarks/infer_memory.py, warm calls; NOTE [ What a budget
covers ] in infer.py for the first call in a process). Not yet as close elsewhere (a review, warm calls): float64
2D transposed convolutions 1.18-1.55x (their unfold scratch grows with the batch, modelled per sample), a 3D
transposed-convolution net at 64^3 1.45-1.62x, a MONAI 2D UNet at 384^2 1.7x (about 1.5 MiB).

The search: the conventional step (if it fits), the one-segment plan, the stage cuts, all candidate cuts (stage cuts
and block outputs, graph.py), and greedy descents that toggle one cut at a time while the plan gets faster (or,
while nothing fits, leaner): over the stage cuts, then over every candidate. For each cut set, each
segment takes the fastest tile that fits next to what else is alive at its step; boundaries move to disk (largest
first) when the device budget is too small for them (``tiers="auto"``). Each window of the ladder is shrunk to the
smallest with the same tile count (NOTE [ Balanced tiles ]); the chosen plan's windows are then refined between the
ladder's rungs (NOTE [ Tile refinement ]), after its runs of one-tile segments are tried as whole pieces
(NOTE [ Whole pieces ] in graph.py, ``wholes``). While the budget is too small, boundary maps go to disk (largest
first) before boundary gradients, which live only from a reader's backward to their producer's.

NOTE [ Planning cost ]
The search builds a few hundred cut sets, each of a dozen segments over a ladder of some 40 tile sizes. What makes
that take seconds rather than minutes at 65536^2: a segment is the same object in every cut set that contains it
(TrunkGraph keeps one per output and sources), so its geometry is propagated once and its plan at each tile size
is made once (``segment_plan``, ``options``: cached per segment, never mutated; a plan copies what it changes); a
candidate's tile grid is summarised (tiles, largest window, area read) from the periodic runs of its cores
(NOTE [ Periodic cores ] in tiling.py) and listed only when the chosen plan runs (``SegmentPlan.grid``); a
segment whose step is over the budget walks down its options to the first that fits that step without
re-evaluating the plan at each one (the other terms of a step do not depend on the segment's tile).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ._autocast import without_autocast
from .errors import ConfigError, GeometryError, MemoryBudgetError, ShapeError
from .geometry.trace import ACROSS_BATCH
from .graph import Segment, TrunkGraph, last_convolution, zero_padded_torch_conv
from .options import (
    batch_tiles_option,
    budget_option,
    mode_option,
    require_budget,
    shape_option,
    tile_size_option,
)
from .segment import Unit, units_of
from .tiling import TileGrid, dim_summary, grid_lengths, grid_summary, plan_dim, tile_grid
from .typing import Bytes
from .units import format_bytes

__all__ = ["BoundaryPlan", "Plan", "SegmentPlan", "Unit", "plan_streaming", "units_of"]

_CONV = torch.ops.aten.convolution.default

# FLOP/s (FlopCounterMode counts 2 per multiply-add) of float32 convolutions on this CPU: the ResNet-34 trunk's
# conventional step at 4096^2 (7.3e12 FLOP) took 61 s on a quiet machine
FLOP_RATE = 1.2e11
# bytes/s at which a step writes its tensors (element-wise layers, normalisation, few-channel 3D convolutions are
# bound by memory, not FLOPs): fitted, together with FLOP_RATE, to the warm conventional steps of ResNet-34 at
# 1024^2 (153 GFLOP, 1.0 GiB written per forward, 4.6 s) and MONAI UNet 16-32-64-128 at 160^3 (14.6 GFLOP, 0.5 GiB,
# 1.1 s); FLOPs alone predicted the UNet's step 3x too fast
BYTE_RATE = 2.2e9
# a depthwise convolution (groups == input channels) costs this many times its FLOPs and bytes at the rates above:
# measured forward + backward per layer against ResNet-34's 3x3 convolutions in the same process (EfficientNet-B0's
# 16 depthwise layers at 512^2 and 1024^2: 3.7-4.9x of what the rates predict, where the 3x3 ones are at 1.0); the
# rates alone made EfficientNet-B0's conventional step 1.7x too fast and every fixed cost too heavy against it
DEPTHWISE_CONV = 4.0
# fixed cost of one tile pass (Python, dispatch, first touch of fresh buffers): a base plus a share per node of the
# segment, so that a whole ResNet-34 trunk (232 nodes) costs the 25 ms per tile measured for issue 2 and a few
# layers 2-4 ms (an 8-layer 2D net at 1536^2: 96 px tiles, 361 of them, against 192 px, 81: 4 ms per tile, forward
# and backward)
TILE_SECONDS = 0.002
NODE_SECONDS = 1e-4
# bytes/s of a DiskStore (NOTE [ Page cache ]), measured by benchmarks/boundary_io.py on this machine as the engine
# uses a boundary at 65536^2 (BENCHMARKS.md, "Boundary storage", seventh session: bands of ResNet-34's layer1, layer2
# and layer4 maps, cores written, halo boxes read and added, load 1-3.7), CPU time: a write into the page cache
# 0.62-0.83; a read from it 0.79-1.09 (into a fresh tensor, whose pages fault on first touch); an add (read-modify-
# write through a staging buffer that stays in the CPU cache) 1.1-1.5 of the box's bytes; a read from the disk itself
# 0.40-0.61 in wall time (medians of 4; this VM's disk is the host's cache as much as a disk). The fourth session's
# figures (one 4096^2 map, 512^2 boxes without halo) were write 0.9, read 0.7, add 1.1, disk 0.29.
DISK_WRITE = 0.7e9
DISK_READ = 0.95e9
DISK_ADD = 1.4e9
DISK_COLD_READ = 0.4e9
# bytes of page cache the scratch files may use (NOTE [ Page cache ]); None: the machine's available memory
# (MemAvailable) when planning, less the memory budget when the step computes on the CPU (on CUDA the budget is
# device memory; the pinned host tier is not subtracted either), rounded down to whole GiB
PAGE_CACHE: int | None = None
# passes a streamed statistic makes over its input, in units of its input's bytes (NOTE [ Streamed statistics ] in
# statistics.py): forward, the partials (a float64-accumulated sum, a variance); training adds the backward's share
# of the gradient (one multiply-add into the gradient read from the store, and that gradient's read); an estimate
STAT_TRAFFIC = {False: 2.0, True: 4.0}
BACKWARD_TRANSIENT = 6.5  # training working set beyond saved tensors, in units of the largest tensor
# the same for a segment whose backward skips its last convolution (NOTE [ Tile memory ]), next to that convolution's
# own workspace: fitted to the tiles of MONAI UNet 16-32-64-128 at 160^3 (measured 0.6-0.9x of the 6.5 rule)
TAIL_TRANSIENT = 3.0
# a convolution that a small tile drops below PyTorch's oneDNN cutoff runs the native unfold kernel: this many times
# the time per output of the oneDNN kernel (NOTE [ Cost model ]; 2.5-3.3x measured for 16->32 and 64->128 3D convs)
SLOW_CONV = 2.5
FORWARD_TRANSIENT = 2.0  # training: a forward step's working set, in units of the largest tensor
BUDGET_SAFETY = 0.8  # share of a user budget the planner plans for (the rest: allocator slack)
FIXED_TILE_EXTRA = 0.5  # NOTE [ Tile memory ]: extra room of a fixed tile without budget, in tiles
TIERS = ("auto", "device", "host", "disk", "recompute")
RECOMPUTE_TRIES = 6  # statistic inputs tried in a row without a faster plan before the search for them stops


def page_cache_bytes(budget: int | None, device: torch.device | str = "cpu") -> int:
    """Bytes of page cache the scratch files of a step may use (NOTE [ Page cache ]): ``PAGE_CACHE`` if set, else
    the machine's available memory (MemAvailable, which counts the page cache the kernel can reclaim) less the
    memory budget when the step computes on the CPU (on CUDA the budget is device memory, another pool), rounded
    down to whole GiB so that plans do not change with every page; 0 where it cannot be read."""
    if PAGE_CACHE is not None:
        return PAGE_CACHE
    host_budget = budget if torch.device(device).type in ("cpu", "meta") else None
    free = max(0, _available_bytes() - (host_budget or 0))
    return free // 2**30 * 2**30


def _available_bytes() -> int:
    """The machine's MemAvailable in bytes, 0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            return 1024 * next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0


def reversed_tiles(segments: int, head: bool) -> list[tuple[bool, bool]]:
    """Whether each segment's forward and its backward run their tiles in reverse raster order in a training step:
    NOTE [ Tile order ] in execute.py. The backward runs the other way from the forward, but the first segment's
    backward always runs in raster order (a GradientSink takes the input gradient in raster order), also when it is
    the one segment and a head makes its forward run in raster order too."""
    forward = [k % 2 == 0 for k in range(segments)]
    if head and forward:
        forward[-1] = False
    backward = [not f for f in forward]
    if backward:
        backward[0] = False
    return list(zip(forward, backward))


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass
class SegmentPlan:
    """How one segment runs: its tile (a window of the image, in image pixels), grid and working set."""

    segment: Segment
    tile: tuple[int, ...]
    in_shape: tuple[int, ...]  # the image's shape (windows are in image pixels)
    out_shape: tuple[int, ...]
    tiles: int  # the grid's, summarised (tiling.grid_summary: candidates' tiles are never listed)
    max_in_shape: tuple[int, ...]
    input_area: int
    tile_train_bytes: int = 0
    tile_forward_bytes: int = 0
    tile_saved_bytes: int = 0
    tile_end_bytes: int = 0  # inference: held when the segment returns (NOTE [ Inference tile memory ])
    flops: float = 0.0
    keep: bool = False  # NOTE [ Kept segments ] in execute.py
    slow_flops: float = 0.0  # of convolutions the tile drops onto the slow kernel (NOTE [ Cost model ])
    # NOTE [ IO overlap ] in execute.py: extra working set of its backward / forward tiles while IO runs beside them
    io_bytes: int = 0
    io_forward_bytes: int = 0

    @property
    def name(self) -> str:
        return self.segment.name

    @property
    def overlap(self) -> float:
        """Image pixels read over all windows / image pixels: 1.0 means no recomputation of halos."""
        return self.input_area / math.prod(self.in_shape[2:])

    @functools.cached_property
    def grid(self) -> TileGrid:
        """The tiles, listed when the plan runs."""
        return tile_grid(self.segment.geometry, self.in_shape[2:], self.out_shape[2:], self.tile)

    @property
    def chain(self) -> nn.Module:
        """The module computing this segment from its sources."""
        return self.segment.module


@dataclass
class BoundaryPlan:
    """A tensor between segments: where it and its gradient live (NOTE [ Storage tiers ] in boundary.py)."""

    name: str
    shape: tuple[int, ...]
    nbytes: int
    tier: str = "device"
    grad_tier: str = "device"


@dataclass
class Plan:
    """A streaming plan for one input shape. ``conventional`` plans run the trunk unstreamed."""

    input_shape: tuple[int, ...]
    segments: list[SegmentPlan]
    conventional: bool
    peak_bytes: int
    forward_peak_bytes: int
    time_ratio: float
    budget: int | None = None
    notes: list[str] = field(default_factory=list)
    training: bool = True
    boundaries: list[BoundaryPlan] = field(default_factory=list)
    head: str | None = None
    graph: TrunkGraph | None = field(default=None, repr=False)
    conventional_seconds: float = 0.0
    time_parts: dict[str, float] = field(default_factory=dict)  # time_ratio's parts (_Planner.time_parts)

    @property
    def tile_size(self) -> tuple[int, ...]:
        """Tile size in input-image pixels (the first segment's tile)."""
        return self.segments[0].tile

    @property
    def host_bytes(self) -> int:
        return sum(b.nbytes for b in self.boundaries if b.tier == "host") + sum(
            b.nbytes for b in self.boundaries if self.training and b.grad_tier == "host"
        )

    @property
    def disk_bytes(self) -> int:
        return sum(b.nbytes for b in self.boundaries if b.tier == "disk") + sum(
            b.nbytes for b in self.boundaries if self.training and b.grad_tier == "disk"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": list(self.input_shape),
            "conventional": self.conventional,
            "peak_bytes": self.peak_bytes,
            "host_bytes": self.host_bytes,
            "disk_bytes": self.disk_bytes,
            "time_ratio": self.time_ratio,
            "time_parts": dict(self.time_parts),
            "head": self.head,
            "segments": [
                {
                    "layers": s.name,
                    "tile": list(s.tile),
                    "tiles": s.tiles,
                    "overlap": s.overlap,
                    "kept": s.keep,
                    "whole": s.segment.whole,
                    "sources": [n.name for n in s.segment.sources],
                }
                for s in self.segments
            ],
            "boundaries": [dataclasses.asdict(b) for b in self.boundaries],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        px = "x".join(map(str, self.input_shape[2:]))
        if self.conventional:
            what = "conventional (unstreamed)"
        else:
            what = f"{len(self.segments)} segment(s), {sum(not s.keep for s in self.segments)} streamed"
        lines = [
            f"input {'x'.join(map(str, self.input_shape))}: {what}, predicted peak {format_bytes(self.peak_bytes)}"
            + (f" (budget {format_bytes(self.budget)})" if self.budget else "")
            + f", predicted time x{self.time_ratio:.2f} of conventional"
            + (
                f" (compute x{self.time_parts['compute']:.2f}, halo overlap +{self.time_parts['overlap']:.2f}, "
                f"tiles +{self.time_parts['tiles']:.2f}, "
                + (
                    f"slow small-tile kernels +{self.time_parts['kernels']:.2f}, "
                    if self.time_parts.get("kernels")
                    else ""
                )
                + f"disk +{self.time_parts['disk']:.2f}"
                + (
                    f", statistics +{self.time_parts['statistics']:.2f}"
                    if self.time_parts.get("statistics")
                    else ""
                )
                + ")"
                if self.time_parts
                else ""
            )
            + (f", head {self.head}" if self.head else "")
        ]
        if not self.conventional:
            for seg in self.segments:
                if seg.keep:
                    lines.append(
                        f"  {seg.name}: whole map, graph kept (no recomputation"
                        + (", statistics inside" if seg.segment.whole else "")
                        + f"), {format_bytes(seg.tile_saved_bytes)} saved for backward"
                    )
                    continue
                work = seg.tile_train_bytes if self.training else seg.tile_forward_bytes
                lines.append(
                    f"  {seg.name}: tile {'x'.join(map(str, seg.tile))} of {px} image px, {seg.tiles} tiles, "
                    f"overlap x{seg.overlap:.2f}, tile {'training' if self.training else 'forward'} peak "
                    f"{format_bytes(work)}"
                    + (
                        f", IO beside the tiles +{format_bytes(seg.io_forward_bytes)} forward"
                        + (f", +{format_bytes(seg.io_bytes)} backward" if self.training else "")
                        if seg.io_bytes or seg.io_forward_bytes
                        else ""
                    )
                )
            if self.boundaries:
                by_tier: dict[str, int] = {}
                stored = [b for b in self.boundaries if b.tier != "recompute"]
                for b in stored:
                    by_tier[b.tier] = by_tier.get(b.tier, 0) + b.nbytes
                    if self.training:
                        by_tier[b.grad_tier] = by_tier.get(b.grad_tier, 0) + b.nbytes
                tiers = ", ".join(f"{t} {format_bytes(n)}" for t, n in sorted(by_tier.items()))
                grads = " (with gradients)" if self.training else ""
                lines.append(f"  boundaries: {len(stored)} tensors{grads}: {tiers or 'none'}")
                again = [b for b in self.boundaries if b.tier == "recompute"]
                if again:
                    lines.append(
                        f"  recomputed by their readers, not stored: {len(again)} statistic inputs "
                        f"({format_bytes(sum(b.nbytes for b in again))})"
                    )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _tile_ladder(spatial: Sequence[int]) -> list[tuple[int, ...]]:
    """Tile sizes to try: a geometric ladder (ratio 2^(1/4), multiples of 8) from 48 px up to the whole image."""
    sizes: set[int] = set()
    top = max(spatial)
    t = 48.0
    while t < top:
        sizes.add(round(t / 8) * 8)
        t *= 2**0.25
    sizes.add(top)
    return [tuple(min(s, d) for d in spatial) for s in sorted(sizes)]


@functools.lru_cache(maxsize=65536)
def _balanced_dim(dim: Any, align: int, in_len: int, out_len: int, tile: int, axis: int) -> int:
    """One axis of NOTE [ Balanced tiles ]: the smallest window giving as many tiles as ``tile`` does."""
    n, longest, total = dim_summary(dim, align, in_len, out_len, tile, axis)
    if n == 1:
        return min(tile, in_len)
    if n > 4 or n * longest - total < longest // 2:
        return tile
    lo, hi = 1, tile  # hi gives n tiles: the smallest window that still does, by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            fits = dim_summary(dim, align, in_len, out_len, mid, axis)[0] <= n
        except GeometryError:
            fits = False
        if fits:
            hi = mid
        else:
            lo = mid + 1
    return hi


def _conv_kernel(shape: Sequence[int], spatial: Sequence[int], w: torch.Tensor, conf: tuple) -> str:
    """The name of the CPU kernel PyTorch selects for a convolution (weight ``w``, ``conf``: stride, padding,
    dilation, transposed, output padding, groups) on an input of ``shape`` cropped to ``spatial``."""
    from .memory.kernels import select_conv_backend

    x = torch.empty((*shape[:2], *spatial), device="meta", dtype=w.dtype)
    b = select_conv_backend(x, w, *conf)
    return b.name if hasattr(b, "name") else str(b)


def _min_tile(geometry: Any, in_shape: Sequence[int], out_shape: Sequence[int], axis: int) -> int:
    try:
        plan_dim(geometry.dims[axis], geometry.align[axis], in_shape[axis], out_shape[axis], 1, axis)
    except GeometryError as err:
        return int(getattr(err, "minimum", 1))
    return 1


class _Planner:
    """The parts of one planning call (NOTE [ Cost model ])."""

    def __init__(
        self,
        graph: TrunkGraph,
        *,
        training: bool,
        input_in_memory: bool,
        input_grad: bool,
        output_in_memory: bool,
        head_flops: float,
        head: str | None,
        tiers: str,
        batch_tiles: int,
        page_cache: int | None = None,
    ):
        self.g = graph
        self.page_cache = page_cache_bytes(None) if page_cache is None else page_cache
        self.training = training
        self.input_in_memory = input_in_memory
        self.input_grad = input_grad
        self.output_in_memory = output_in_memory and head is None
        self.head = head
        self.head_flops = head_flops
        self.tiers = tiers
        self.batch_tiles = batch_tiles
        self.dtype = graph.dtype
        self.image = graph.input_shape
        self.ladder = _tile_ladder(self.image[2:])
        self.total_flops = sum(p.flops for p in graph.profiles.values()) + head_flops or 1.0
        # seconds of one conventional forward pass (NOTE [ Cost model ])
        written = sum(p.out_bytes for p in graph.profiles.values())
        self._slow_nodes = self._depthwise_extra()
        self.total_seconds = (
            self.total_flops / FLOP_RATE + written / BYTE_RATE + sum(self._slow_nodes.values())
        )
        self._pass_seconds: dict[int, float] = {}
        self._sp: dict[tuple[int, tuple[int, ...]], SegmentPlan | None] = {}
        self._fwd: dict[tuple, tuple[int, int]] = {}
        self._scratch: dict[tuple, int] = {}
        self._geo: dict[Any, tuple[tuple[int, int, int], ...] | None] = {}
        self._layouts: dict[int, list[tuple[Any, bool, bool, list[Any]]]] = {}
        self._options: dict[tuple, list[SegmentPlan]] = {}
        self._leaner_of: dict[int, list[int | None]] = {}  # by id of a cached options list
        self._kern: dict[tuple, tuple[float, int]] = {}
        self._touches: dict[tuple, list[tuple[int, int, bool, float]]] = {}
        self.errors: list[str] = []

    # -- one segment at one tile ----------------------------------------------------------------------------
    def segment_plan(self, seg: Segment, tile: tuple[int, ...], balance: bool = True) -> SegmentPlan | None:
        key = (id(seg), tile, balance)
        if key in self._sp:
            return self._sp[key]
        out_shape = seg.out_shape
        try:
            try:
                grid = grid_summary(seg.geometry, self.image[2:], out_shape[2:], tile)
            except GeometryError as err:
                if getattr(err, "minimum", None) is None or self.g.input in seg.sources:
                    raise
                # NOTE [ Deep segments ]: deep in the trunk the same window may not even hold the halo (in image
                # pixels a deep halo is large); such a segment takes the smallest window its halo allows.
                tile = tuple(
                    max(t, _min_tile(seg.geometry, self.image[2:], out_shape[2:], d))
                    for d, t in enumerate(tile)
                )
                grid = grid_summary(seg.geometry, self.image[2:], out_shape[2:], tile)
        except GeometryError as err:
            self.errors.append(str(err))
            self._sp[key] = None
            return None
        if balance:
            tile, grid = self._balanced(seg, tile, grid)
        tiles, max_in_shape, input_area = grid
        ratio = math.prod(max_in_shape) / math.prod(self.image[2:])
        saved = seg.saved_bytes * ratio
        largest = seg.largest_bytes * ratio
        sources = seg.source_bytes * ratio
        slow_flops, workspace = self._kernels(seg, tuple(max_in_shape))
        transient = BACKWARD_TRANSIENT * largest
        if self._skips_last_conv(seg):  # NOTE [ Tile memory ]
            transient = TAIL_TRANSIENT * largest + workspace
        sp = SegmentPlan(
            segment=seg,
            tile=tuple(min(t, i) for t, i in zip(tile, self.image[2:])),
            in_shape=self.image,
            out_shape=out_shape,
            tiles=tiles,
            max_in_shape=max_in_shape,
            input_area=input_area,
            tile_train_bytes=int(sources + saved + transient),
            tile_forward_bytes=int(sources + FORWARD_TRANSIENT * largest),
            tile_saved_bytes=int(saved),
            flops=seg.flops,
            slow_flops=slow_flops,
        )
        if not self.training:
            window = tuple(min(t, i) for t, i in zip(tile, self.image[2:]))
            lengths = grid_lengths(seg.geometry, self.image[2:], out_shape[2:], window)
            sp.tile_forward_bytes, sp.tile_end_bytes = self._forward_bytes(seg, lengths)
        self._sp[key] = sp
        return sp

    def _balanced(self, seg: Segment, tile: tuple[int, ...], grid: Any) -> tuple[tuple[int, ...], Any]:
        """NOTE [ Balanced tiles ]: the smallest window with as many tiles per axis as ``tile`` gives. The greedy
        split (NOTE [ Greedy cores ] in tiling.py) fills every tile but the last, which may be a sliver (an 80 px
        window on a 160 px axis with a 4 px halo: cores 76, 72 and 12); the smallest window with the same count
        makes the tiles nearly equal: same count, a smaller working set, no sliver paying a whole tile's fixed
        cost, so the search can afford windows with fewer tiles (a 3D U-Net at 160^3: 8 tiles of 82^3 where the
        ladder's 80^3 gave 27). Only axes of 2-4 tiles whose last tile wastes at least half a window are searched
        (beyond that a sliver costs little), so planning stays as fast (NOTE [ Planning cost ])."""
        geo, image, out = seg.geometry, self.image[2:], seg.out_shape[2:]
        best = tuple(
            _balanced_dim(geo.dims[d], geo.align[d], image[d], out[d], tile[d], d) for d in range(len(tile))
        )
        if best == tuple(tile):
            return tile, grid
        return best, grid_summary(geo, image, out, best)

    def _skips_last_conv(self, seg: Segment) -> bool:
        """Whether the engine's backward of this segment skips recomputing its last convolution (NOTE [ Last
        convolution not recomputed ] in execute.py: a segment ending in a zero-padded convolution, training, not
        feeding a streamed head)."""
        if not self.training or seg.whole or (self.head is not None and seg.out is self.g.output):
            return False  # a whole piece's backward is autograd's over its kept graph (NOTE [ Whole pieces ])
        return last_convolution(seg) is not None

    def _kernels(self, seg: Segment, window: tuple[int, ...]) -> tuple[float, int]:
        """(FLOPs of the segment's convolutions that a tile of ``window`` image px drops from oneDNN onto PyTorch's
        unfold kernel, the backward workspace of its last convolution at that tile): NOTE [ Cost model ],
        NOTE [ Tile memory ]. A convolution's box is the window over its input's scale; the kernel is the one
        PyTorch selects for that box (memory/kernels.py). Below oneDNN's channel block both kernels are alike
        (measured: a 1->16 3D convolution costs the same per voxel on either), so no penalty there."""
        key = (id(seg), window)
        if key in self._kern:
            return self._kern[key]
        from .memory.kernels import CONV_BACKWARD, channel_block, conv_workspace_bytes

        g, slow, workspace = self.g, 0.0, 0
        last = last_convolution(seg)
        for n in seg.nodes:
            conv = g.gm.get_submodule(n.target) if n.op == "call_module" else None
            if not isinstance(conv, nn.modules.conv._ConvNd) or not n.args or n.args[0] not in g.geoms:
                continue
            src = n.args[0]
            shape, out = g.profiles[src].shape, g.profiles[n].shape
            if shape is None or out is None or len(shape) != g.ndim + 2 or g.geoms.get(src) is None:
                continue
            box = tuple(min(d, math.ceil(w / sc)) for w, sc, d in zip(window, g.scale(src), shape[2:]))
            conf = (conv.stride, conv.padding, conv.dilation, conv.transposed, conv.output_padding)
            conf = (*conf, conv.groups)
            if isinstance(conv.padding, str):
                continue
            w = torch.empty(conv.weight.shape, device="meta", dtype=g.dtype)
            if (
                not conv.transposed
                and shape[1] // conv.groups >= channel_block()
                and _conv_kernel(shape, box, w, conf).startswith("Slow")
                and not _conv_kernel(shape, shape[2:], w, conf).startswith("Slow")
            ):
                slow += g.profiles[n].flops
            if n is last:
                x = torch.empty((*shape[:2], *box), device="meta", dtype=g.dtype)
                grad = torch.empty((*out[:2], *box), device="meta", dtype=g.dtype)  # its size does not matter
                workspace = conv_workspace_bytes(
                    CONV_BACKWARD,
                    (grad, x, w, None, *conf[:5], conv.groups, [True, True, conv.bias is not None]),
                )
        self._kern[key] = (slow, workspace)
        return self._kern[key]

    def _forward_bytes(self, seg: Segment, lengths: tuple[tuple[int, ...], ...]) -> tuple[int, int]:
        """NOTE [ Inference tile memory ]: (peak, bytes held when the segment returns) of one tile's forward without
        gradients over the grid's tile shapes (``lengths``: per dim, the distinct window extents, longest first).
        A sweep over the segment's nodes at the largest window, and at each smaller one whose boxes put a
        convolution on another kernel."""
        key = (id(seg), lengths)
        if key not in self._fwd:
            top = tuple(n[0] for n in lengths)
            convs = self._convs(seg)
            scratch = [self._conv_scratch(n, self._box(n.args[0], top)) for n in convs]
            peak, end = self._sweep(seg, top)
            # every tensor is smaller at a smaller window; only a convolution's scratch may grow (another kernel)
            for window in itertools.product(*lengths):
                if window != top and any(
                    self._conv_scratch(n, self._box(n.args[0], window)) > top_scratch
                    for n, top_scratch in zip(convs, scratch)
                ):
                    peak = max(peak, self._sweep(seg, window)[0])
            self._fwd[key] = (peak, end)
        return self._fwd[key]

    def _box(self, node: Any, window: tuple[int, ...]) -> tuple[int, ...] | None:
        """A node's extent in a tile of ``window`` image px (its scale's share of the window, at most its map)."""
        if node not in self._geo:
            g = self.g
            shape = g.profiles[node].shape
            if shape is None or len(shape) != g.ndim + 2 or g.geoms.get(node) is None:
                self._geo[node] = None
            else:
                self._geo[node] = tuple(
                    (sc.numerator, sc.denominator, d) for sc, d in zip(g.scale(node), shape[2:])
                )
        geo = self._geo[node]
        if geo is None:
            return None
        return tuple(min(d, -(-w * q // p)) for w, (p, q, d) in zip(window, geo))

    def _convs(self, seg: Segment) -> list[Any]:
        """The segment's convolution nodes whose input is a map (their kernels' scratch: NOTE [ Inference tile
        memory ])."""
        return [n for n, _, conv, _ in self._layout(seg) if conv]

    def _layout(self, seg: Segment) -> list[tuple[Any, bool, bool, list[Any]]]:
        """Per node of the segment, in order: (node, whether it allocates its result, whether it is a convolution
        on a map, the tensors freed after it). An alias (``NodeProfile.alias``) shares its input's memory, which is
        freed after the last reader of either; a result nothing reads is freed at once, the output never."""
        if id(seg) in self._layouts:
            return self._layouts[id(seg)]
        g = self.g
        members = set(seg.nodes)
        root: dict[Any, Any] = {}  # an alias's tensor: the node whose memory it is
        last: dict[Any, int] = {}  # a tensor's last reader among the segment's nodes
        for i, n in enumerate(seg.nodes):
            if g.profiles[n].alias and n.all_input_nodes:  # its first argument's memory (a source's: kept)
                first = n.all_input_nodes[0]
                root[n] = root.get(first, first)
            for a in n.all_input_nodes:
                if a in members:
                    last[root.get(a, a)] = i
        out = root.get(seg.out, seg.out)
        layout = []
        for i, n in enumerate(seg.nodes):
            module = g.gm.get_submodule(n.target) if n.op == "call_module" else None
            conv = (
                isinstance(module, nn.modules.conv._ConvNd)
                and not isinstance(module.padding, str)
                and bool(n.args)
                and isinstance(n.args[0], torch.fx.Node)
                and self._box(n.args[0], (1,) * g.ndim) is not None
            )
            freed = list(dict.fromkeys(root.get(a, a) for a in n.all_input_nodes if a in members))
            freed = [a for a in freed if a in members and last.get(a) == i and a is not out]
            if n not in root and n not in last and n is not out:
                freed.append(n)
            layout.append((n, n not in root, conv, freed))
        self._layouts[id(seg)] = layout
        return layout

    def _conv_scratch(self, node: Any, box: tuple[int, ...] | None) -> int:
        """Scratch bytes of a convolution node's forward on ``batch_tiles`` tiles of its input's ``box``: those of
        the kernel PyTorch picks for that box (NOTE [ CPU convolution workspaces ] in memory/kernels.py)."""
        key = (node, box)
        if key not in self._scratch:
            from .memory.kernels import conv_workspace_bytes

            g = self.g
            conv = g.gm.get_submodule(node.target)
            shape = g.profiles[node.args[0]].shape
            x = torch.empty((self.batch_tiles * shape[0], shape[1], *box), device="meta", dtype=g.dtype)
            w = torch.empty(conv.weight.shape, device="meta", dtype=g.dtype)
            conf = (
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.transposed,
                conv.output_padding,
                conv.groups,
            )
            # NOTE [ Small-tile convolutions on oneDNN ] in execute.py: the engine's float32 forward of a plain
            # convolution never runs the unfold kernel
            onednn = (
                g.dtype == torch.float32
                and zero_padded_torch_conv(conv)
                and torch.backends.mkldnn.is_available()
                and torch.backends.mkldnn.enabled
            )
            self._scratch[key] = conv_workspace_bytes(_CONV, (x, w, None, *conf), onednn_forward=onednn)
        return self._scratch[key]

    def _sweep(self, seg: Segment, window: tuple[int, ...]) -> tuple[int, int]:
        """NOTE [ Inference tile memory ]: (the most bytes alive at once, the bytes alive at the end) while
        ``batch_tiles`` tiles of ``window`` image px run through the segment without gradients."""
        g = self.g
        whole = tuple(min(w, d) for w, d in zip(window, self.image[2:])) == tuple(self.image[2:])
        sizes: dict[Any, int] = {}

        def nbytes(node: Any) -> int:
            if node not in sizes:
                prof, b = g.profiles[node], self._box(node, window)
                full = prof.shape[2:] if b is not None and prof.shape is not None else None
                sizes[node] = self.batch_tiles * (  # tiles run batch_tiles at once, boxed or not
                    prof.out_bytes
                    if full is None
                    else prof.out_bytes * math.prod(b) // max(1, math.prod(full))
                )
            return sizes[node]

        # the tile's source boxes, held for the whole tile; an image in memory is read as a view, which a
        # convolution copies while it runs (a box that is not the whole image is not contiguous)
        viewed = self.g.input if self.input_in_memory else None
        live = sum(nbytes(s) for s in seg.sources if s is not viewed)
        peak = live
        for n, allocates, conv, freed in self._layout(seg):
            new = nbytes(n) if allocates else 0
            scratch = 0
            if conv:
                scratch = self._conv_scratch(n, self._box(n.args[0], window))
                if n.args[0] is viewed and not whole:
                    scratch += nbytes(viewed)
            peak = max(peak, live + new + scratch)
            live += new - sum(nbytes(a) for a in freed)
        return int(peak), int(live)

    def options(self, seg: Segment, requested: tuple[int, ...] | None, cap: int | None) -> list[SegmentPlan]:
        """The segment's plans over the tile ladder, fastest first (a fixed tile: the requested one for a segment
        reading the image, else those within ``cap``). Cached per segment (NOTE [ Planning cost ]); never mutated."""
        key = (id(seg), requested, cap)
        if key in self._options:
            return self._options[key]
        if seg.whole:  # NOTE [ Whole pieces ]: the whole map, its graph kept
            sp = self.segment_plan(seg, tuple(self.image[2:]), False)
            opts = [dataclasses.replace(sp, keep=True)] if sp is not None and sp.tiles == 1 else []
        else:
            opts = [sp for t in self.ladder if (sp := self.segment_plan(seg, t)) is not None]
        if requested is not None and not seg.whole:
            if self.g.input in seg.sources:
                opts = [sp for sp in (self.segment_plan(seg, requested, False),) if sp is not None]
            else:
                opts = [sp for sp in opts if self.work(sp) <= (cap or 0)] or opts[:1]
        opts.sort(key=lambda sp: (self.seconds(sp), sp.tile))
        self._options[key] = opts
        works = [self.work(sp) for sp in opts]
        secs = [self.seconds(sp) for sp in opts]
        # leaner[j]: the fastest option leaner than j (ties: the larger working set, then the first)
        leaner: list[int | None] = [None] * len(opts)
        best: int | None = None
        by_work = sorted(range(len(opts)), key=works.__getitem__)
        i = 0
        for j in by_work:
            while works[by_work[i]] < works[j]:
                c = by_work[i]
                if best is None or (secs[c], -works[c], c) < (secs[best], -works[best], best):
                    best = c
                i += 1
            leaner[j] = best
        self._leaner_of[id(opts)] = leaner
        return opts

    def work(self, sp: SegmentPlan) -> int:
        return sp.tile_train_bytes if self.training else sp.tile_forward_bytes

    def passes(self, sp: SegmentPlan) -> int:
        """Forward-pass equivalents of a segment (NOTE [ Cost model ])."""
        if sp.keep:
            return 3
        return 4 if self.training else 1

    def pass_seconds(self, seg: Segment) -> float:
        """Seconds of one forward pass of a segment over the whole image: its FLOPs and the bytes it writes."""
        if id(seg) not in self._pass_seconds:
            written = sum(self.g.profiles[n].out_bytes for n in seg.nodes)
            slow = sum(self._slow_nodes.get(n, 0.0) for n in seg.nodes)
            self._pass_seconds[id(seg)] = seg.flops / FLOP_RATE + written / BYTE_RATE + slow
        return self._pass_seconds[id(seg)]

    def _depthwise_extra(self) -> dict[Any, float]:
        """Seconds a forward pass of each depthwise convolution takes beyond its FLOPs and bytes at the rates
        (``DEPTHWISE_CONV``, NOTE [ Cost model ])."""
        extra = {}
        for n, prof in self.g.profiles.items():
            m = self.g.gm.get_submodule(n.target) if n.op == "call_module" else None
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels:
                extra[n] = (DEPTHWISE_CONV - 1) * (prof.flops / FLOP_RATE + prof.out_bytes / BYTE_RATE)
        return extra

    def tile_seconds(self, sp: SegmentPlan) -> float:
        """The fixed cost of a segment's tile passes (NOTE [ Cost model ])."""
        if sp.keep:
            return 0.0
        per_tile = TILE_SECONDS + NODE_SECONDS * len(sp.segment.nodes)
        return sp.tiles * per_tile * (self.passes(sp) / 2 if self.training else 1)

    def kernel_seconds(self, sp: SegmentPlan) -> float:
        """What the convolutions a tile drops onto the slow kernel add to the segment's passes (NOTE [ Cost
        model ])."""
        if sp.keep or not sp.slow_flops:
            return 0.0
        # in float32 the forward and the backward's recomputation run on oneDNN (NOTE [ Small-tile convolutions on
        # oneDNN ] in execute.py): only the backward's 2 passes stay on the unfold kernel
        slow_passes = self.passes(sp) if self.dtype != torch.float32 else (2 if self.training else 0)
        return slow_passes * sp.slow_flops * (SLOW_CONV - 1) / FLOP_RATE * sp.overlap

    def seconds(self, sp: SegmentPlan) -> float:
        overlap = 1 if sp.keep else sp.overlap
        return (
            self.passes(sp) * self.pass_seconds(sp.segment) * overlap
            + self.tile_seconds(sp)
            + self.kernel_seconds(sp)
        )

    # -- a whole plan ----------------------------------------------------------------------------------------
    def fixed_bytes(self) -> int:
        params = (2 if self.training else 1) * self.g.param_bytes
        return params + (_nbytes(self.image, self.dtype) if self.input_in_memory else 0)

    def evaluate(self, segs: list[SegmentPlan], bounds: list[BoundaryPlan]) -> tuple[int, int, list[int]]:
        """Predicted (peak, forward peak, per-step peaks) of a plan (NOTE [ Cost model ]); steps are the forward
        segments then the backward ones in reverse order."""
        n = len(segs)
        producer = {sp.segment.out.name: k for k, sp in enumerate(segs)}
        last_user: dict[str, int] = {}
        for k, sp in enumerate(segs):
            for s in sp.segment.sources:
                last_user[s.name] = max(k, last_user.get(s.name, k))
        if not self.training:
            steps = self._inference_steps(segs, bounds, producer, last_user)
            return max(steps), max(steps), steps
        fixed = self.fixed_bytes()
        kept = [sp.tile_saved_bytes if sp.keep else 0 for sp in segs]
        dev_out = 0
        if self.output_in_memory:
            dev_out = segs[-1].segment.graph.profiles[segs[-1].segment.out].out_bytes
        input_grad = _nbytes(self.image, self.dtype) if self.input_grad and self.training else 0
        # (producer, nbytes) of the activations on the device; (producer, last reader, nbytes) of the gradients
        acts = [(producer[b.name], b.nbytes) for b in bounds if b.tier == "device"]
        grads = [
            (producer[b.name], last_user[b.name], b.nbytes)
            for b in bounds
            if b.grad_tier == "device" and b.name in last_user
        ]
        steps: list[int] = []
        kept_before = 0
        for k in range(n):  # forward
            alive = sum(nb for p, nb in acts if p <= k)
            work = segs[k].tile_forward_bytes + kept[k] + segs[k].io_forward_bytes
            steps.append(fixed + alive + kept_before + work + (dev_out if k == n - 1 else 0))
            kept_before += kept[k]
        forward_peak = max(steps)
        if self.training:
            # stores live through the backward (NOTE [ Boundary lifetime ]); a gradient from its producer's
            # backward back to its last reader's; a kept graph until its own backward, whose working set
            # (tile_train_bytes) holds its saved bytes (NOTE [ Kept segments ] in execute.py)
            acts_all = sum(nb for _, nb in acts)
            base = fixed + acts_all + 2 * dev_out + input_grad
            for k in reversed(range(n)):
                alive = sum(nb for p, u, nb in grads if p <= k <= u)
                steps.append(base + alive + sum(kept[:k]) + segs[k].tile_train_bytes + segs[k].io_bytes)
        return max(steps), forward_peak, steps

    def _inference_steps(
        self,
        segs: list[SegmentPlan],
        bounds: list[BoundaryPlan],
        producer: dict[str, int],
        last_user: dict[str, int],
    ) -> list[int]:
        """NOTE [ Inference tile memory ]: the peak of each segment of a forward without gradients. A store on the
        device lives from its producer's start to its last reader's end (the engine frees it then); the
        producer's own store (the output, for the last segment) fills tile by tile, so its tiles run with at most
        all of it but their own core, and a one-tile segment runs with none of it until its result is written."""
        fixed = self.fixed_bytes()
        own = [0] * len(segs)
        spans = []  # (producer, last reader, bytes) of the other segments' stores on the device
        for b in bounds:
            if b.tier == "device":
                p = producer[b.name]
                own[p] = b.nbytes
                spans.append((p, last_user.get(b.name, p), b.nbytes))
        if self.output_in_memory:
            own[-1] = segs[-1].segment.graph.profiles[segs[-1].segment.out].out_bytes
        device = {b.name for b in bounds if b.tier == "device"}
        steps = []
        for k, sp in enumerate(segs):
            alive = sum(nb for p, u, nb in spans if p < k <= u)
            work, end = sp.tile_forward_bytes + sp.io_forward_bytes, sp.tile_end_bytes
            if sp.tiles == 1:  # a whole map on the device is read without a copy (TensorStore.read)
                views = (
                    sum(self.g.profiles[s].out_bytes for s in sp.segment.sources if s.name in device)
                    * self.batch_tiles
                )
                work, end = work - views, end - views
            mid = max(work, end + own[k]) if sp.tiles == 1 else work + own[k]
            steps.append(fixed + alive + mid)
        return steps

    def time_ratio(self, segs: list[SegmentPlan], bounds: list[BoundaryPlan]) -> float:
        return (
            sum(self.seconds(sp) for sp in segs) + self.disk_seconds(segs, bounds) + self.stat_seconds(segs)
        ) / self.conventional_seconds

    def stat_seconds(self, segs: list[SegmentPlan]) -> float:
        """Seconds of the streamed statistics' own work (NOTE [ Cost model ]): ``STAT_TRAFFIC`` times the bytes of
        their inputs, at ``BYTE_RATE``; a whole piece's statistics are its layers' (NOTE [ Whole pieces ])."""
        inside = self.g.inside_pieces([sp.segment for sp in segs])  # what the engine does not stream
        read = sum(self.g.profiles[r.args[0]].out_bytes for r in self.g.reductions if r not in inside)
        return STAT_TRAFFIC[self.training] * read / BYTE_RATE

    @property
    def conventional_seconds(self) -> float:
        return (3 if self.training else 1) * self.total_seconds

    def time_parts(self, segs: list[SegmentPlan], bounds: list[BoundaryPlan]) -> dict[str, float]:
        """``time_ratio`` in its parts (NOTE [ Cost model ]), each over the conventional step: the passes over
        the image (compute), the halos recomputed (overlap), the tiles' fixed cost (tiles), boundary IO (disk)."""
        compute = sum(self.passes(sp) * self.pass_seconds(sp.segment) for sp in segs)
        tiles = sum(self.tile_seconds(sp) for sp in segs)
        kernels = sum(self.kernel_seconds(sp) for sp in segs)
        overlap = sum(self.seconds(sp) for sp in segs) - compute - tiles - kernels
        disk = self.disk_seconds(segs, bounds)
        conv = self.conventional_seconds
        return {
            "compute": compute / conv,
            "overlap": overlap / conv,
            "tiles": tiles / conv,
            "kernels": kernels / conv,
            "disk": disk / conv,
            "statistics": self.stat_seconds(segs) / conv,
        }

    def disk_seconds(self, segs: list[SegmentPlan], bounds: list[BoundaryPlan]) -> float:
        """Seconds of boundary IO on the disk tier (NOTE [ Cost model ], NOTE [ Page cache ])."""
        return sum(
            nbytes * (segs[k].overlap if tiled else 1.0) * per_byte
            for k, nbytes, tiled, per_byte in self._disk_touches(segs, bounds)
        )

    def _disk_touches(
        self, segs: list[SegmentPlan], bounds: list[BoundaryPlan]
    ) -> list[tuple[int, int, bool, float]]:
        """NOTE [ Page cache ]: the step's touches of disk-tier stores, each as (segment, store bytes, whether the
        segment's overlap multiplies them, seconds per byte). Cached per cut set, tiers and kept segments: which reads the
        page cache serves does not depend on the tiles."""
        key = (tuple(id(sp.segment) for sp in segs), tuple((b.tier, b.grad_tier) for b in bounds),
               tuple(sp.keep for sp in segs))  # fmt: skip
        if key in self._touches:
            return self._touches[key]
        by_node = {b.name: b for b in bounds}
        flips = (
            reversed_tiles(len(segs), self.head is not None)
            if self.training
            else [(False, False)] * len(segs)
        )
        steps: list[
            tuple[int, bool, list[tuple[tuple[str, str], int, bool, str]], tuple[str, str] | None]
        ] = []
        for k, sp in enumerate(segs):  # forward: read the sources' boxes, write the output's cores
            touch = [(("map", s.name), b.nbytes, not sp.keep, "read") for s in sp.segment.sources
                     if (b := by_node.get(s.name)) is not None and b.tier == "disk"]  # fmt: skip
            out = by_node.get(sp.segment.out.name)
            if out is not None and out.tier == "disk":
                touch.append((("map", out.name), out.nbytes, False, "write"))
            steps.append((k, flips[k][0], touch, None))
        # backward, in reverse: the sources again (recomputation, unless kept), the output's gradient, the sources'
        if self.training:
            for k in reversed(range(len(segs))):
                sp = segs[k]
                touch = (
                    [] if sp.keep else [(key_, n, True, op) for key_, n, _, op in steps[k][2] if op == "read"]
                )
                out = by_node.get(sp.segment.out.name)
                if out is not None and out.grad_tier == "disk":
                    touch.append((("grad", out.name), out.nbytes, False, "read"))
                touch += [(("grad", s.name), b.nbytes, not sp.keep, "add") for s in sp.segment.sources
                          if (b := by_node.get(s.name)) is not None and b.grad_tier == "disk"]  # fmt: skip
                # a gradient's store is freed after its producer's backward (NOTE [ Streamed execution ])
                steps.append((k, flips[k][1], touch, ("grad", out.name) if out is not None else None))
        cache = self.page_cache
        size: dict[tuple[str, str], int] = {}
        last: dict[tuple[str, str], int] = {}  # step of each live store's last touch
        way: dict[tuple[str, str], bool] = {}  # the order of that touch (True: reverse raster order)
        out_touches: list[tuple[int, int, bool, float]] = []  # (segment, bytes, tiled, seconds per byte)
        for i, (k, flip, touch, freed) in enumerate(steps):
            now = {key_ for key_, *_ in touch}
            size.update((key_, nbytes) for key_, nbytes, *_ in touch)
            for key_, nbytes, tiled, op in touch:
                if op == "write":
                    out_touches.append((k, nbytes, tiled, 1 / DISK_WRITE))
                    continue
                if op == "add":
                    out_touches.append((k, nbytes, tiled, 1 / DISK_ADD))
                if key_ not in last:  # a gradient's first adds read unwritten (zero) blocks: no disk read
                    continue
                t = last[key_]
                newer = sum(size[y] for y, ty in last.items() if ty > t)  # touched since
                beside = sum(
                    size[y] for y, ty in last.items() if ty == t and y != key_
                )  # interleaved with it
                during = sum(size[y] for y in now if y != key_ and last.get(y, -1) <= t)
                if way[key_] != flip:  # a scan in reverse (NOTE [ Tile order ]): the cached part first
                    held = max(0.0, cache - newer) * nbytes / (nbytes + beside)
                    hit = min(1.0, held / (nbytes + during))
                else:  # in the same order: LRU misses everywhere once the store no longer fits
                    hit = 1.0 if newer + beside + nbytes + during / 2 <= cache else 0.0
                cold = (1 - hit) / DISK_COLD_READ
                if op == "read":
                    out_touches.append((k, nbytes, tiled, hit / DISK_READ + cold))
                elif cold:  # an add into blocks the cache has dropped reads them from the disk first
                    out_touches.append((k, nbytes, tiled, cold))
            for key_ in now:
                last[key_], way[key_] = i, flip
            if freed is not None:
                last.pop(freed, None)
        self._touches[key] = out_touches
        return out_touches

    def build(self, cuts: frozenset, budget: int | None, requested: tuple[int, ...] | None) -> Plan | None:
        """The fastest plan with these cuts under ``budget`` (or the leanest, if none fits), or None."""
        try:
            segments = self.g.segments(cuts, self.g.forced if self.tiers == "recompute" else ())
        except GeometryError as err:
            self.errors.append(str(err))
            return None
        return self.assemble(segments, budget, requested)

    def assemble(
        self, segments: list[Segment], budget: int | None, requested: tuple[int, ...] | None
    ) -> Plan | None:
        """The fastest plan of these segments under ``budget`` (or the leanest, if none fits), or None."""
        bounds = [
            BoundaryPlan(s.out.name, s.out_shape, self.g.profiles[s.out].out_bytes) for s in segments[:-1]
        ]
        if self.tiers in ("host", "disk"):
            for b in bounds:
                b.tier = b.grad_tier = self.tiers
        read = {src for s in segments for src in s.sources}
        for b, s in zip(bounds, segments):
            if s.out not in read:  # NOTE [ Recomputed statistic inputs ] in statistics.py: never stored
                b.tier = b.grad_tier = "recompute"
        # each segment: options ordered fastest first; a fixed tile caps the working set (NOTE [ Tile memory ])
        options: list[list[SegmentPlan]] = []
        cap = None
        if requested is not None:
            first = (
                self.segment_plan(segments[0], requested, False)
                if segments[0].sources == [self.g.input]
                else None
            )
            sps = [self.segment_plan(s, requested, False) for s in segments if self.g.input in s.sources]
            if any(sp is None for sp in sps):
                return None
            cap = max(self.work(sp) for sp in sps if sp is not None)
            del first
        for s in segments:
            opts = self.options(s, requested, cap)
            if not opts:
                return None
            options.append(opts)
        choice = [0] * len(segments)

        def current() -> list[SegmentPlan]:
            return [options[k][choice[k]] for k in range(len(segments))]

        # fastest tiles first; while over budget: boundaries to disk (largest first), then smaller tiles at the
        # step that sets the peak
        while True:
            segs = current()
            peak, fwd, steps = self.evaluate(segs, bounds)
            if budget is None or peak <= budget:
                break
            if self.tiers in ("auto", "recompute"):
                # maps first (they live through the step), gradients (alive from a reader's backward to their
                # producer's) only when every map is on disk
                movable = [b for b in bounds if b.tier == "device"]
                if movable:
                    max(movable, key=lambda b: b.nbytes).tier = "disk"
                    continue
                movable = [b for b in bounds if self.training and b.grad_tier == "device"]
                if movable:
                    max(movable, key=lambda b: b.nbytes).grad_tier = "disk"
                    continue
            worst = max(range(len(steps)), key=steps.__getitem__)
            k = worst if worst < len(segments) else 2 * len(segments) - 1 - worst
            # the fastest leaner tile, and again, until that step fits: the step's other terms do not depend on
            # the segment's tile (NOTE [ Planning cost ])
            leaner_of = self._leaner_of[id(options[k])]
            at_step = (
                (lambda sp: sp.tile_forward_bytes)
                if worst < len(segments)
                else (lambda sp: sp.tile_train_bytes)
            )
            room = at_step(options[k][choice[k]]) - (steps[worst] - budget)
            j = choice[k]
            while leaner_of[j] is not None:
                j = leaner_of[j]
                if at_step(options[k][j]) <= room:
                    break
            if j == choice[k]:
                break
            choice[k] = j
        segs = [dataclasses.replace(sp) for sp in current()]
        self._to_device(segs, bounds, budget)
        if self.training:  # keep one-tile segments' graphs while the plan still fits
            for k, sp in sorted(enumerate(segs), key=lambda e: -e[1].flops / max(1, e[1].tile_saved_bytes)):
                if sp.segment.whole or sp.tiles != 1 or self._reads_lazy_input(k, sp.segment):
                    continue
                sp.keep = True
                limit = budget if budget is not None else None
                if (limit is not None and self.evaluate(segs, bounds)[0] > limit) or (
                    limit is None and sp.tile_saved_bytes > (cap or 0)
                ):
                    sp.keep = False
        peak, fwd, _ = self.evaluate(segs, bounds)
        if not self.training:
            peak = fwd
        return Plan(
            self.image,
            segs,
            False,
            int(peak),
            int(fwd),
            self.time_ratio(segs, bounds),
            training=self.training,
            boundaries=bounds,
            head=self.head,
            graph=self.g,
            conventional_seconds=self.conventional_seconds,
            time_parts=self.time_parts(segs, bounds),
        )

    def _to_device(self, segs: list[SegmentPlan], bounds: list[BoundaryPlan], budget: int | None) -> None:
        """Bring back to the device the boundaries on disk that still fit, smallest first."""
        if self.tiers not in ("auto", "recompute") or budget is None:
            return
        for attr in ("grad_tier", "tier"):
            for b in sorted(bounds, key=lambda b: b.nbytes):
                if getattr(b, attr) in ("device", "recompute"):
                    continue
                old = getattr(b, attr)
                setattr(b, attr, "device")
                if self.evaluate(segs, bounds)[0] > budget:
                    setattr(b, attr, old)

    def recomputed(self, plan: Plan, budget: int, requested: tuple[int, ...] | None) -> Plan:
        """NOTE [ Cost model ]: statistic inputs (forced cuts) that their readers recompute from the sources of the
        segment computing them instead of reading them from a store (NOTE [ Recomputed statistic inputs ] in
        statistics.py), each tried in turn, the largest first, and kept when the plan (every tile chosen again)
        fits and is faster; after ``RECOMPUTE_TRIES`` rejections in a row the smaller ones are not tried (what a
        small map saves is small; EfficientNet-B0 in training mode has 65 statistic inputs: NOTE [ Planning cost ])."""
        if self.tiers != "auto" or plan.conventional or not self.g.forced:
            return plan
        outs = {sp.segment.out for sp in plan.segments}
        cuts = frozenset(outs - self.g.forced - {self.g.output})
        recompute = frozenset(n for n in self.g.forced if n.name in _recomputed(plan))
        best, misses = plan, 0
        for f in sorted(
            self.g.forced - recompute, key=lambda n: (-self.g.profiles[n].out_bytes, self.g.index[n])
        ):
            try:
                segments = self.g.segments(cuts, recompute | {f})
            except GeometryError:
                continue
            trial = self.assemble(segments, budget, requested)
            if trial is not None and trial.peak_bytes <= budget and trial.time_ratio < best.time_ratio:
                best, recompute, misses = trial, recompute | {f}, 0
            else:
                misses += 1
                if misses >= RECOMPUTE_TRIES:
                    break
        return best

    def wholes(self, plan: Plan, budget: int, requested: tuple[int, ...] | None) -> Plan:
        """NOTE [ Whole pieces ]: each run of consecutive one-tile segments of the chosen plan becomes one piece
        run on the whole map with its graph kept, when a plan with it (every other segment's tile chosen again)
        fits and is no slower (its boundary stores are saved too); the deepest runs first, a run that does not fit
        shortened from its front (where the maps are largest)."""
        if not self.training or plan.conventional:
            return plan
        segments = [sp.segment for sp in plan.segments]
        runs: list[tuple[int, int]] = []
        k = 0
        while k < len(segments):
            j = k
            while (
                j < len(segments)
                and plan.segments[j].tiles == 1
                and not self._reads_lazy_input(j, segments[j])
            ):
                j += 1
            if j - k >= 2:
                runs.append((k, j))
            k = j + 1
        best = plan
        for i, j in reversed(runs):
            lo, hi, found = i, j - 1, None  # the smallest start that fits (a start of j - 1: no run of two)
            while lo < hi:
                mid = (lo + hi) // 2
                got = self._with_piece(segments, mid, j, budget, requested)
                if got is not None:
                    found, hi = got, mid
                else:
                    lo = mid + 1
            if found is not None and found.time_ratio <= best.time_ratio:
                best = found
                segments = [sp.segment for sp in best.segments]
        return best

    def overlapped(self, plan: Plan, budget: int) -> Plan:
        """NOTE [ IO overlap ] in execute.py: each streamed segment that reads or writes a scratch file or reads the
        lazy input gets its IO run beside its tiles when the plan still fits ``budget`` with the extra working set,
        counted in its steps: the next tile's sources read ahead (those from scratch files or the lazy input), and
        the last tile's output core still being written (forward, an output on disk) or its sources' gradients
        still being added (backward, gradients on disk). The segments and tiles are not chosen again; the predicted
        time is unchanged (the cost model prices work, not cores). Training plans only: ``tilegrad.infer`` runs
        one-segment plans in its own loop, whose reads stay on the main thread."""
        if plan.conventional or not self.training:
            return plan
        tiers = {b.name: b for b in plan.boundaries}
        segs = list(plan.segments)
        changed = False
        for k, sp in enumerate(segs):
            seg = sp.segment
            if sp.keep or sp.tiles <= 1:
                continue
            ratio = math.prod(sp.max_in_shape) / math.prod(self.image[2:])

            def box(s: Any, ratio: float = ratio) -> float:  # a source's bytes in the largest window
                whole = _nbytes(self.image, self.dtype) if s is self.g.input else self.g.profiles[s].out_bytes
                return whole * ratio

            def tier(s: Any, grad: bool = False) -> str:
                b = tiers.get(s.name)
                return "" if b is None else (b.grad_tier if grad else b.tier)

            ahead = sum(
                box(s)
                for s in seg.sources
                if tier(s) == "disk" or (s is self.g.input and not self.input_in_memory)
            )
            written = self.g.profiles[seg.out].out_bytes * ratio if tier(seg.out) == "disk" else 0.0
            added = sum(box(s) for s in seg.sources if s is not self.g.input and tier(s, grad=True) == "disk")
            if not (ahead or written or added):
                continue
            trial = [
                *segs[:k],
                dataclasses.replace(sp, io_bytes=int(ahead + added), io_forward_bytes=int(ahead + written)),
                *segs[k + 1 :],
            ]
            if self.evaluate(trial, plan.boundaries)[0] <= budget:
                segs, changed = trial, True
        if not changed:
            return plan
        peak, fwd, _ = self.evaluate(segs, plan.boundaries)
        return dataclasses.replace(
            plan, segments=segs, peak_bytes=int(peak if self.training else fwd), forward_peak_bytes=int(fwd)
        )

    def _reads_lazy_input(self, k: int, seg: Segment) -> bool:
        """Whether segment ``k`` is the first and reads a lazy input: the slide is read tile by tile, never whole,
        so such a segment is neither kept nor part of a whole piece."""
        return k == 0 and not self.input_in_memory and self.g.input in seg.sources

    def _with_piece(
        self, segments: list[Segment], start: int, stop: int, budget: int, requested: tuple[int, ...] | None
    ) -> Plan | None:
        """The plan of ``segments`` with ``segments[start:stop]`` as one whole piece, if it fits ``budget``."""
        try:
            piece = self.g.whole(segments[start:stop])
        except GeometryError:
            return None
        trial = [*segments[:start], piece, *segments[stop:]]
        if self.g.whole_conflict(trial):
            return None
        plan = self.assemble(trial, budget, requested)
        return plan if plan is not None and plan.peak_bytes <= budget else None

    def refine(self, plan: Plan, budget: int, requested: tuple[int, ...] | None) -> Plan:
        """NOTE [ Tile refinement ]: the ladder's rungs are 19% apart, and a tiled segment's cost moves within a
        rung: its tiles are the window's length except the last one on each axis, so the smallest window that
        still gives a tile count reads the least (overlap), and a window a little larger than the rung may save a
        row of tiles and still fit. After the search, each tiled segment of the chosen plan tries every window
        between the rungs below and above its own, in steps of 8 px, and keeps the fastest that does not raise the
        plan's predicted peak (its cuts and tiers unchanged): a plan is only ever replaced by a faster one with the
        same or a lower peak, so the peak stays what the search chose (flat in the image size with a budget)."""
        segs = list(plan.segments)
        bounds = plan.boundaries
        best = self.time_ratio(segs, bounds)
        image = self.image[2:]
        rungs = sorted({max(t) for t in self.ladder})
        changed = False
        cap = None  # a fixed tile caps every segment's working set at its own (NOTE [ Tile memory ])
        if requested is not None:
            firsts = [
                self.segment_plan(s.segment, requested, False)
                for s in segs
                if self.g.input in s.segment.sources
            ]
            cap = max(self.work(sp) for sp in firsts if sp is not None)
        for k, sp in enumerate(segs):
            if sp.keep or sp.tiles == 1 or (requested is not None and self.g.input in sp.segment.sources):
                continue
            side = max(sp.tile)
            below = max((r for r in rungs if r < side), default=side)
            above = min((r for r in rungs if r > side), default=side)
            for t in range(below, above, 8):
                cand = self.segment_plan(sp.segment, tuple(min(t, d) for d in image))
                if cand is None or cand.tile == sp.tile or (cap is not None and self.work(cand) > cap):
                    continue
                trial = [*segs[:k], cand, *segs[k + 1 :]]
                if self.evaluate(trial, bounds)[0] > min(budget, plan.peak_bytes):
                    continue
                ratio = self.time_ratio(trial, bounds)
                if ratio < best:
                    best, segs[k], changed = ratio, cand, True
        if not changed:
            return plan
        segs = [dataclasses.replace(sp) for sp in segs]
        peak, fwd, _ = self.evaluate(segs, bounds)
        return dataclasses.replace(
            plan,
            segments=segs,
            peak_bytes=int(peak if self.training else fwd),
            forward_peak_bytes=int(fwd),
            time_ratio=self.time_ratio(segs, bounds),
            time_parts=self.time_parts(segs, bounds),
        )

    def search(
        self, mode: str, budget: int | None, requested: tuple[int, ...] | None
    ) -> tuple[Plan | None, Plan | None]:
        """(fastest plan within budget, leanest plan found)."""
        cands, stage_cands = self.g.candidates, self.g.stage_candidates
        stages, every = frozenset(stage_cands), frozenset(cands)
        descents: list[tuple[frozenset, list]] = []
        if mode == "lean":
            starts = [frozenset()]
        elif mode == "stages":
            # the cuts off their grid may not line up with others (NOTE [ Segment windows ])
            starts = list(dict.fromkeys([frozenset(n for n in stage_cands if self.g.on_grid(n)), stages]))
        else:
            starts = list(dict.fromkeys([frozenset(), stages, every]))
            # descents over the stage cuts alone (whose local optimum the block outputs might otherwise walk past),
            # then over every candidate; the fastest plan seen wins
            descents = [(frozenset(), stage_cands), (stages, stage_cands)]
            descents += [(frozenset(), cands), (every, cands), (stages, cands)]
        seen: dict[frozenset, Plan | None] = {}

        def get(cuts: frozenset) -> Plan | None:
            if cuts not in seen:
                seen[cuts] = self.build(cuts, budget, requested)
            return seen[cuts]

        def score(p: Plan | None) -> tuple:
            if p is None:
                return (2, 0.0)
            if budget is not None and p.peak_bytes > budget:
                return (1, p.peak_bytes)
            return (0, p.time_ratio)

        for start in starts:
            get(start)
        for start, toggles in descents:
            if toggles:
                current = start
                while True:
                    moves = [current ^ {c} for c in toggles]
                    best = min(moves, key=lambda c: score(get(c)))
                    if score(get(best)) < score(get(current)):
                        current = best
                    else:
                        break
        plans = [p for p in seen.values() if p is not None]
        if not plans:
            return None, None
        fitting = [p for p in plans if budget is None or p.peak_bytes <= budget]
        best = min(fitting, key=lambda p: p.time_ratio) if fitting else None
        leanest = min(plans, key=lambda p: p.peak_bytes)
        return best, leanest


def _head_flops(head: nn.Module | None, shape: tuple[int, ...], dtype: torch.dtype) -> float:
    if head is None:
        return 0.0
    meta = copy.deepcopy(head).to("meta")
    with FlopCounterMode(display=False) as fc:
        meta(torch.empty(shape, device="meta", dtype=dtype))
    return float(fc.get_total_flops())


def _head_name(head: nn.Module | None) -> str | None:
    if head is None:
        return None
    extra = head.extra_repr()
    return f"{type(head).__name__}({extra})" if extra else type(head).__name__


def _refuse_batch_mixing(graph: TrunkGraph, batch_tiles: int) -> None:
    """NOTE [ Tile batches ] (infer.py) stacks tiles along the batch dim: refuse a model with a layer that mixes
    the samples of a batch (a flip, a reduction or indexing over the batch dim), naming the first one."""
    mixing = [n.meta[ACROSS_BATCH] for n in graph.nodes if ACROSS_BATCH in n.meta]
    if mixing:
        raise ConfigError(
            f"batch_tiles={batch_tiles} runs tiles stacked along the batch dim, but {mixing[0]} mixes the samples "
            "of a batch, so tiles would be mixed with each other; use batch_tiles=1 (the default) for this model"
        )


@without_autocast
def plan_streaming(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    tile_size: int | Sequence[int] | str = "auto",
    memory_budget: Bytes | None = None,
    dtype: torch.dtype = torch.float32,
    mode: str = "auto",
    input_in_memory: bool = True,
    input_grad: bool = False,
    training: bool = True,
    output_in_memory: bool = True,
    batch_tiles: int = 1,
    head: nn.Module | None = None,
    tiers: str = "auto",
) -> Plan:
    """Choose segments, tile sizes and storage tiers for ``module`` on an input of ``input_shape`` (N, C, *spatial).

    ``mode``: "lean" (one segment, memory flat in the image size), "stages" (cut at every change of scale), or "auto"
    (with a budget: the fastest plan that fits, including unstreamed execution; with a fixed tile: the fastest
    plan within the tile's implied limit, NOTE [ Tile memory ]). ``head``: a streamed head (tilegrad.heads) fed
    tile by tile; the trunk's output is then never stored. ``tiers``: where boundary tensors live, "auto" (the
    device while they fit, then disk; a statistic's input recomputed by its readers where the cost model finds
    that faster: NOTE [ Recomputed statistic inputs ] in statistics.py), "device", "host", "disk" (none recomputed)
    or "recompute" (every statistic input recomputed, the rest as "auto"). ``batch_tiles`` (inference only): tiles run
    together in one forward call (NOTE [ Tile batches ] in infer.py). ``memory_budget`` is bytes or a string such
    as ``"2GiB"``. Option mistakes raise :class:`tilegrad.ConfigError`; no plan under the budget,
    :class:`tilegrad.MemoryBudgetError`.
    """
    input_shape = shape_option(input_shape)
    ndim = len(input_shape) - 2
    tile_size = tile_size_option(tile_size)
    memory_budget = budget_option(memory_budget)
    mode = mode_option(mode)
    batch_tiles = batch_tiles_option(batch_tiles)
    require_budget(tile_size, memory_budget)
    if tiers not in TIERS:
        raise ConfigError(f"tiers must be one of {', '.join(TIERS)}; received {tiers!r}")
    if isinstance(tile_size, tuple) and len(tile_size) != ndim:
        raise ShapeError(
            f"tile_size {tile_size} has {len(tile_size)} entries but the input has {ndim} spatial dims "
            f"(shape {input_shape}): give one entry per spatial dim or a single int"
        )
    graph = TrunkGraph(module, input_shape, dtype, training=training)
    if batch_tiles > 1:
        _refuse_batch_mixing(graph, batch_tiles)
    out_shape = graph.shape(graph.output)
    planner = _Planner(
        graph,
        training=training,
        input_in_memory=input_in_memory,
        input_grad=input_grad,
        output_in_memory=output_in_memory,
        head_flops=_head_flops(head, out_shape, dtype),
        head=_head_name(head),
        tiers=tiers,
        batch_tiles=batch_tiles,
        page_cache=page_cache_bytes(
            None if memory_budget is None else int(memory_budget),
            next((p.device for p in module.parameters()), torch.device("cpu")),
        ),
    )
    requested = (
        None if tile_size == "auto" else (tile_size if isinstance(tile_size, tuple) else (tile_size,) * ndim)
    )
    budget = None if memory_budget is None else int(memory_budget * BUDGET_SAFETY)

    if memory_budget is not None and mode == "auto" and training:
        peak = _conventional_peak(graph, input_in_memory, head is not None)
        if peak <= budget and (input_in_memory or head is None or peak * 4 < budget):
            seg = graph.segments(())[0]
            sp = planner.segment_plan(seg, tuple(input_shape[2:]))
            if sp is not None:
                return Plan(
                    input_shape, [sp], True, peak, peak, 1.0, memory_budget, training=True,
                    head=_head_name(head), graph=graph,
                )  # fmt: skip

    note = ""
    if budget is None and mode == "auto" and training and requested is not None:
        lean = planner.build(frozenset(), None, requested)
        if lean is None:
            _, lean = planner.search("stages", None, requested)
        if lean is not None:
            extra = max(planner.work(sp) for sp in lean.segments if graph.input in sp.segment.sources)
            budget = lean.peak_bytes + int(FIXED_TILE_EXTRA * extra)
            note = (
                f"no budget given: the {'x'.join(map(str, requested))} tile sets the limit, {format_bytes(budget)} "
                f"(the one-segment plan's {format_bytes(lean.peak_bytes)} plus {FIXED_TILE_EXTRA:g} tile); pass "
                "memory_budget= to let it use more memory for speed"
            )
    best, leanest = planner.search(mode, budget, requested)
    if tiers == "auto" and budget is not None:
        # the automatic tiers move boundaries to disk while tiles are still large; a plan that keeps every
        # boundary on the device with smaller tiles may be both faster and leaner: compare the two searches
        # (also when the automatic search's plan has nothing on disk: its descent may have passed such plans by)
        planner.tiers = "device"
        other, other_lean = planner.search(mode, budget, requested)
        planner.tiers = "auto"
        if other is not None and (best is None or other.time_ratio < best.time_ratio):
            best = other
        if leanest is None or (other_lean is not None and other_lean.peak_bytes < leanest.peak_bytes):
            leanest = other_lean
    if best is not None:
        if budget is not None and not best.conventional:
            best = planner.recomputed(best, budget, requested)
            best = planner.wholes(best, budget, requested)
            best = planner.refine(best, budget, requested)
            best = planner.overlapped(best, budget)
        _check_tiles(best)
        best.budget = memory_budget
        if note:
            best.notes.append(note)
        if best.disk_bytes:
            best.notes.append(
                f"{format_bytes(best.disk_bytes)} of boundary tensors go to a scratch directory on disk "
                "(scratch_dir=, checked for free space when the run starts)"
            )
        return best
    if leanest is None:
        raise GeometryError(planner.errors[0] if planner.errors else "no tile size fits this trunk")
    smallest = _display_ceil(leanest.peak_bytes / BUDGET_SAFETY)
    raise MemoryBudgetError(
        f"no streaming plan fits the memory budget of {format_bytes(memory_budget or 0)} for input "
        f"{'x'.join(map(str, input_shape))}: the leanest plan found needs about {format_bytes(leanest.peak_bytes)}, "
        f"more than the {format_bytes(budget or 0)} the planner allows itself ({BUDGET_SAFETY:.0%} of the budget; "
        f"the rest is slack for the allocator). The smallest budget that works: memory_budget="
        f"'{format_bytes(smallest).replace(' ', '')}'"
        + (", or request a smaller tile_size" if requested is not None else "")
        + (", or keep the input on disk as a lazy array" if input_in_memory else "")
        + (
            ", or use a streamed head (tilegrad.heads)"
            if training and head is None and output_in_memory
            else ""
        )
        + (", or write the output to a sink on disk (out=)" if not training and output_in_memory else "")
        + f". The leanest plan: {leanest}"
    )


def _display_ceil(n: float) -> int:
    """``n`` bytes rounded up to what :func:`format_bytes` prints (two decimals of its unit), so that the printed
    budget is at least ``n``."""
    step = 1.0
    while n >= 1024 * step and step < 1024**4:
        step *= 1024
    return int(math.ceil(n / (step / 100)) * step / 100)


def _recomputed(plan: Plan) -> set[str]:
    """Names of the statistic inputs the plan's readers recompute (NOTE [ Recomputed statistic inputs ])."""
    return {b.name for b in plan.boundaries if b.tier == "recompute"}


def _representatives(spans: Sequence[Any]) -> list[Any]:
    """The first and last span of a dim and the interior spans of distinct lengths and crops."""
    picked: dict[Any, Any] = {}
    for k, sp in enumerate(spans):
        key = (
            "first"
            if k == 0
            else "last"
            if k == len(spans) - 1
            else (sp.in_length, sp.out_stop - sp.out_start)
        )
        picked.setdefault(key, sp)
    return list(picked.values())


class _ShapeOnlyNorms(torch.overrides.TorchFunctionMode):
    """Normalisations answer with an empty tensor of their input's shape, which is all they give on meta: the check
    of :func:`_check_tiles` is about shapes, and on meta PyTorch runs batch norm as a Python decomposition (RegNet-Y
    at 64^2: 8.5 of the check's 10.7 s)."""

    _NORMS = frozenset({torch.batch_norm, torch.nn.functional.batch_norm, torch.instance_norm,
                        torch.nn.functional.instance_norm, torch.group_norm, torch.nn.functional.group_norm,
                        torch.layer_norm, torch.nn.functional.layer_norm})  # fmt: skip

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self._NORMS:
            x = args[0] if args else kwargs["input"]
            if func not in (torch.layer_norm, torch.nn.functional.layer_norm):
                return torch.empty_like(x)
            shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
            if tuple(x.shape[len(x.shape) - len(shape) :]) == tuple(shape):  # else: its own error
                return torch.empty_like(x)
        return func(*args, **kwargs)


def _check_tiles(plan: Plan) -> None:
    """Run each tiled segment on meta inputs of its tiles' shapes (first, last and interior tiles of each dim), so a
    forward that branches on sizes is refused before the first tile rather than failing in the middle of a run.
    MONAI's UpCat pads when an odd size was halved: traced on the whole image, the pad is there for every tile."""
    from .geometry.trace import hooks_off
    from .memory.estimate import on_meta

    g = plan.graph
    if g is None:
        return
    for sp in plan.segments:
        if sp.keep or len(sp.grid) <= 1:
            continue
        seg = sp.segment
        module = seg.module
        with on_meta(module, g.dtype), torch.no_grad(), hooks_off(), _ShapeOnlyNorms():
            for combo in itertools.product(*(_representatives(spans) for spans in sp.grid.spans)):
                window = tuple(slice(s.in_start, s.in_stop) for s in combo)
                args = [
                    torch.empty(
                        (*g.shape(s)[:2], *(b.stop - b.start for b in g.source_box(s, window))),
                        device="meta", dtype=g.dtype,
                    )
                    for s in seg.sources
                ] + [torch.empty(g.shape(s), device="meta", dtype=g.dtype) for s in seg.globals]  # fmt: skip
                try:
                    y = module(*args)
                    ok = all(
                        c.stop - c.start == s.out_stop - s.out_start and (c.stop or 0) <= n
                        for c, s, n in zip((s.crop for s in combo), combo, y.shape[2:])
                    )
                    failure = "" if ok else f"gives {tuple(y.shape[2:])}, which does not hold the tile's core"
                except (RuntimeError, ValueError, TypeError, IndexError) as err:
                    failure = f"fails: {type(err).__name__}: {str(err).splitlines()[0]}"
                if failure:
                    raise GeometryError(
                        f"segment {seg.name} of the plan for input {'x'.join(map(str, g.input_shape))} runs on the "
                        f"whole image but on a tile of image px {[(w.start, w.stop) for w in window]} it {failure}. "
                        "Its forward depends on the input size (e.g. MONAI's UpCat pads when a size was odd before "
                        'a downsampling). Use mode="lean" (one segment running the model itself on each tile), or '
                        "an input whose size is divisible by the network's total downsampling"
                    )


def _conventional_peak(graph: TrunkGraph, input_in_memory: bool, has_head: bool) -> int:
    profs = graph.profiles.values()
    saved = sum(p.saved for p in profs)
    largest = max(p.out_bytes for p in profs)
    return int(
        2 * graph.param_bytes + _nbytes(graph.input_shape, graph.dtype) + saved + BACKWARD_TRANSIENT * largest
    )
