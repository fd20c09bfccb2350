"""Storage for boundary tensors (placeholder until the storage-tier module lands: device tier only)."""

from __future__ import annotations

import torch

__all__ = ["TensorStore"]


class TensorStore:
    def __init__(self, shape, dtype, device, *, zero=True, compute_device=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.tier = "device"
        self.data = (torch.zeros if zero else torch.empty)(self.shape, dtype=dtype, device=device)
        self.nbytes = self.data.numel() * self.data.element_size()

    def read(self, box):
        return self.data[(slice(None), slice(None), *box)]

    def write(self, box, value):
        self.data[(slice(None), slice(None), *box)] = value

    def add(self, box, value):
        self.data[(slice(None), slice(None), *box)] += value

    def close(self):
        self.data = None
