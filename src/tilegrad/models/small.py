"""The demo's small CNN trunk (``tilegrad demo``, docs/training.md), small enough to train on a CPU in minutes."""

from __future__ import annotations

import torch  # noqa: F401  (the doctest below uses it)
from torch import nn

__all__ = ["small_cnn"]


def small_cnn(in_channels: int = 3, width: int = 16) -> nn.Sequential:
    """The demo's trunk: five 3x3 convolutions with ReLU, four of them with stride 2 (total stride 16).

    >>> small_cnn()(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 32, 4, 4])
    """
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
        nn.ReLU(),
    )
