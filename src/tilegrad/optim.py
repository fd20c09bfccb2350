"""Optimizers by name: what ``tilegrad train --optimizer`` trains with and what ``estimate_memory(optimizer=...)``
and ``tilegrad memory --optimizer`` count the state of. One table, so the two cannot drift apart.

>>> import torch
>>> opt = make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))])
>>> type(opt).__name__, opt.defaults["momentum"]
('SGD', 0.9)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["OPTIMIZERS", "make_optimizer"]

OPTIMIZERS = ("adamw", "adam", "sgd")
"""Names :func:`make_optimizer` knows: sgd holds one momentum buffer per parameter, adam and adamw two."""

_DEFAULT_LR = {"sgd": 0.01, "adam": 1e-3, "adamw": 1e-3}


def make_optimizer(
    name: str,
    params: Iterable[torch.Tensor],
    *,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float | None = None,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer ``name`` (case-insensitive) over ``params``: SGD with ``momentum``, Adam or AdamW.

    ``lr`` defaults to 0.01 (sgd) or 1e-3 (adam, adamw); ``weight_decay`` None keeps torch's default; ``foreach``
    is passed on (None: torch's choice, a loop over parameters on CPU, one fused kernel per step on CUDA).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}: expected one of {', '.join(sorted(OPTIMIZERS))}")
    options: dict[str, Any] = {"lr": _DEFAULT_LR[key] if lr is None else lr, "foreach": foreach}
    if weight_decay is not None:
        options["weight_decay"] = weight_decay
    if key == "sgd":
        return torch.optim.SGD(params, momentum=momentum, **options)
    cls = torch.optim.AdamW if key == "adamw" else torch.optim.Adam
    return cls(params, **options)
