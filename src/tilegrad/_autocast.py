"""Capture the autocast state at forward time and replay it when a custom Function recomputes in backward."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

AutocastState = tuple[bool, "torch.dtype | None"]


def autocast_state(device_type: str) -> AutocastState:
    """(enabled, dtype) of autocast for ``device_type`` now; always off for devices autocast does not cover."""
    if device_type not in ("cpu", "cuda"):
        return False, None
    enabled = torch.is_autocast_enabled(device_type)
    return enabled, torch.get_autocast_dtype(device_type) if enabled else None


def replay_autocast(device_type: str, state: AutocastState) -> Any:
    """Re-enter a captured state. A nullcontext when it was off: ``torch.autocast("meta")`` raises, and
    ``estimate_memory`` runs the recomputing backward passes on meta tensors."""
    enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype) if enabled else contextlib.nullcontext()
