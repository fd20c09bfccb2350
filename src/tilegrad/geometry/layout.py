"""Which dims of a traced tensor are batch, channel or spatial, and the values read from tensor sizes.

NOTE [ Layouts and tile extents ]
A tile differs from the whole image only in the extent of its spatial dims. So the trace walker
(tilegrad/geometry/trace.py) labels every dim of every tensor that depends on the input: ``"N"`` (batch), ``"C"``
(channels, or several dims that channels were reshaped into), ``"NC"`` (batch and channels merged) or the index ``k``
of a spatial dim. The input has the *standard layout* ``("N", "C", 0, ..., ndim-1)``, and:

* reading the size of a batch or channel dim gives a constant of the model; reading a spatial size gives the tile's
  extent (an :class:`Extent`), which may only be handed back unchanged as that dim's size to view/reshape
  (ShuffleNetV2's channel shuffle); a value computed from it (``h // 2``, ``h * w``) is :class:`TileDependent`, and
  an operation that takes one is refused (its result would differ between a tile and the image);
* view/reshape/flatten/unsqueeze/squeeze are local when every spatial dim comes out whole and in order, so only
  batch and channel dims are regrouped; permute/transpose only relabel dims (ConvNeXt's channels-last block);
  ``repeat`` is local when it repeats no spatial dim (MONAI's VNet repeats channels);
* an operation along a dim (LayerNorm, Linear, GLU, softmax, cat, chunk, indexing) is local when that dim is not
  spatial: LayerNorm and Linear over channels in a channels-last block are local, LayerNorm over spatial dims is a
  statistic over positions and is refused;
* element-wise operations keep any layout; every other operation (convolution, pooling, padding, resampling, custom
  rules) needs the standard layout, because its geometry is written for (N, C, *spatial).

Branches on sizes (``if x.shape[-1] != y.shape[-1]``, ``len(x.shape)``) are decided while tracing with the sizes of
an example input on the meta device whose spatial extents are multiples of every stride (what aligned tiles see);
the graph keeps the size reads themselves symbolic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

__all__ = [
    "Extent",
    "ExtentTuple",
    "Label",
    "Layout",
    "TileDependent",
    "describe",
    "dim_label",
    "flatten_layout",
    "is_spatial",
    "regroup",
    "standard",
]

Label = Union[str, int]
"""``"N"``, ``"C"``, ``"NC"`` or the index of a spatial dim."""
Layout = tuple[Label, ...]


@dataclass(frozen=True)
class Extent:
    """The size of spatial dim ``label`` of a traced tensor: the tile's extent, not the image's."""

    label: int


@dataclass(frozen=True)
class ExtentTuple:
    """``x.shape`` / ``x.size()`` (or a slice of it): one label per entry; spatial entries are tile extents."""

    labels: tuple[Label, ...]

    @property
    def spatial(self) -> bool:
        return any(is_spatial(label) for label in self.labels)


@dataclass(frozen=True)
class TileDependent:
    """A value computed from a tile extent (``h // 2``, ``h == w``): it differs between a tile and the image."""

    source: str


def standard(ndim: int) -> Layout:
    """The layout of the trunk's input: (N, C, spatial 0, ..., spatial ndim-1)."""
    return ("N", "C", *range(ndim))


def is_spatial(label: Label) -> bool:
    return isinstance(label, int)


def describe(layout: Layout, ndim: int) -> str:
    """``(N, H, W, C)``: the layout in the letters users know."""
    names = {1: "L", 2: "HW", 3: "DHW"}[ndim] if ndim in (1, 2, 3) else None
    parts = [
        (names[label] if names else f"S{label}") if is_spatial(label) else str(label) for label in layout
    ]
    return f"({', '.join(parts)})"


def dim_label(layout: Layout, dim: Any) -> Label | None:
    """The label of ``dim`` (negative dims count from the end), or None when ``dim`` is not a valid int dim."""
    if not isinstance(dim, int) or isinstance(dim, bool):
        return None
    if not -len(layout) <= dim < len(layout):
        return None
    return layout[dim]


def _union(labels: Sequence[Label]) -> Label:
    kinds = set()
    for label in labels:
        kinds.update(str(label))
    return "NC" if kinds >= {"N", "C"} else ("N" if "N" in kinds else "C")


def flatten_layout(layout: Layout, start: int, end: int) -> Layout | None:
    """Layout after flattening dims start..end (inclusive), or None when that merges a spatial dim."""
    rank = len(layout)
    start, end = start % rank, end % rank
    merged = layout[start : end + 1]
    if any(is_spatial(label) for label in merged):
        return None
    return (*layout[:start], _union(merged) if merged else "C", *layout[end + 1 :])


def regroup(
    layout: Layout, in_shape: Sequence[int], out_shape: Sequence[int], out_spatial: Sequence[Label | None]
) -> Layout | None:
    """Layout after a view/reshape from ``in_shape`` to ``out_shape``, or None when it is not local.

    ``out_spatial[j]`` is the spatial label whose extent output dim j was given as (an :class:`Extent`), else None.
    Local: the spatial dims come out whole, in the same order, and the non-spatial dims between two spatial dims are
    regrouped among themselves (same product); each output dim takes the labels of the input dims it covers.
    """
    in_pos = [i for i, label in enumerate(layout) if is_spatial(label)]
    out_pos = [j for j, label in enumerate(out_spatial) if label is not None]
    if [layout[i] for i in in_pos] != [out_spatial[j] for j in out_pos]:
        return None
    if any(in_shape[i] != out_shape[j] for i, j in zip(in_pos, out_pos)):
        return None
    out: list[Label] = list(out_spatial)  # type: ignore[arg-type]
    in_bounds = [-1, *in_pos, len(layout)]
    out_bounds = [-1, *out_pos, len(out_shape)]
    for g in range(len(in_bounds) - 1):
        a = list(range(in_bounds[g] + 1, in_bounds[g + 1]))
        b = list(range(out_bounds[g] + 1, out_bounds[g + 1]))
        if math.prod(in_shape[i] for i in a) != math.prod(out_shape[j] for j in b):
            return None
        # cumulative products say which input dims each output dim covers
        starts, total = [], 1
        for i in a:
            starts.append((total, total * in_shape[i], layout[i]))
            total *= in_shape[i]
        acc = 1
        for j in b:
            lo, hi = acc, acc * out_shape[j]
            covered = [label for s, e, label in starts if s < hi and e > lo] or [
                label for _, _, label in starts
            ]
            out[j] = _union(covered) if covered else "C"
            acc = hi
    return tuple(out)
