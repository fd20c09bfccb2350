"""The options every entry point shares, checked in one place: ``tile_size``, ``memory_budget``, ``mode`` and
``batch_tiles``.

StreamingModule, plan_streaming, infer and the commands pass their arguments through these functions, so the same
mistake gets the same message and the same class, :class:`tilegrad.ConfigError`, wherever it is made. Budgets are
accepted as bytes or as strings such as ``"2GiB"`` everywhere (:func:`tilegrad.parse_bytes`).

>>> tile_size_option([256, 128])
(256, 128)
>>> budget_option("64MiB")
67108864
>>> mode_option("fast")
Traceback (most recent call last):
...
tilegrad.errors.ConfigError: mode must be 'auto', 'lean' or 'stages', received 'fast'
"""

from __future__ import annotations

import os
from typing import Any

from .errors import ConfigError, ShapeError
from .units import parse_bytes

__all__ = [
    "MODES",
    "batch_tiles_option",
    "budget_option",
    "mode_option",
    "require_budget",
    "shape_option",
    "source_option",
    "tile_size_option",
]

MODES = ("auto", "lean", "stages")
"""Plan shapes: one segment ("lean"), a cut at every change of scale ("stages"), or the planner's choice ("auto")."""


def tile_size_option(value: Any) -> int | tuple[int, ...] | str:
    """``"auto"``, a positive int, or a non-empty sequence of positive ints (returned as a tuple)."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list)):
        raise ConfigError(f"tile_size must be an int, a tuple of ints or 'auto', received {value!r}")
    values = (value,) if isinstance(value, int) else tuple(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"tile_size must hold positive ints, received {value!r}")
    return value if isinstance(value, int) else values


def shape_option(value: Any, name: str = "input_shape", min_dims: int = 3) -> tuple[int, ...]:
    """An input shape (N, C, *spatial): a sequence of at least ``min_dims`` positive ints (a ``torch.Size`` is one).

    >>> shape_option((1, 3, 64, 64))
    (1, 3, 64, 64)
    """
    try:
        values = tuple(value) if not isinstance(value, (str, bytes)) else ()
        shape = tuple(int(v) for v in values)
        ok = len(shape) >= min_dims and all(
            s > 0 and s == v and not isinstance(v, bool) for s, v in zip(shape, values)
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        layout = "(N, C, *spatial)" if min_dims >= 3 else "(N, C, *spatial) or (N, features)"
        raise ShapeError(
            f"expected {name} as positive integers {layout}, e.g. (1, 3, 224, 224) or (1, 1, 64, 64, 64); "
            f"received {value!r}"
        )
    return shape


def source_option(value: Any, who: str) -> Any:
    """An image ``who`` reads box by box: a tensor, or an array with ``.shape`` and numpy-style slicing."""
    if isinstance(value, (str, os.PathLike)):
        raise ConfigError(
            f"{who} reads arrays, received a path ({os.fspath(value)!r}): open the image first, e.g. "
            f"tilegrad.io.open_image({os.fspath(value)!r}) (lazily, tile by tile)"
        )
    if not (hasattr(value, "shape") and hasattr(value, "__getitem__")):
        raise ShapeError(
            f"{who} takes a tensor or an array with .shape and numpy-style slicing (a numpy or zarr array, a "
            f"tilegrad.io image), received {type(value).__name__}"
        )
    return value


def budget_option(value: Any) -> int | None:
    """None, or a byte count from an int or a string such as ``"2GiB"`` (:func:`tilegrad.parse_bytes`)."""
    return None if value is None else parse_bytes(value)


def require_budget(tile_size: Any, budget: int | None) -> None:
    """``tile_size="auto"`` chooses the tile from the budget, so it needs one."""
    if tile_size == "auto" and budget is None:
        raise ConfigError(
            "tile_size='auto' needs memory_budget= (bytes or a string such as '2GiB') to choose a tile"
        )


def mode_option(value: Any) -> str:
    """One of :data:`MODES`."""
    if not isinstance(value, str) or value not in MODES:
        raise ConfigError(f"mode must be 'auto', 'lean' or 'stages', received {value!r}")
    return value


def batch_tiles_option(value: Any) -> int:
    """A positive int: tiles run together in one forward call (NOTE [ Tile batches ] in infer.py)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"batch_tiles must be a positive int (tiles per forward call); received {value!r}")
    return value
