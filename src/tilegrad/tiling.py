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
from fractions import Fraction
from itertools import product

import numpy as np

from .errors import GeometryError, ShapeError
from .geometry import DimGeometry, Geometry

__all__ = ["Span", "Tile", "TileGrid", "plan_dim", "tile_grid"]


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
        offset = Fraction(start) / self.stride
        if offset.denominator != 1:  # pragma: no cover - guaranteed by align (see geometry/core.py)
            raise GeometryError(f"tile origin {start} is not on the output grid of stride {self.stride}")
        return Span(start, stop, j0, j1, int(offset))

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
    if tile >= in_len:
        return (Span(0, in_len, 0, out_len, 0),)

    fast = _IntDim(dim, align, in_len)

    def fits(core: int) -> bool:
        return fast.max_length(out_len, core) <= tile

    if not fits(1):
        need = fast.max_length(out_len, 1)
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

    spans = []
    j0, core = 0, 0
    while j0 < out_len:  # NOTE [ Greedy cores ]: the longest core from j0 that fits, by bisection
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
    return tuple(spans)


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

    @property
    def max_in_shape(self) -> tuple[int, ...]:
        return tuple(max(s.in_length for s in spans) for spans in self.spans)

    @property
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
