"""One family of exceptions for everything tilegrad refuses.

Every message says what was expected, what was received and what to do next, e.g.::

    tile_size 128 is smaller than the halo the network needs (2 x 93 px + stride 32): use at least 256
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GeometryError",
    "MemoryBudgetError",
    "MissingDependencyError",
    "NotInvertibleError",
    "NotStreamableError",
    "ShapeError",
    "TilegradError",
    "WriterStateError",
]


class TilegradError(Exception):
    """Base class of every error tilegrad raises on purpose."""


class ShapeError(TilegradError, ValueError):
    """An input, tile or shape argument has the wrong rank, size or layout."""


class GeometryError(TilegradError, ValueError):
    """A tile is too small for the receptive field, or a geometry cannot be derived."""


class NotInvertibleError(TilegradError, TypeError):
    """A module placed in a reversible stack has no exact inverse (or, like training-mode dropout, no repeatable one)."""


class NotStreamableError(TilegradError, TypeError):
    """A layer is not local (global pooling, train-mode BatchNorm, Linear over space, ...)."""


class MemoryBudgetError(TilegradError, ValueError):
    """No plan fits the memory budget, or a budget string cannot be parsed."""


class DataError(TilegradError, ValueError):
    """A file, CSV row or array cannot be read or does not have the expected content."""


class CheckpointError(TilegradError, RuntimeError):
    """A checkpoint is missing, corrupt or from an incompatible run."""


class ConfigError(TilegradError, ValueError):
    """An option or a combination of options cannot be used (unknown model name, unsupported precision, ...)."""


class MissingDependencyError(TilegradError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class WriterStateError(TilegradError, RuntimeError):
    """A writer was used outside its lifecycle (open -> write tiles -> close), e.g. written to after close."""
