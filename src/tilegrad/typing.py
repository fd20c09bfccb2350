"""Domain type aliases shared across tilegrad (one place, as in TorchIO's typing.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, Union, runtime_checkable

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


@runtime_checkable
class PlanningModule(Protocol):
    """A module that chooses an execution plan per input shape and remembers the last one (tilegrad's
    StreamingModule is one).

    The memory estimator (tilegrad/memory/estimate.py) recognises such modules by this protocol, without importing
    the module that defines them: it runs the model once before recording (the planner's own profiling must not
    count as memory of the step) and reports ``str(last_plan)`` in the report's notes.
    """

    last_plan: Any
    """The plan of the last forward (anything with a readable ``str``), or None before the first."""

    def plan(self, input_shape: Sequence[int], **kwargs: Any) -> Any: ...
