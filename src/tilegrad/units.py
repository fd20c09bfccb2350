"""Byte counts in human units: parse "2GiB" and print 2147483648 as "2.00 GiB"."""

from __future__ import annotations

import math
import re

from .errors import ConfigError

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Return a byte count from an int, a float or a string such as ``"2GiB"``, ``"512 MB"`` or ``"1e9"``.

    Anything else, or a count that is not positive, raises :class:`tilegrad.ConfigError`.

    >>> parse_bytes("2GiB")
    2147483648
    >>> parse_bytes("1.5 GB")
    1500000000
    >>> parse_bytes(4096)
    4096
    """
    if isinstance(value, bool):
        raise ConfigError(f"expected a byte count such as 2147483648 or '2GiB', received {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 1:
            raise ConfigError(
                f"a memory budget must be positive and finite (at least one byte), received {value!r}"
            )
        return int(value)
    if not isinstance(value, str):
        raise ConfigError(
            f"expected a byte count such as 2147483648 or '2GiB', received {type(value).__name__} {value!r}"
        )
    match = _PATTERN.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"cannot read {value!r} as a byte count: expected a number with an optional unit "
            f"(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. '2GiB' or '512MB'"
        )
    number = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(number) or number < 1:
        raise ConfigError(
            f"a memory budget must be positive and finite (at least one byte), received {value!r}"
        )
    return int(number)


def format_bytes(n: float) -> str:
    """Format a byte count in binary units.

    >>> format_bytes(2147483648)
    '2.00 GiB'
    >>> format_bytes(1536)
    '1.50 KiB'
    >>> format_bytes(12)
    '12 B'
    """
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
