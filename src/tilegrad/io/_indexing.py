"""numpy-style keys on lazy images: normalise once, read only the region the key touches.

Every reader turns ``image[key]`` into one :class:`AxisIndex` per axis (ints, slices with any non-zero step,
Ellipsis), then reads the region with *increasing* indices ``(lo, hi, step)`` per axis and flips the axes whose
step was negative. Backends therefore implement one method, ``_read(bounds)``, for increasing strided ranges.

>>> plan = normalize_key((0, slice(None, None, -2)), (3, 5))
>>> plan[1]
AxisIndex(start=4, step=-2, count=3, drop=False)
>>> plan[1].increasing()
(0, 5, 2)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ShapeError

__all__ = ["AxisIndex", "normalize_key", "read_planned", "read_strided_in_blocks"]

Bounds = tuple[tuple[int, int, int], ...]
"""Per axis ``(lo, hi, step)`` with ``0 <= lo``, ``step >= 1``: the elements ``range(lo, hi, step)``."""


@dataclass(frozen=True)
class AxisIndex:
    """The elements one axis of a key selects: ``start, start + step, ...`` (``count`` of them)."""

    start: int
    step: int
    count: int
    drop: bool = False
    """True for an integer index: the axis is removed from the result."""

    def increasing(self) -> tuple[int, int, int]:
        """The same elements as ``(lo, hi, step)`` with a positive step (result then flipped if step < 0)."""
        if self.count == 0:
            return (0, 0, 1)
        last = self.start + self.step * (self.count - 1)
        lo = min(self.start, last)
        return (lo, max(self.start, last) + 1, abs(self.step))


def _as_index(value: Any, size: int, axis: int) -> int:
    try:
        i = operator.index(value)
    except TypeError:
        raise ShapeError(
            f"lazy images take ints, slices and Ellipsis as indices; axis {axis} received {type(value).__name__} "
            f"{value!r}. Read a region first (np.asarray(image[...])) and index the numpy array for fancy indexing"
        ) from None
    if not -size <= i < size:
        raise IndexError(f"index {i} is out of bounds for axis {axis} with size {size}")
    return i + size if i < 0 else i


def normalize_key(key: Any, shape: Sequence[int]) -> tuple[AxisIndex, ...]:
    """Turn a numpy-style key into one :class:`AxisIndex` per axis of ``shape``.

    >>> normalize_key((Ellipsis, 1), (2, 3, 4))
    (AxisIndex(start=0, step=1, count=2, drop=False), AxisIndex(start=0, step=1, count=3, drop=False), \
AxisIndex(start=1, step=1, count=1, drop=True))
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is None for k in key):
        raise ShapeError("lazy images do not take None/np.newaxis in a key; add the axis to the numpy result")
    n_ellipsis = sum(k is Ellipsis for k in key)
    if n_ellipsis > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if len(key) - n_ellipsis > ndim:
        raise IndexError(
            f"too many indices: the image has {ndim} axes {shape}, the key has {len(key) - n_ellipsis}"
        )
    if n_ellipsis:
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        fill = (slice(None),) * (ndim - len(key) + 1)
        key = key[:at] + fill + key[at + 1 :]
    key = key + (slice(None),) * (ndim - len(key))
    plan = []
    for axis, (k, size) in enumerate(zip(key, shape)):
        if isinstance(k, slice):
            start, stop, step = k.indices(size)
            plan.append(AxisIndex(start, step, len(range(start, stop, step))))
        else:
            plan.append(AxisIndex(_as_index(k, size, axis), 1, 1, drop=True))
    return tuple(plan)


def read_planned(
    plan: Sequence[AxisIndex], read: Callable[[Bounds], np.ndarray], dtype: np.dtype
) -> np.ndarray:
    """Read ``plan`` through ``read(bounds)`` (increasing strided ranges), then flip and drop axes as planned."""
    counts = tuple(a.count for a in plan)
    if 0 in counts:
        out = np.empty(counts, dtype=dtype)
    else:
        bounds = tuple(a.increasing() for a in plan)
        out = np.asarray(read(bounds))
        expected = tuple(len(range(*b)) for b in bounds)
        if out.shape != expected:  # pragma: no cover - a backend bug, not a user error
            raise ShapeError(
                f"internal: backend returned {out.shape} for bounds {bounds}, expected {expected}"
            )
        flips = tuple(i for i, a in enumerate(plan) if a.step < 0 and a.count > 1)
        if flips:  # copied: negative strides are refused by torch.from_numpy
            out = np.ascontiguousarray(np.flip(out, flips))
    drop = tuple(0 if a.drop else slice(None) for a in plan)
    # No other copy: backends return fresh arrays, and a channel-first transpose of an (H, W, C) file stays a
    # strided view with positive strides (torch.from_numpy takes it) instead of doubling the memory of every read.
    return out[drop]  # all ints: a scalar, as numpy


def read_strided_in_blocks(
    read_box: Callable[[tuple[tuple[int, int], ...]], np.ndarray], bounds: Bounds, max_elements: int
) -> np.ndarray:
    """Read strided ``bounds`` through a reader of contiguous boxes without ever holding a box larger than
    ``max_elements`` (unless a single output element needs it): the box is split along its longest axis.

    Used by backends that can only read rectangles (OpenSlide's read_region), so that ``image[:, ::64, ::64]``
    of a gigapixel slide costs memory for the result, not for the whole slide.

    >>> a = np.arange(100).reshape(10, 10)
    >>> box = lambda b: a[tuple(slice(lo, hi) for lo, hi in b)]
    >>> np.array_equal(read_strided_in_blocks(box, ((1, 10, 3), (0, 10, 2)), 12), a[1::3, ::2])
    True
    """
    counts = [len(range(*b)) for b in bounds]
    box = tuple((lo, lo + (n - 1) * step + 1) for (lo, _, step), n in zip(bounds, counts))
    size = math.prod(hi - lo for lo, hi in box)
    if size <= max_elements or all(n <= 1 for n in counts):
        data = read_box(box)
        return data[tuple(slice(None, None, step) for _, _, step in bounds)]
    axis = max((i for i, n in enumerate(counts) if n > 1), key=lambda i: box[i][1] - box[i][0])
    lo, _, step = bounds[axis]
    half = counts[axis] // 2
    first = (*bounds[:axis], (lo, lo + half * step, step), *bounds[axis + 1 :])
    second = (*bounds[:axis], (lo + half * step, bounds[axis][1], step), *bounds[axis + 1 :])
    return np.concatenate(
        [
            read_strided_in_blocks(read_box, first, max_elements),
            read_strided_in_blocks(read_box, second, max_elements),
        ],
        axis=axis,
    )
