"""tilegrad: exact, memory-bounded CNNs on gigapixel slides and whole 3D volumes.

The public API is the list in ``__all__``; everything else is internal and may change.
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    DataError,
    GeometryError,
    MemoryBudgetError,
    MissingDependencyError,
    NotStreamableError,
    ShapeError,
    TilegradError,
    WriterStateError,
)
from .memory import PeakMemoryMeter, measure_peak_memory
from .units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DataError",
    "GeometryError",
    "MemoryBudgetError",
    "MissingDependencyError",
    "NotStreamableError",
    "PeakMemoryMeter",
    "ShapeError",
    "TilegradError",
    "WriterStateError",
    "__version__",
    "format_bytes",
    "measure_peak_memory",
    "parse_bytes",
]
