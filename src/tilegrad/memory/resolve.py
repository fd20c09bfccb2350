"""Moved: model specs are resolved by :mod:`tilegrad.models.resolve`, one resolver for every command.

This alias keeps ``from tilegrad.memory.resolve import resolve_model`` working, with a DeprecationWarning.
"""

from __future__ import annotations

import warnings

from ..models.resolve import resolve_model

__all__ = ["resolve_model"]

warnings.warn(
    "tilegrad.memory.resolve moved to tilegrad.models.resolve; import resolve_model from there",
    DeprecationWarning,
    stacklevel=2,
)
