"""One family of exceptions for everything tilegrad refuses.

Every message says what was expected, what was received and what to do next, e.g.::

    tile_size 128 is smaller than the halo the network needs (2 x 93 px + stride 32): use at least 256

One class per kind of mistake, whichever entry point (StreamingModule, plan_streaming, infer, estimate_memory, the
io readers and writers, the training loop, the command line) meets it:

* a value or a combination of options that cannot be used (``mode="fast"``, ``tile_size="auto"`` without a budget,
  ``batch_tiles=0``, an unknown model, optimizer, dtype or device name, a budget string that is not a byte count):
  :class:`ConfigError`;
* an input, tile or output whose shape does not fit (wrong rank, a tile tuple with the wrong number of entries):
  :class:`ShapeError`;
* a tile that cannot hold the receptive field: :class:`GeometryError`; a layer that is not local:
  :class:`NotStreamableError`;
* no plan fits the memory budget: :class:`MemoryBudgetError` (only that: an unreadable budget is a ConfigError);
* a file or a value read from one that is not what it should be: :class:`DataError` (non-finite values included:
  a NaN pixel, a NaN loss or gradient in training);
* a checkpoint that is missing, corrupt (its checksum disagrees) or that names code to run: :class:`CheckpointError`;
* another tilegrad process is writing the same output, journal or checkpoint: :class:`LockedError`;
* the disk (or quota) is full: :class:`DiskFullError`, naming the file and the bytes it needed.

What is suspicious but may be intended (a CSV row listed twice) is a :class:`DataWarning`, a
:class:`TilegradWarning`; the command line prints it as one line ``tilegrad CMD: warning: ...``.

Each class also derives from a builtin exception, so ``except ValueError`` still catches ConfigError, ShapeError,
GeometryError, MemoryBudgetError and DataError, and ``except TypeError`` NotStreamableError and NotInvertibleError.
Option mistakes that used to raise ShapeError, GeometryError, MemoryBudgetError or DataError (all ValueErrors) are
ConfigErrors now; ``StreamingModule(not_a_module)`` raised a bare TypeError and is a ConfigError too.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataWarning",
    "DiskFullError",
    "GeometryError",
    "LockedError",
    "MemoryBudgetError",
    "MissingDependencyError",
    "NotInvertibleError",
    "NotStreamableError",
    "ShapeError",
    "TilegradError",
    "TilegradWarning",
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
    """No plan fits the memory budget: the message gives the smallest peak found and what would help.

    A budget that cannot be read as a byte count (``"lots"``, ``-1``) is a :class:`ConfigError` (earlier versions
    raised MemoryBudgetError for it; both derive from ValueError).
    """


class DataError(TilegradError, ValueError):
    """A file, CSV row or array cannot be read or does not have the expected content."""


class CheckpointError(TilegradError, RuntimeError):
    """A checkpoint is missing, corrupt or from an incompatible run."""


class ConfigError(TilegradError, ValueError):
    """An option or a combination of options cannot be used: a value outside its choices (``mode="fast"``), a
    missing partner (``tile_size="auto"`` without ``memory_budget``), an unknown model, optimizer, dtype or device
    name, an unreadable byte count, an output that exists without ``overwrite``."""


class MissingDependencyError(TilegradError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class WriterStateError(TilegradError, RuntimeError):
    """A writer was used outside its lifecycle (open -> write tiles -> close), e.g. written to after close."""


class LockedError(TilegradError, RuntimeError):
    """Another tilegrad process holds the lock of an output, journal or checkpoint (tilegrad/_lock.py)."""


class DiskFullError(TilegradError, OSError):
    """The disk or the user's quota is full: ``path`` could not be written, ``needed`` bytes were asked for.

    ``str()`` is the whole message (the OSError ``errno`` stays None so that it prints as one line).
    """

    def __init__(self, path: object, needed: int | None, free: int | None = None, action: str = "") -> None:
        self.path, self.needed, self.free = path, needed, free
        need = f" ({needed:,} bytes needed" if needed is not None else " ("
        have = f", {free:,} free)" if free is not None else ")" if needed is not None else "size unknown)"
        message = (
            f"no space left on the device writing {path}{need}{have}. Free some space (or write elsewhere) and "
            f"run the same command again{action}"
        )
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class TilegradWarning(UserWarning):
    """Base class of the warnings tilegrad issues on purpose (documented where they are raised)."""


class DataWarning(TilegradWarning):
    """Data that is suspicious but may be intended, e.g. a dataset CSV row listed twice (docs/training.md)."""
