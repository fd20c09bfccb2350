"""Measure the real peak memory a function uses: process high-water mark on CPU, allocator peak on CUDA.

CPU (Linux): the kernel keeps a resident-set high-water mark (``VmHWM`` in ``/proc/self/status``). Writing ``5`` to
``/proc/self/clear_refs`` resets it to the current resident size. Before resetting, free heap memory is handed back
to the kernel with glibc's ``malloc_trim(0)``, so that memory freed by earlier work and kept by the allocator cannot
be silently reused and hide a peak. The figure therefore counts every page the process touched above its starting
resident size while ``fn`` ran: tensors, temporary buffers inside kernels, Python objects, and memory of other threads
of this process. It does not count pages that are allocated but never written (``torch.empty`` that is never filled).
Other processes are not counted.

CUDA: ``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated`` on the device, minus the allocation at the
start: bytes held by live tensors at the peak, as PyTorch's caching allocator sees them (not cached-but-free blocks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import TilegradError

__all__ = ["PeakMemoryMeter", "measure_peak_memory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:  # pragma: no cover - every Linux kernel since 2.6 reports these
        raise TilegradError(
            f"/proc/self/status has no {field} line; cannot measure CPU memory on this system"
        )
    return int(match.group(1))


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:  # pragma: no cover - musl or non-glibc systems
        return
    libc = ctypes.CDLL(name)
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _cpu_supported() -> bool:
    return sys.platform.startswith("linux") and _STATUS.exists() and _CLEAR_REFS.exists()


class PeakMemoryMeter:
    """Context manager measuring peak memory above the level at entry.

    >>> import torch
    >>> with PeakMemoryMeter("cpu") as meter:
    ...     x = torch.ones(4_000_000)   # 16 MB written
    ...     del x
    >>> meter.peak_bytes > 15_000_000
    True
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise TilegradError(
                f"can measure peak memory on 'cpu' or 'cuda', received device {str(self.device)!r}"
            )
        if self.device.type == "cpu" and not _cpu_supported():
            raise TilegradError(
                "measuring CPU peak memory needs Linux /proc/self/clear_refs; on this system measure on CUDA "
                "or run the workload in a separate process and read its maximum resident size"
            )
        self.peak_bytes: int | None = None
        self._start = 0

    def __enter__(self) -> PeakMemoryMeter:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            _CLEAR_REFS.write_text("5")
            self._start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.peak_bytes = max(0, peak - self._start)


def _guess_device(fn: Callable[..., Any], args: tuple, kwargs: dict) -> torch.device:
    candidates: list[torch.Tensor] = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if isinstance(fn, torch.nn.Module):
        candidates.extend(fn.parameters())
    for tensor in candidates:
        if tensor.device.type == "cuda":
            return tensor.device
    return torch.device("cpu")


def measure_peak_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run ``fn(*args, **kwargs)`` and return the peak bytes used above the level at the start.

    The device is CUDA when any tensor argument (or a parameter of ``fn`` if it is a module) lives on CUDA, else CPU.
    See the module docstring for exactly what is counted. The result of ``fn`` is discarded inside the measurement,
    so memory it returns is included in the peak. For an explicit device or to keep the result, use
    :class:`PeakMemoryMeter`.

    >>> import torch
    >>> measure_peak_memory(lambda: torch.ones(2_000_000).sum()) > 7_000_000
    True
    """
    with PeakMemoryMeter(_guess_device(fn, args, kwargs)) as meter:
        fn(*args, **kwargs)
    assert meter.peak_bytes is not None
    return meter.peak_bytes
