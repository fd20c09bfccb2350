"""Memory accounting: measure real peaks (measure), predict them without allocating (estimate), report."""

from .estimate import estimate_memory
from .measure import PeakMemoryMeter, measure_peak_memory
from .report import LayerMemory, MemoryReport

__all__ = ["LayerMemory", "MemoryReport", "PeakMemoryMeter", "estimate_memory", "measure_peak_memory"]
