"""Memory accounting: measure real peaks (measure.py), predict them without allocating (estimate.py, with
timeline.py, watch.py, diagnose.py and kernels.py), the workload both run (workload.py), reports (report.py).

This package sits below the planner and the streaming engine: it imports neither (ARCHITECTURE.md).
"""

from .estimate import estimate_memory
from .measure import PeakMemoryMeter, measure_peak_memory
from .report import LayerMemory, MemoryReport

__all__ = ["LayerMemory", "MemoryReport", "PeakMemoryMeter", "estimate_memory", "measure_peak_memory"]
