"""Tile grid properties: cores are disjoint and cover the output, inputs fit the tile, origins are aligned."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from tilegrad.errors import GeometryError
from tilegrad.geometry import DimGeometry, Geometry
from tilegrad.tiling import plan_dim, tile_grid

GEOMETRIES = [
    # (stride, lo, hi, align): input px of output i are i*stride+lo .. i*stride+hi
    (Fraction(1), Fraction(-2), Fraction(2), 1),  # two 3x3 convs
    (Fraction(4), Fraction(-9), Fraction(14), 4),  # strided net
    (Fraction(32), Fraction(-449), Fraction(449), 32),  # ResNet-34 trunk
    (Fraction(1, 2), Fraction(-3, 2), Fraction(1), 2),  # 2x upsampling net
]


@pytest.mark.parametrize(("stride", "lo", "hi", "align"), GEOMETRIES)
@pytest.mark.parametrize("in_len", [1, 7, 64, 333, 1000])
@pytest.mark.parametrize("tile", [40, 97, 256, 5000])
def test_plan_dim_properties(stride, lo, hi, align, in_len, tile):
    dim = DimGeometry(stride, lo, hi)
    out_len = max(1, int(in_len / stride))
    try:
        spans = plan_dim(dim, align, in_len, out_len, tile)
    except Exception as err:  # too small a tile must be refused with the size that works
        assert "use at least" in str(err)
        need = int(str(err).rsplit("use at least ", 1)[1])
        assert need > tile
        plan_dim(dim, align, in_len, out_len, need)
        return
    covered = np.zeros(out_len, int)
    for s in spans:
        covered[s.out_start : s.out_stop] += 1
        assert s.in_length <= max(tile, 1) or len(spans) == 1
        assert s.in_start % align == 0, "tile origins are aligned to the stride"
        if len(spans) > 1:
            # the core's receptive field lies inside the tile's input or reaches past the real image border
            need_lo = s.out_start * stride + lo
            need_hi = (s.out_stop - 1) * stride + hi
            assert s.in_start <= max(0, need_lo) and (s.in_stop >= min(in_len, need_hi + 1))
    assert (covered == 1).all(), "cores are disjoint and cover the output"


def test_tile_grid_nd_counts_and_raster_order():
    g = Geometry((DimGeometry(Fraction(1), Fraction(-1), Fraction(1)),) * 3, (1, 1, 1))
    grid = tile_grid(g, (10, 11, 12), (10, 11, 12), (6, 6, 6))
    tiles = list(grid)
    counts = [len(s) for s in grid.spans]
    assert counts == [2, 3, 3]  # cores of 5 fit a 6-px tile only at the borders of the 10-px axis
    assert len(tiles) == len(grid) == 2 * 3 * 3
    covered = np.zeros((10, 11, 12), int)
    for t in tiles:
        covered[t.outputs] += 1
    assert (covered == 1).all()
    assert [t.outputs[0].start for t in tiles[:9]] == [0] * 9  # raster order: last axis fastest
    assert grid.input_area >= 10 * 11 * 12


def test_tile_larger_than_image_is_one_tile():
    g = Geometry((DimGeometry(Fraction(2), Fraction(-5), Fraction(6)),) * 2, (2, 2))
    grid = tile_grid(g, (30, 31), (15, 16), (64, 64))
    (tile,) = list(grid)
    assert tile.inputs == (slice(0, 30), slice(0, 31)) and tile.outputs == (slice(0, 15), slice(0, 16))


@pytest.mark.parametrize("tile", list(itertools.product([12, 20], [16, 30])))
def test_tuple_tiles(tile):
    g = Geometry((DimGeometry(Fraction(1), Fraction(-2), Fraction(2)),) * 2, (1, 1))
    grid = tile_grid(g, (50, 40), (50, 40), tile)
    assert all(a <= b for a, b in zip(grid.max_in_shape, tile))


def _greedy_case(stride, lo, hi, align, in_len, tile):
    """(geometry, output length, spans, integer geometry) of one case; skipped when the tile is below the halo."""
    from tilegrad.tiling import _IntDim

    dim = DimGeometry(stride, lo, hi)
    out_len = max(1, int(in_len / stride))
    try:
        spans = plan_dim(dim, align, in_len, out_len, tile)
    except GeometryError:
        pytest.skip("tile below the halo: test_plan_dim_properties checks the error")
    return dim, out_len, spans, _IntDim(dim, align, in_len)


@pytest.mark.parametrize(("stride", "lo", "hi", "align"), GEOMETRIES)
@pytest.mark.parametrize(("in_len", "tile"), [(64, 40), (333, 97), (333, 256)])
def test_greedy_cores_use_the_fewest_tiles(stride, lo, hi, align, in_len, tile):
    """NOTE [ Greedy cores ]: no split of the output into cores whose inputs fit the tile has fewer tiles."""
    _, out_len, spans, fast = _greedy_case(stride, lo, hi, align, in_len, tile)

    def fits(a: int, b: int) -> bool:
        start, stop = fast.bounds(a, b)
        return stop - start <= tile or tile >= in_len

    fewest = [0] + [out_len + 1] * out_len  # fewest[b]: fewest cores covering [0, b)
    for b in range(1, out_len + 1):
        fewest[b] = min(fewest[a] + 1 for a in range(b) if fits(a, b))
    assert len(spans) == fewest[out_len]


def test_border_tiles_take_longer_cores():
    """A 3D U-Net's 23 px halo in 64 px tiles: 40 px cores at the borders, 16 inside (6 equal cores before)."""
    dim = DimGeometry(Fraction(1), Fraction(-23), Fraction(23))
    spans = plan_dim(dim, 4, 96, 96, 64)
    assert [(s.out_start, s.out_stop) for s in spans] == [(0, 41), (41, 57), (57, 96)]
    assert all(s.in_length <= 64 for s in spans)


PERIODIC = [
    *GEOMETRIES,
    (Fraction(4), Fraction(-93), Fraction(96), 8),  # ResNet-34's first stage, origins on multiples of 8
    (Fraction(1), Fraction(-5), Fraction(5), 8),  # alignment longer than the stride: cores of several lengths
    (Fraction(2), Fraction(-7), Fraction(6), 6),
    (Fraction(3, 2), Fraction(-4), Fraction(5), 3),
]


@pytest.mark.parametrize(("stride", "lo", "hi", "align"), PERIODIC)
@pytest.mark.parametrize(
    ("in_len", "tile"), [(5000, 97), (5000, 256), (20000, 333), (4097, 200), (65536, 1288)]
)
def test_periodic_cores_are_the_greedy_cores(stride, lo, hi, align, in_len, tile):
    """NOTE [ Periodic cores ]: the repeated runs give exactly the spans of the core-by-core greedy search, and the
    planner's summary (tiles, largest extent, total extent) is theirs."""
    from tilegrad.tiling import Span, _greedy_runs, dim_summary

    dim, out_len, spans, fast = _greedy_case(stride, lo, hi, align, in_len, tile)
    reference, j0 = [], 0
    while j0 < out_len:  # the longest core from j0 that fits, found by a linear scan
        j1 = j0 + 1
        while j1 < out_len and (lambda b: b[1] - b[0])(fast.bounds(j0, j1 + 1)) <= tile:
            j1 += 1
        reference.append(fast.span(j0, j1))
        j0 = j1
    assert list(spans) == reference
    runs = _greedy_runs(dim, align, in_len, out_len, tile, 0)
    assert len(spans) < 20 or any(repeats > 5 for _, repeats, _, _ in runs), "long axes are found periodic"
    assert all(isinstance(s, Span) for s in spans)
    lengths = [s.in_length for s in spans]
    assert dim_summary(dim, align, in_len, out_len, tile) == (len(spans), max(lengths), sum(lengths))
