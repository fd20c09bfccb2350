import torch

from tilegrad import PeakMemoryMeter, measure_peak_memory


def test_cpu_peak_sees_a_transient_allocation():
    # 64 MB written then freed inside fn: the peak must see it although nothing is left at the end.
    def fn():
        x = torch.ones(16_000_000)
        y = x * 2
        del x, y

    peak = measure_peak_memory(fn)
    assert 120e6 < peak < 200e6, peak


def test_cpu_peak_is_not_hidden_by_memory_freed_earlier():
    # Regression: without malloc_trim, memory freed before the meter starts is reused silently and the peak reads ~0.
    junk = [torch.ones(100_000) for _ in range(400)]  # 160 MB in medium allocations that glibc keeps
    del junk
    with PeakMemoryMeter("cpu") as meter:
        chunks = [torch.ones(100_000) for _ in range(200)]  # 80 MB
        del chunks
    assert meter.peak_bytes > 60e6, meter.peak_bytes
