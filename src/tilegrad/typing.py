"""Domain type aliases shared across tilegrad (one place, as in TorchIO's typing.py)."""

from __future__ import annotations

from typing import Any, Protocol, Union

import torch

SpatialShape = tuple[int, ...]
"""Spatial extent of an image: (H, W) or (D, H, W)."""

TileSize = Union[int, tuple[int, ...], str]
"""An int (same in every spatial dim), a per-dimension tuple, or "auto"."""

Bytes = Union[int, float, str]
"""A byte count, or a human string such as "2GiB" or "512 MB"."""


class LazyArray(Protocol):
    """Anything with ``.shape`` and numpy-style slicing: numpy memmap, zarr array, tilegrad reader."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any) -> Any: ...


ArrayLike = Union[torch.Tensor, LazyArray]
