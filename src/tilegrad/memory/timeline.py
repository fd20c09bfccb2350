"""The simulated allocator: live bytes of meta tensor storages, op by op, and their peak.

NOTE [ Simulated allocator ]
The model runs on ``device="meta"`` tensors: every op computes shapes, dtypes and strides, but no data is stored,
so ResNet-34 at 8192 x 8192 or a 3D U-Net at 512^3 runs in seconds in a few MB. A ``TorchDispatchMode`` sees every
ATen op below autograd, in forward, in the autograd engine's backward and in the optimizer step, and records each
new tensor storage with its byte size. A ``weakref.finalize`` on each storage's Python object (PyTorch keeps one
Python object per live storage) fires when the last reference from Python or C++ goes away: when Python drops a
local variable, when autograd releases a saved tensor after its backward node ran, when a gradient buffer is
accumulated and dropped. Adding sizes on allocation and subtracting them on free gives the same timeline of live
tensor bytes that a device allocator sees, op by op; its maximum is the predicted peak. Transient peaks (e.g. inside
backward, where an op's saved inputs, the gradient of its output and the gradients of its inputs are alive at once)
come out of the simulation; nothing is modelled by hand.

What it does not see: memory that kernels allocate internally outside ATen tensors (cuDNN / oneDNN workspaces,
im2col buffers of non-oneDNN CPU convolutions), allocator rounding and fragmentation, and device-specific kernel
choices (meta follows the CPU composite paths, e.g. dropout keeps a float mask).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Timeline", "storage_key", "unique_bytes"]


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    if not isinstance(t, torch.Tensor) or t.device.type != "meta" or t.layout != torch.strided:
        return None
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


class Timeline(TorchDispatchMode):
    """Live bytes of meta tensor storages, op by op; ``peak`` is the maximum and ``peak_at`` where it happened."""

    def __init__(self, where: Callable[[], str], workspace: Callable[[Any, tuple, dict], int] | None) -> None:
        super().__init__()
        self._workspace = workspace
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_at = ""
        self.phase_peaks: dict[str, int] = {}
        self.phase = "setup"
        self._where = where

    def track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "meta" or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        old = self._sizes.get(key)
        if old is None:
            finalizer = weakref.finalize(storage, self._free, key)
            finalizer.atexit = False
            old = 0
        self._sizes[key] = size  # a resize_ of a known storage changes its size
        self.current += size - old

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def _note(self, scratch: int = 0) -> None:
        level = self.current + scratch
        if level > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = level
        if level > self.peak:
            self.peak = level
            self.peak_at = self._where() + (" (kernel scratch)" if scratch else "")

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_at = self._where()
        self.phase_peaks = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        # Kernel scratch lives while the op runs, with its inputs and outputs (NOTE [ CPU convolution workspaces ]).
        self._note(self._workspace(func, args, kwargs) if self._workspace is not None else 0)
        return out


def unique_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        key = storage_key(t)
        if key is not None:
            seen[key[0]] = key[1]
    return sum(seen.values())
