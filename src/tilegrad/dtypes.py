"""Floating-point dtypes by name: the one table the command line, the memory estimator and training read.

>>> parse_dtype("bfloat16")
torch.bfloat16
>>> parse_dtype("float16", allowed=("float32", "float64"))
Traceback (most recent call last):
...
tilegrad.errors.ConfigError: dtype must be float32 or float64, received 'float16'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["DTYPES", "DTYPE_NAMES", "PARAMETER_DTYPES", "parse_dtype"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Every name accepted for a floating-point dtype, aliases included."""

DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")
"""The canonical names (what the command line offers)."""

PARAMETER_DTYPES = ("float32", "float64")
"""The precisions ``tilegrad train`` keeps parameters in (mixed precision is autocast's job, ``--amp``)."""


def parse_dtype(value: Any, *, allowed: Sequence[str] | None = None) -> torch.dtype:
    """A floating-point ``torch.dtype`` from itself or its name; ``allowed`` restricts the names accepted."""
    if isinstance(value, str):
        names = tuple(allowed) if allowed is not None else tuple(sorted(DTYPES))
        if value not in DTYPES or value not in names:
            expected = " or ".join(names) if allowed is not None else f"one of {', '.join(names)}"
            if allowed is None:
                raise ConfigError(f"unknown dtype {value!r}: expected {expected}")
            raise ConfigError(f"dtype must be {expected}, received {value!r}")
        return DTYPES[value]
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"expected a floating-point torch dtype such as torch.float32, received {value!r}")
    if allowed is not None and value not in {DTYPES[n] for n in allowed}:
        raise ConfigError(f"dtype must be {' or '.join(allowed)}, received {value!r}")
    return value
