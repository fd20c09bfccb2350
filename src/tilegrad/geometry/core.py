"""The geometry of a tensor in a trunk: stride, dependency interval and tile-origin alignment, and how they compose.

The geometry of every tensor in a trunk is described per spatial dimension by three numbers, all in *input* pixels:

* ``stride`` S (a Fraction: 2 after a stride-2 conv, 1/2 after a 2x upsampling): output index i sits at input i*S;
* ``lo`` and ``hi``: output index i depends only on input pixels i*S + lo ... i*S + hi (inclusive).

NOTE [ Translation equivariance ]
Every operation accepted here is translation equivariant on the grid it lives on: if a tile starts at input pixel
``a`` and ``a / S_n`` is an integer for every tensor n of the graph, then local index i of tensor n on the tile is
global index ``i + a / S_n`` of tensor n on the whole image. ``align`` is the smallest positive integer with that
property (the lcm of the numerators of all S_n); tile origins are multiples of it, so strided layers sample the same
grid on a tile as on the whole image. Operations that depend on absolute position or size (adaptive or global
pooling, ``interpolate(size=...)``, ``align_corners=True``, circular padding, reading ``x.shape``) are refused.

NOTE [ Valid region ]
A tile's output index i equals the whole-image output at that index when the input interval i*S + lo ... i*S + hi
lies inside the tile's input, except where it reaches past the image border and the tile touches that border: there
the padding is real (it is the same padding the whole-image computation uses). Everything else a tile computes
near its inner edges comes from fake padding and is cropped before it reaches an output or a gradient.

The rules (tilegrad/geometry/rules/) are applied to a ``torch.fx`` trace of the module (tilegrad/geometry/trace.py),
so graphs are handled, not only chains: residual additions, concatenations, U-Net skips. Rules for other layers are
written with the toolkit in tilegrad/geometry/toolkit.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["DimGeometry", "Geometry", "ReceptiveField", "compose"]


@dataclass(frozen=True)
class DimGeometry:
    """Geometry of one tensor along one spatial dimension, in input pixels (see module docstring)."""

    stride: Fraction
    lo: Fraction
    hi: Fraction

    @staticmethod
    def identity() -> DimGeometry:
        return DimGeometry(Fraction(1), Fraction(0), Fraction(0))

    def then(self, stride: Fraction, lo: Fraction, hi: Fraction) -> DimGeometry:
        """Apply a local op whose output j depends on its input j*stride + lo ... j*stride + hi (op units)."""
        return DimGeometry(self.stride * stride, self.lo + lo * self.stride, self.hi + hi * self.stride)

    def union(self, other: DimGeometry) -> DimGeometry:
        return DimGeometry(self.stride, min(self.lo, other.lo), max(self.hi, other.hi))


@dataclass(frozen=True)
class Geometry:
    """Geometry of a tensor: one DimGeometry per spatial dim plus the alignment tile origins need."""

    dims: tuple[DimGeometry, ...]
    align: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.dims)

    @staticmethod
    def identity(ndim: int) -> Geometry:
        return Geometry(tuple(DimGeometry.identity() for _ in range(ndim)), (1,) * ndim)


def compose(first: Geometry, second: Geometry) -> Geometry:
    """Geometry of ``second(first(x))`` (``second`` measured in units of ``first``'s output)."""
    dims = []
    align = []
    for d1, d2, a1, a2 in zip(first.dims, second.dims, first.align, second.align):
        dims.append(d1.then(d2.stride, d2.lo, d2.hi))
        scaled = Fraction(a2) * d1.stride
        align.append(math.lcm(a1, scaled.numerator, d1.stride.numerator))
    return Geometry(tuple(dims), tuple(align))


@dataclass(frozen=True)
class ReceptiveField:
    """What :func:`receptive_field` reports, per spatial dimension.

    ``stride``: input pixels per output pixel (a Fraction below 1 for upsampling trunks).
    ``halo``: (left, right) input pixels beyond an output pixel's own stride cell that it depends on.
    ``size``: receptive field of one output pixel, in input pixels.
    ``align``: tile origins must be multiples of this many input pixels.
    """

    stride: tuple[Fraction, ...]
    halo: tuple[tuple[int, int], ...]
    size: tuple[int, ...]
    align: tuple[int, ...]

    @staticmethod
    def from_geometry(geometry: Geometry) -> ReceptiveField:
        halo = []
        size = []
        for d in geometry.dims:
            cell = max(d.stride, Fraction(1))
            halo.append((max(0, math.ceil(-d.lo)), max(0, math.ceil(d.hi - (cell - 1)))))
            size.append(math.ceil(d.hi) - math.floor(d.lo) + 1)
        return ReceptiveField(
            stride=tuple(d.stride for d in geometry.dims),
            halo=tuple(halo),
            size=tuple(size),
            align=geometry.align,
        )

    def __str__(self) -> str:
        def fmt(s: Fraction) -> str:
            return str(s.numerator) if s.denominator == 1 else f"{s.numerator}/{s.denominator}"

        return (
            f"stride {' x '.join(fmt(s) for s in self.stride)}, "
            f"halo {' x '.join(f'{lo}+{hi}' for lo, hi in self.halo)} px, "
            f"receptive field {' x '.join(str(s) for s in self.size)} px"
        )
