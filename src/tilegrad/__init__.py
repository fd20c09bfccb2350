"""tilegrad: exact, memory-bounded CNNs on gigapixel slides and whole 3D volumes.

The public API is the list in ``__all__``; everything else is internal and may change.
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    GeometryError,
    MemoryBudgetError,
    NotStreamableError,
    ShapeError,
    TilegradError,
)
from .memory import PeakMemoryMeter, measure_peak_memory
from .units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "GeometryError",
    "MemoryBudgetError",
    "NotStreamableError",
    "PeakMemoryMeter",
    "ShapeError",
    "TilegradError",
    "__version__",
    "format_bytes",
    "measure_peak_memory",
    "parse_bytes",
]
