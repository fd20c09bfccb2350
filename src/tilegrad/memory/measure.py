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

NOTE [ Nested meters ]: both high-water marks are per process (CPU) or per device (CUDA), and a meter starts by
resetting it, which would erase what an enclosing meter has seen so far. Open meters are kept on a stack; before a
meter resets, the current high-water mark is folded into every open meter of the same device, so an outer meter
reports the maximum over its whole span. Meters in different threads share the same marks and are not separated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ..errors import ConfigError, TilegradError

__all__ = ["PeakMemoryMeter", "measure_peak_memory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_OPEN_METERS: list[PeakMemoryMeter] = []  # NOTE [ Nested meters ]


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
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ConfigError(
                f"can measure peak memory on 'cpu' or 'cuda', received device {device!r}"
            ) from None
        if self.device.type not in ("cpu", "cuda"):
            raise ConfigError(
                f"can measure peak memory on 'cpu' or 'cuda', received device {str(self.device)!r}"
            )
        if self.device.type == "cpu" and not _cpu_supported():
            raise TilegradError(
                "measuring CPU peak memory needs Linux /proc/self/clear_refs; on this system measure on CUDA "
                "or run the workload in a separate process and read its maximum resident size"
            )
        self.peak_bytes: int | None = None
        self._start = 0
        self._folded = 0  # high-water marks seen before a nested meter reset them (NOTE [ Nested meters ])

    def _high_water(self) -> int:
        """The process's (CPU) or device's (CUDA) high-water mark since its last reset, in bytes."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM") * 1024

    def __enter__(self) -> PeakMemoryMeter:
        gc.collect()
        if self.device.type == "cpu":
            _malloc_trim()
        # NOTE [ Nested meters ]: fold the high-water mark into the open meters before resetting it.
        outer = [m for m in _OPEN_METERS if m.device == self.device]
        if outer:
            high = self._high_water()
            for meter in outer:
                meter._folded = max(meter._folded, high)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _CLEAR_REFS.write_text("5")
            self._start = _status_kib("VmRSS") * 1024
        self._folded = 0
        _OPEN_METERS.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        peak = max(self._high_water(), self._folded)
        if self in _OPEN_METERS:
            _OPEN_METERS.remove(self)
        self.peak_bytes = max(0, peak - self._start)


def _referenced(fn: Any) -> Iterator[Any]:
    """Objects ``fn`` can reach without running: partial arguments, a bound method's object (and its attributes),
    closure cells, and the globals its code names (nested functions are followed, modules are not)."""
    todo, seen = [fn], set()
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if isinstance(f, functools.partial):
            yield from (*f.args, *f.keywords.values())
            todo.append(f.func)
            continue
        if isinstance(f, types.MethodType):
            owner = f.__self__
            yield owner
            if not isinstance(
                owner, torch.nn.Module
            ):  # e.g. a trainer object: its attributes, one level deep
                yield from getattr(owner, "__dict__", {}).values()
            todo.append(f.__func__)
            continue
        if not isinstance(f, types.FunctionType):
            yield f  # a module, or any other callable object: inspected as it is
            continue
        values = []
        for cell in f.__closure__ or ():
            try:
                values.append(cell.cell_contents)
            except ValueError:  # a cell not filled yet
                continue
        values += [f.__globals__[n] for n in f.__code__.co_names if n in f.__globals__]
        for value in values:
            if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
                todo.append(value)
            elif not isinstance(value, types.ModuleType):
                yield value


def _hinted_devices(fn: Callable[..., Any], args: tuple, kwargs: dict) -> list[torch.device]:
    """CPU and CUDA devices of the tensors, module parameters/buffers and optimizer parameters that ``fn`` is given
    or can reach (see :func:`_referenced`)."""
    devices: list[torch.device] = []
    for obj in (*args, *kwargs.values(), *_referenced(fn)):
        for leaf in tree_flatten(obj)[0]:
            if isinstance(leaf, torch.Tensor):
                tensors = [leaf]
            elif isinstance(leaf, torch.nn.Module):
                tensors = [*leaf.parameters(), *leaf.buffers()]
            elif isinstance(leaf, torch.optim.Optimizer):
                tensors = [p for group in leaf.param_groups for p in group["params"]]
            else:
                continue
            devices += [t.device for t in tensors if t.device.type in ("cpu", "cuda")]
    return devices


def _choose_device(hinted: list[torch.device], cuda_initialized: bool) -> torch.device:
    """The device to measure (NOTE [ Device of measure_peak_memory ] in :func:`measure_peak_memory`)."""
    cuda = sorted({d for d in hinted if d.type == "cuda"}, key=str)
    if len(cuda) > 1:
        raise TilegradError(
            f"cannot tell which device to measure: the function uses {', '.join(map(str, cuda))}; measure one with "
            "`with tilegrad.PeakMemoryMeter(device) as meter: ...` and read meter.peak_bytes"
        )
    if cuda:
        return cuda[0]
    if not hinted and cuda_initialized:
        raise TilegradError(
            "cannot tell whether to measure CPU or CUDA memory: CUDA is initialised in this process, and the "
            "function's arguments, closure and globals hold no tensor, module or optimizer. Measure explicitly with "
            "`with tilegrad.PeakMemoryMeter('cuda') as meter: fn()` (or 'cpu') and read meter.peak_bytes"
        )
    return torch.device("cpu")


def measure_peak_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Run ``fn(*args, **kwargs)`` and return the peak bytes used above the level at the start.

    NOTE [ Device of measure_peak_memory ]: the device is guessed from the tensors, modules (parameters and
    buffers) and optimizers that ``fn`` receives or can reach: its arguments, a ``functools.partial``'s arguments, a
    bound method's object, closure variables and the globals its code names. Any of them on CUDA: that CUDA device.
    Only CPU ones: CPU. None at all: CPU, unless CUDA is already initialised in this process, where the guess would
    be a coin toss and a :class:`tilegrad.TilegradError` asks for an explicit :class:`PeakMemoryMeter`; and if
    ``fn`` initialises CUDA itself while CPU memory was measured, the result is refused the same way. For anything
    else (work inside other objects, several GPUs) use ``PeakMemoryMeter(device)``, which also keeps ``fn``'s result.

    See the module docstring for exactly what is counted. The result of ``fn`` is discarded inside the measurement,
    so memory it returns is included in the peak.

    >>> import torch
    >>> measure_peak_memory(lambda: torch.ones(2_000_000).sum()) > 7_000_000
    True
    """
    hinted = _hinted_devices(fn, args, kwargs)
    cuda_before = torch.cuda.is_initialized()
    device = _choose_device(hinted, cuda_before)
    with PeakMemoryMeter(device) as meter:
        fn(*args, **kwargs)
    if device.type == "cpu" and not hinted and not cuda_before and torch.cuda.is_initialized():
        raise TilegradError(
            "the function initialised CUDA while its CPU memory was measured, so its GPU memory is not in the "
            f"figure ({meter.peak_bytes} bytes of CPU memory). Measure it with "
            "`with tilegrad.PeakMemoryMeter('cuda') as meter: fn()` and read meter.peak_bytes"
        )
    assert meter.peak_bytes is not None
    return meter.peak_bytes
