"""Flips and 90-degree rotations of lazy images, applied by index arithmetic: nothing is read until sliced.

``FlipRotateView(image, k=1, flip=(2,))`` equals ``np.rot90(np.flip(image, (2,)), 1, axes=(-2, -1))``: reading
``view[:, y0:y1, x0:x1]`` reads exactly the matching region of ``image`` (transposed/reversed), so training can
augment a gigapixel slide without touching more than the tile being streamed. All eight orientations of the
square (the dihedral group) are reachable; :func:`random_flip_rotate` draws one uniformly.

>>> import numpy as np
>>> from tilegrad.io import ArrayImage
>>> a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
>>> view = FlipRotateView(ArrayImage(a), k=1, flip=(2,))
>>> view.shape
(2, 4, 3)
>>> bool((view[:, 1:3, ::-2] == np.rot90(np.flip(a, 2), 1, axes=(-2, -1))[:, 1:3, ::-2]).all())
True
>>> bool((view.invert(view.read()) == a).all())
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ShapeError
from ._indexing import AxisIndex, Bounds, read_planned
from .base import LazyImage, Level

__all__ = ["FlipRotateView", "random_flip_rotate"]


class FlipRotateView(LazyImage):
    """``np.rot90(np.flip(image, flip), k, axes)`` of a lazy image, computed per read.

    ``flip``: axes of the (C, *spatial) image to reverse (spatial only, i.e. not 0). ``k``: number of 90-degree
    rotations in the plane ``axes`` (default the last two axes: the slide plane, or (H, W) of a (D, H, W) volume),
    with numpy's direction convention. Metadata (spacing, affine, levels) follows the transform.
    """

    def __init__(
        self, image: LazyImage, *, k: int = 0, flip: Sequence[int] = (), axes: Sequence[int] = (-2, -1)
    ) -> None:
        self.base = image
        ndim = image.ndim
        self.k, self.flip, self.axes = int(k) % 4, tuple(flip), tuple(axes)
        plane = [self._axis(a, ndim, "axes") for a in axes]
        if len(plane) != 2 or plane[0] == plane[1]:
            raise ShapeError(f"axes must name two different spatial axes; received {tuple(axes)}")
        perm = list(range(ndim))  # view axis i shows base axis perm[i] ...
        rev = [False] * ndim  # ... reversed when rev[i]
        for a in flip:
            rev[self._axis(a, ndim, "flip")] ^= True
        a, b = plane
        for _ in range(self.k):  # numpy's rot90 with k=1: flip axis b, then swap a and b
            rev[b] ^= True
            perm[a], perm[b] = perm[b], perm[a]
            rev[a], rev[b] = rev[b], rev[a]
        self._perm, self._rev = tuple(perm), tuple(rev)
        self._shape = tuple(image.shape[p] for p in perm)
        self._dtype = image.dtype
        self.path = image.path
        self._level_index = image.level_index
        spacing = image.spacing
        self._spacing = None if spacing is None else tuple(spacing[p - 1] for p in perm[1:])
        self._affine = self._map_affine(image.affine)
        self._affine_space = image.affine_space
        self._levels = tuple(
            Level(tuple(lv.shape[p] for p in perm), tuple(lv.downsample[p - 1] for p in perm[1:]))
            for lv in image.levels
        )

    @staticmethod
    def _axis(a: int, ndim: int, what: str) -> int:
        if not -ndim < a < ndim or a % ndim == 0:
            raise ShapeError(
                f"{what} must be spatial axes of the (C, *spatial) image, 1..{ndim - 1} or negative; received {a}"
            )
        return a % ndim

    def _map_affine(self, affine: np.ndarray | None) -> np.ndarray | None:
        if affine is None:
            return None
        m = np.eye(4)  # view voxel index -> base voxel index
        n_spatial = self.ndim - 1
        m[:n_spatial, :n_spatial] = 0.0
        for i in range(1, self.ndim):
            q = self._perm[i] - 1
            m[q, i - 1] = -1.0 if self._rev[i] else 1.0
            m[q, 3] = self.base.shape[self._perm[i]] - 1 if self._rev[i] else 0.0
        return affine @ m

    def _read(self, bounds: Bounds) -> np.ndarray:
        base_plan: list[AxisIndex | None] = [None] * self.ndim
        for i, (lo, hi, step) in enumerate(bounds):
            count = len(range(lo, hi, step))
            p = self._perm[i]
            if self._rev[i]:
                n = self.base.shape[p]
                base_plan[p] = AxisIndex(n - 1 - lo, -step, count)
            else:
                base_plan[p] = AxisIndex(lo, step, count)
        out = read_planned(base_plan, self.base.read_bounds, self._dtype)
        return out.transpose(self._perm)

    def _open_level(self, k: int) -> FlipRotateView:
        return FlipRotateView(self.base.level(k), k=self.k, flip=self.flip, axes=self.axes)

    def close(self) -> None:
        self.base.close()

    # ------------------------------------------------------------------ arrays in the same frame
    def apply(self, array: Any) -> Any:
        """The same transform on an in-memory (C, *spatial) numpy array or torch tensor (labels, masks)."""
        flips = [p for p, r in zip(self._perm, self._rev) if r]
        if hasattr(array, "permute"):  # torch.Tensor
            out = array.flip(flips) if flips else array
            return out.permute(*self._perm)
        out = np.flip(array, flips) if flips else array
        return out.transpose(self._perm)

    def invert(self, array: Any) -> Any:
        """Map an array in the view's frame back to the image's frame (e.g. a saliency map)."""
        inverse = tuple(int(i) for i in np.argsort(self._perm))
        flips = [i for i, r in enumerate(self._rev) if r]
        if hasattr(array, "permute"):
            out = array.flip(flips) if flips else array
            return out.permute(*inverse)
        out = np.flip(array, flips) if flips else array
        return out.transpose(inverse)

    def __repr__(self) -> str:
        return f"FlipRotateView({self.base!r}, k={self.k}, flip={self.flip}, axes={self.axes})"


def random_flip_rotate(
    image: LazyImage, rng: np.random.Generator | int | None = None, *, axes: Sequence[int] = (-2, -1)
) -> FlipRotateView:
    """One of the 8 flips/rotations of the ``axes`` plane, drawn uniformly with ``rng`` (a numpy Generator or
    seed), as a lazy view.

    >>> import numpy as np
    >>> from tilegrad.io import ArrayImage
    >>> view = random_flip_rotate(ArrayImage(np.zeros((1, 5, 7))), np.random.default_rng(0))
    >>> sorted(view.shape[1:])
    [5, 7]
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    k = int(rng.integers(4))
    flip = (axes[-1],) if rng.integers(2) else ()
    return FlipRotateView(image, k=k, flip=flip, axes=axes)
