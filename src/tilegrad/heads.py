"""Streamed heads (placeholder until the heads module lands)."""

from __future__ import annotations

import torch
from torch import nn

from .errors import NotStreamableError


class GlobalPool(nn.Module):
    def __init__(self, mode: str = "max"):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        f = x.flatten(2)
        return f.max(-1).values if self.mode == "max" else f.mean(-1)

    def partial(self, core):
        f = core.flatten(2)
        if self.mode == "max":
            return (f.max(-1).values,)
        return (f.sum(-1), torch.tensor(float(f.shape[-1])))

    def combine(self, partials):
        if self.mode == "max":
            return torch.stack([p[0] for p in partials]).max(0).values
        total = sum(p[1] for p in partials)
        return sum(p[0] for p in partials) / total


def streamed_head(module):
    if hasattr(module, "partial") and hasattr(module, "combine"):
        return module
    raise NotStreamableError(f"{type(module).__name__} is not a streamed head")
