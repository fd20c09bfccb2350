"""Reference models built on tilegrad's building blocks."""

from __future__ import annotations

from .espcn import ESPCN3d, PixelShuffle3d

__all__ = ["ESPCN3d", "PixelShuffle3d"]
