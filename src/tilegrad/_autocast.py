"""Capture the autocast state at forward time and replay it when a custom Function recomputes in backward."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch

AutocastState = tuple[bool, "torch.dtype | None"]
P = ParamSpec("P")
R = TypeVar("R")


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


def without_autocast(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with autocast off. Planning profiles meta copies of the model's parameters; under an enclosing
    autocast, the casts it caches for those copies poisoned the later real run (NaN outputs in bf16)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if device_type == "cpu" or torch.cuda.is_available():
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)

    return wrapper
