"""Receptive-field geometry of a convolutional trunk: total output stride, halo, and tile-origin alignment.

* core.py: the geometry of a tensor (:class:`Geometry`, :class:`DimGeometry`), :func:`compose`, :class:`ReceptiveField`
  (NOTE [ Translation equivariance ], NOTE [ Valid region ]);
* toolkit.py: writing and registering rules for layers tilegrad does not know (:func:`register_geometry_rule`);
* rules/: the rules for torch.nn layers, functions and tensor methods;
* trace.py: :func:`module_geometry` and :func:`receptive_field` over a ``torch.fx`` trace.
"""

from __future__ import annotations

from . import rules  # registers the built-in rules
from .core import DimGeometry, Geometry, ReceptiveField, compose
from .rules import ACTIVATIONS
from .toolkit import (
    Context,
    Rule,
    elementwise,
    merge,
    node_arg,
    observer_hook,
    pixel_shuffle,
    refusing,
    register_geometry_rule,
    shuffle,
    window,
)
from .trace import module_geometry, receptive_field

__all__ = [
    "ACTIVATIONS",
    "Context",
    "DimGeometry",
    "Geometry",
    "ReceptiveField",
    "Rule",
    "compose",
    "elementwise",
    "merge",
    "module_geometry",
    "node_arg",
    "observer_hook",
    "pixel_shuffle",
    "receptive_field",
    "refusing",
    "register_geometry_rule",
    "rules",
    "shuffle",
    "window",
]
