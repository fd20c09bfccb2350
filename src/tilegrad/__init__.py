"""tilegrad: exact, memory-bounded CNNs on gigapixel slides and whole 3D volumes.

The public API is the list in ``__all__``; everything else is internal and may change.
"""

from __future__ import annotations

from .errors import (
    CheckpointError,
    DataError,
    GeometryError,
    MemoryBudgetError,
    NotStreamableError,
    ShapeError,
    TilegradError,
)
from .geometry import ReceptiveField, receptive_field, register_geometry_rule
from .memory import MemoryReport, PeakMemoryMeter, estimate_memory, measure_peak_memory
from .plan import Plan, plan_streaming
from .split import split_model
from .stream import StreamingModule
from .units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DataError",
    "GeometryError",
    "MemoryBudgetError",
    "MemoryReport",
    "NotStreamableError",
    "PeakMemoryMeter",
    "Plan",
    "ReceptiveField",
    "ShapeError",
    "StreamingModule",
    "TilegradError",
    "__version__",
    "estimate_memory",
    "format_bytes",
    "measure_peak_memory",
    "parse_bytes",
    "plan_streaming",
    "receptive_field",
    "register_geometry_rule",
    "split_model",
]
