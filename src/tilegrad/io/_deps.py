"""Optional dependencies of tilegrad.io, imported only when a format needs them.

``import tilegrad.io`` works without any of them; using a format whose library is missing raises
:class:`tilegrad.errors.MissingDependencyError` naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MissingDependencyError

__all__ = ["require"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or explain which extra provides it.

    >>> require("numpy", "io", "testing").__name__
    'numpy'
    >>> require("no_such_module_xyz", "io", "reading XYZ files")
    Traceback (most recent call last):
    ...
    tilegrad.errors.MissingDependencyError: reading XYZ files needs the Python package 'no_such_module_xyz', \
which is not installed: pip install 'tilegrad[io]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the Python package {module.split('.')[0]!r}, which is not installed: "
            f"pip install 'tilegrad[{extra}]'"
        ) from exc
