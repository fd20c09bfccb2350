"""Reference models built on tilegrad's building blocks, and the resolver of model specs (resolve.py).

Every name in ``__all__`` is a model the command line accepts by name (``tilegrad memory ESPCN3d ...``,
``tilegrad train --model small_cnn``).
"""

from __future__ import annotations

from .espcn import ESPCN3d, PixelShuffle3d
from .small import small_cnn

__all__ = ["ESPCN3d", "PixelShuffle3d", "small_cnn"]
