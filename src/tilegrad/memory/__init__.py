"""Memory accounting: measure real peaks (measure), predict them without allocating (estimate), report."""

from .measure import PeakMemoryMeter, measure_peak_memory

__all__ = ["PeakMemoryMeter", "measure_peak_memory"]
