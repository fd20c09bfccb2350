"""The pieces a plan is made of: a trunk's top-level layers (:class:`Unit`, :func:`units_of`) and a run of them
executed in order (:class:`Chain`, one segment of a plan; see tilegrad/plan.py)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .geometry import Geometry

__all__ = ["Chain", "Unit", "units_of"]


@dataclass
class Unit:
    """One top-level layer of the trunk (nested nn.Sequential containers are flattened)."""

    name: str
    module: nn.Module
    geometry: Geometry | None = None
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    saved_bytes: int = 0  # saved for backward on the whole image
    flops: float = 0.0  # forward FLOPs on the whole image
    peak_act_bytes: int = 0  # largest single tensor produced inside the unit


def units_of(module: nn.Module) -> list[Unit]:
    """Flatten nested ``nn.Sequential`` containers into named units; any other module is one unit."""
    if not isinstance(module, nn.Sequential):
        return [Unit("", module)]
    out: list[Unit] = []
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 0:
            out.extend(Unit(f"{name}.{u.name}" if u.name else name, u.module) for u in units_of(child))
        else:
            out.append(Unit(name, child))
    return out


class Chain(nn.Module):
    """Runs a list of units in order (a segment). Holds no parameters of its own in state_dict terms."""

    def __init__(self, units: Sequence[Unit]):
        super().__init__()
        self._units = list(units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self._units:
            x = unit.module(x)
        return x

    def parameters_of(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = OrderedDict()
        for unit in self._units:
            for p in unit.module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())
