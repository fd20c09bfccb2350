"""tilegrad: exact, memory-bounded CNNs on gigapixel slides and whole 3D volumes.

The public API is the list in ``__all__``; everything else is internal and may change.
"""

from __future__ import annotations

from .checkpointing import checkpoint_sequential
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DataWarning,
    DiskFullError,
    GeometryError,
    LockedError,
    MemoryBudgetError,
    MissingDependencyError,
    NotInvertibleError,
    NotStreamableError,
    ShapeError,
    TilegradError,
    TilegradWarning,
    WriterStateError,
)
from .geometry import ReceptiveField, receptive_field, register_geometry_rule
from .infer import infer
from .memory import MemoryReport, PeakMemoryMeter, estimate_memory, measure_peak_memory
from .plan import Plan, plan_streaming
from .reversible import AdditiveCoupling, ReconstructionWarning, ReversibleSequential
from .split import split_model
from .stream import StreamingModule
from .units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = [
    "AdditiveCoupling",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DataWarning",
    "DiskFullError",
    "GeometryError",
    "LockedError",
    "MemoryBudgetError",
    "MemoryReport",
    "MissingDependencyError",
    "NotInvertibleError",
    "NotStreamableError",
    "PeakMemoryMeter",
    "Plan",
    "ReceptiveField",
    "ReconstructionWarning",
    "ReversibleSequential",
    "ShapeError",
    "StreamingModule",
    "TilegradError",
    "TilegradWarning",
    "WriterStateError",
    "__version__",
    "checkpoint_sequential",
    "estimate_memory",
    "format_bytes",
    "infer",
    "measure_peak_memory",
    "parse_bytes",
    "plan_streaming",
    "receptive_field",
    "register_geometry_rule",
    "split_model",
]
