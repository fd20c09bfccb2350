"""N-d tile grids: which input box each tile reads and which output box it owns.

A grid partitions the *output* of a trunk into disjoint boxes (the tiles' cores). For each core the grid gives the
input box the tile must read (core's receptive field plus the halo, clipped to the image, origin aligned as in
NOTE [ Translation equivariance ] of tilegrad/geometry/core.py) and where the core sits inside the tile's own output.

NOTE [ Disjoint cores ]
Cores never overlap and together cover the whole output, so summing each tile's parameter gradients (computed from
its core only) counts every output position exactly once, and overlapping input gradients add up correctly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np

from .errors import GeometryError, ShapeError
from .geometry import DimGeometry, Geometry

__all__ = ["Span", "Tile", "TileGrid", "dim_summary", "grid_lengths", "grid_summary", "plan_dim", "tile_grid"]


@dataclass(frozen=True)
class Span:
    """One tile along one dim: input [in_start, in_stop) produces the core output [out_start, out_stop).

    ``offset`` is the global output index of the tile's local output index 0 (``in_start / stride``).
    """

    in_start: int
    in_stop: int
    out_start: int
    out_stop: int
    offset: int

    @property
    def in_length(self) -> int:
        return self.in_stop - self.in_start

    @property
    def crop(self) -> slice:
        """Where the core sits in the tile's own output."""
        return slice(self.out_start - self.offset, self.out_stop - self.offset)


class _IntDim:
    """A DimGeometry in integer arithmetic (all terms over one common denominator), for fast tile planning."""

    def __init__(self, dim: DimGeometry, align: int, in_len: int):
        den = math.lcm(dim.stride.denominator, dim.lo.denominator, dim.hi.denominator)
        self.den = den
        self.s = int(dim.stride * den)
        self.lo = int(dim.lo * den)
        self.hi = int(dim.hi * den)
        self.stride = dim.stride
        self.align = align
        self.in_len = in_len

    def bounds(self, j0: int, j1: int) -> tuple[int, int]:
        need_lo = (j0 * self.s + self.lo) // self.den  # floor
        need_hi = -((-((j1 - 1) * self.s + self.hi)) // self.den)  # ceil
        start = max(0, (need_lo // self.align) * self.align)
        # tile extents are multiples of the alignment too, so that every inner map of the tile has whole pixels
        # (a U-Net's skip concatenations need the encoder and decoder maps of a tile to agree in size)
        stop = min(self.in_len, -(-(need_hi + 1) // self.align) * self.align)
        return start, stop

    def span(self, j0: int, j1: int) -> Span:
        start, stop = self.bounds(j0, j1)
        offset, rest = divmod(start * self.den, self.s)  # start / stride, in integers
        if rest:  # pragma: no cover - guaranteed by align (see geometry/core.py)
            raise GeometryError(f"tile origin {start} is not on the output grid of stride {self.stride}")
        return Span(start, stop, j0, j1, offset)

    def max_length(self, out_len: int, core: int) -> int:
        """Largest input extent over the tiles of cores ``core`` (vectorised :meth:`bounds`)."""
        j0 = np.arange(0, out_len, core, dtype=np.int64)
        j1 = np.minimum(out_len, j0 + core)
        need_lo = (j0 * self.s + self.lo) // self.den
        need_hi = -((-((j1 - 1) * self.s + self.hi)) // self.den)
        start = np.maximum(0, (need_lo // self.align) * self.align)
        stop = np.minimum(self.in_len, -(-(need_hi + 1) // self.align) * self.align)
        return int((stop - start).max())


@functools.lru_cache(maxsize=4096)
def plan_dim(
    dim: DimGeometry, align: int, in_len: int, out_len: int, tile: int, axis: int = 0
) -> tuple[Span, ...]:
    """Split one dim into tiles whose input extent is at most ``tile``, each with the largest core that fits.

    NOTE [ Greedy cores ]: cores are chosen left to right, each as long as the tile allows. A tile at the image
    border needs no halo on that side, so its core is longer than an interior one: with a 3D U-Net's 23 px halo a
    64 px tile covers 40 output px at a border and 16 inside, and a 96 px axis takes 3 tiles instead of the 6 of
    equal cores (27 tiles in 3D instead of 216). Greedy is optimal here: a sub-range of a core that fits fits too,
    so no split has fewer tiles.

    >>> from fractions import Fraction
    >>> from tilegrad.geometry import DimGeometry
    >>> g = DimGeometry(Fraction(1), Fraction(-2), Fraction(2))   # two 3x3 convs, padding 1
    >>> [(s.in_start, s.in_stop, s.out_start, s.out_stop) for s in plan_dim(g, 1, 20, 20, 10)]
    [(0, 10, 0, 8), (6, 16, 8, 14), (12, 20, 14, 20)]
    """
    spans: list[Span] = []
    for run, repeats, shift, in_shift in _greedy_runs(dim, align, in_len, out_len, tile, axis):
        for i in range(repeats):
            d, di = i * shift, i * in_shift
            spans.extend(
                Span(s.in_start + di, s.in_stop + di, s.out_start + d, s.out_stop + d, s.offset + d)
                for s in run
            )
    return tuple(spans)


@functools.lru_cache(maxsize=65536)
def dim_summary(
    dim: DimGeometry, align: int, in_len: int, out_len: int, tile: int, axis: int = 0
) -> tuple[int, int, int]:
    """(number of tiles, largest input extent, sum of input extents) of :func:`plan_dim`'s split, without
    listing the tiles: what the planner needs of a tile size (NOTE [ Periodic cores ])."""
    count = longest = total = 0
    for run, repeats, _, _ in _greedy_runs(dim, align, in_len, out_len, tile, axis):
        count += len(run) * repeats
        longest = max([longest, *(s.in_length for s in run)])
        total += sum(s.in_length for s in run) * repeats
    return count, longest, total


@functools.lru_cache(maxsize=65536)
def dim_lengths(
    dim: DimGeometry, align: int, in_len: int, out_len: int, tile: int, axis: int = 0
) -> tuple[int, ...]:
    """The distinct input extents of :func:`plan_dim`'s tiles, longest first, without listing the tiles."""
    runs = _greedy_runs(dim, align, in_len, out_len, tile, axis)
    return tuple(sorted({s.in_length for run, _, _, _ in runs for s in run}, reverse=True))


@functools.lru_cache(maxsize=4096)
def _smallest_tile(dim: DimGeometry, align: int, in_len: int, out_len: int) -> int:
    """The largest input extent of a one-pixel core: the smallest tile that works."""
    return _IntDim(dim, align, in_len).max_length(out_len, 1)


@functools.lru_cache(maxsize=4096)
def _greedy_runs(
    dim: DimGeometry, align: int, in_len: int, out_len: int, tile: int, axis: int
) -> tuple[tuple[tuple[Span, ...], int, int, int], ...]:
    """The greedy cores (NOTE [ Greedy cores ]) as runs ``(spans, repeats, output shift, input shift)``: repeat
    ``i`` of a run is its spans shifted by ``i`` shifts.

    NOTE [ Periodic cores ]
    The longest core from ``j0`` depends on ``j0`` alone, and away from the image borders it is translation
    invariant under a shift of ``P`` output px whose image extent is a whole number of alignments (``P * stride``
    a multiple of ``align``: every bound moves by that many image px). So once two interior cores start at the same
    ``j0`` modulo ``P``, the cores between them repeat until the far border is near; those repeats are added as a
    run instead of being searched one by one. Same spans, in O(P) work instead of O(tiles): a 65536 px axis in
    48 px tiles is one run of a few cores repeated some hundred times.
    """
    if tile >= in_len:
        return (((Span(0, in_len, 0, out_len, 0),), 1, 0, 0),)

    fast = _IntDim(dim, align, in_len)
    need = _smallest_tile(dim, align, in_len, out_len)
    if need > tile:
        left = max(0, math.ceil(-dim.lo))
        right = max(0, math.ceil(dim.hi - (max(dim.stride, 1) - 1)))
        err = GeometryError(
            f"tile_size {tile} (spatial axis {axis}) is smaller than the halo the network needs "
            f"({left} + {right} px + stride {dim.stride}, tile origins on multiples of {align}): "
            f"use at least {need}"
        )
        err.minimum = need  # type: ignore[attr-defined]
        err.halo = (left, right)  # type: ignore[attr-defined]
        raise err

    def fits_span(j0: int, j1: int) -> bool:
        start, stop = fast.bounds(j0, j1)
        return stop - start <= tile

    def unclipped_stop(j1: int) -> int:
        need_hi = -((-((j1 - 1) * fast.s + fast.hi)) // fast.den)
        return -(-(need_hi + 1) // align) * align

    period = align * fast.den // math.gcd(align * fast.den, fast.s)  # P (NOTE [ Periodic cores ])
    runs: list[tuple[tuple[Span, ...], int, int, int]] = []
    spans: list[Span] = []
    seen: dict[int, tuple[int, int]] = {}  # j0 % P -> (j0, index in spans) of interior cores
    j0, core = 0, 0
    while j0 < out_len:  # NOTE [ Greedy cores ]: the longest core from j0 that fits, by bisection
        if seen is not None and (j0 * fast.s + fast.lo) // fast.den >= 0:  # no clipping at the low border
            if j0 % period in seen:
                first, at = seen[j0 % period]
                shift = j0 - first
                in_shift = shift * fast.s // fast.den  # a whole number of alignments

                def valid(c: int, first: int = first, shift: int = shift) -> bool:
                    """Whether repeat ``c`` of the cores [first, j0) decides as repeat 0 did: the furthest bound
                    it tries is inside the output and unclipped by the image border."""
                    last = first + (c + 1) * shift + 1
                    return last <= out_len and unclipped_stop(last) <= in_len

                if valid(1):
                    lo, hi = 1, (out_len - first) // shift
                    while lo < hi:
                        mid = (lo + hi + 1) // 2
                        if valid(mid):
                            lo = mid
                        else:
                            hi = mid - 1
                    runs.append((tuple(spans[:at]), 1, 0, 0))
                    runs.append((tuple(spans[at:]), lo + 1, shift, in_shift))
                    spans = []
                    j0 = first + (lo + 1) * shift
                    seen = None  # type: ignore[assignment]  # one run per axis: the rest is the far border
                    continue
            else:
                seen[j0 % period] = (j0, len(spans))
        lo_end, hi_end = j0 + 1, out_len  # j0 + 1 fits: fits(1) checked every position
        # interior cores repeat: try the previous length first (two bounds, not a bisection)
        guess = j0 + core
        if core and guess <= out_len:
            if not fits_span(j0, guess):
                hi_end = guess - 1
            elif guess == out_len or not fits_span(j0, guess + 1):
                lo_end = hi_end = guess
            else:
                lo_end = guess + 1
        while lo_end < hi_end:
            mid = (lo_end + hi_end + 1) // 2
            if fits_span(j0, mid):
                lo_end = mid
            else:
                hi_end = mid - 1
        spans.append(fast.span(j0, lo_end))
        j0, core = lo_end, lo_end - j0
    runs.append((tuple(spans), 1, 0, 0))
    return tuple(r for r in runs if r[0])


@dataclass(frozen=True)
class Tile:
    """One N-d tile: input box, global output core box, and the core's place in the tile's own output."""

    inputs: tuple[slice, ...]
    outputs: tuple[slice, ...]
    crop: tuple[slice, ...]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.inputs)


@dataclass(frozen=True)
class TileGrid:
    """Product of per-dim spans. Iterating yields :class:`Tile` objects in raster order."""

    spans: tuple[tuple[Span, ...], ...]

    def __iter__(self) -> Iterator[Tile]:
        for combo in product(*self.spans):
            yield Tile(
                tuple(slice(s.in_start, s.in_stop) for s in combo),
                tuple(slice(s.out_start, s.out_stop) for s in combo),
                tuple(s.crop for s in combo),
            )

    def __len__(self) -> int:
        return math.prod(len(s) for s in self.spans)

    @functools.cached_property
    def max_in_shape(self) -> tuple[int, ...]:
        return tuple(max(s.in_length for s in spans) for spans in self.spans)

    @functools.cached_property
    def input_area(self) -> int:
        """Input pixels read over all tiles (counting overlaps): the work streaming does."""
        return math.prod(sum(s.in_length for s in spans) for spans in self.spans)


def tile_grid(
    geometry: Geometry,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    tile_size: Sequence[int],
) -> TileGrid:
    """Tile grid for spatial input/output shapes and a per-dim tile size (input pixels, halo included)."""
    if not (len(in_shape) == len(out_shape) == len(tile_size) == geometry.ndim):
        raise ShapeError(
            f"expected {geometry.ndim} spatial dims everywhere, received input {tuple(in_shape)}, "
            f"output {tuple(out_shape)}, tile {tuple(tile_size)}"
        )
    return TileGrid(
        tuple(
            tuple(plan_dim(d, a, i, o, t, axis))
            for axis, (d, a, i, o, t) in enumerate(
                zip(geometry.dims, geometry.align, in_shape, out_shape, tile_size)
            )
        )
    )


def grid_summary(
    geometry: Geometry,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    tile_size: Sequence[int],
) -> tuple[int, tuple[int, ...], int]:
    """(number of tiles, largest input box, input area over all tiles) of :func:`tile_grid`'s grid without listing
    its tiles (NOTE [ Periodic cores ]); raises as :func:`tile_grid` does."""
    if not (len(in_shape) == len(out_shape) == len(tile_size) == geometry.ndim):
        raise ShapeError(
            f"expected {geometry.ndim} spatial dims everywhere, received input {tuple(in_shape)}, "
            f"output {tuple(out_shape)}, tile {tuple(tile_size)}"
        )
    dims = [
        dim_summary(d, a, i, o, t, axis)
        for axis, (d, a, i, o, t) in enumerate(
            zip(geometry.dims, geometry.align, in_shape, out_shape, tile_size)
        )
    ]
    return math.prod(c for c, _, _ in dims), tuple(m for _, m, _ in dims), math.prod(t for _, _, t in dims)


def grid_lengths(
    geometry: Geometry,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    tile_size: Sequence[int],
) -> tuple[tuple[int, ...], ...]:
    """Per dim, the distinct input extents of :func:`tile_grid`'s tiles, longest first: the grid's tile shapes are
    their products (a working set need not be largest at the largest tile: NOTE [ Inference tile memory ] in
    plan.py)."""
    return tuple(
        dim_lengths(d, a, i, o, t, axis)
        for axis, (d, a, i, o, t) in enumerate(
            zip(geometry.dims, geometry.align, in_shape, out_shape, tile_size)
        )
    )
