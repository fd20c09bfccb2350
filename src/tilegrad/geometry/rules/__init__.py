"""The geometry rules tilegrad ships: torch.nn layers (modules.py), functions and tensor methods (functions.py).

Importing this package registers them (tilegrad.geometry does so); rules for other layers are registered the same
way, with the toolkit in tilegrad/geometry/toolkit.py.
"""

from __future__ import annotations

from . import functions, modules
from .modules import ACTIVATIONS

__all__ = ["ACTIVATIONS", "functions", "modules"]
