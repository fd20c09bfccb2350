"""Turn a model spec from the command line into a factory: a torchvision name, a tilegrad model, or module:factory.

>>> factory, label = resolve_model("torch.nn:Identity")
>>> label, type(factory()).__name__
('torch.nn:Identity', 'Identity')
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import TilegradError

__all__ = ["resolve_model"]

Factory = Callable[[], nn.Module]


def _checked(factory: Callable[[], Any], label: str) -> Factory:
    def build() -> nn.Module:
        try:
            model = factory()
        except TypeError as err:
            raise TilegradError(
                f"calling {label}() failed: {err}. MODEL must name a factory that takes no arguments; wrap the "
                "call with your arguments in a function, e.g. in my_models.py: def build(): return UNet(...), "
                "then pass my_models.py:build"
            ) from err
        if not isinstance(model, nn.Module):
            raise TilegradError(f"{label}() returned {type(model).__name__}, expected a torch.nn.Module")
        return model

    return build


def _from_colon_spec(spec: str) -> Factory:
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise TilegradError(
            f"cannot read model spec {spec!r}: expected package.module:factory or file.py:factory"
        )
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise TilegradError(f"model file {where!r} (from {spec!r}) does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_tilegrad_model_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:  # pragma: no cover - only for odd suffixes
            raise TilegradError(f"cannot load {where!r} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise TilegradError(f"cannot import module {where!r} from model spec {spec!r}: {err}") from err
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise TilegradError(f"{where!r} has no callable {attr!r} (from model spec {spec!r}){hint}")
    return _checked(factory, spec)


def _tilegrad_models() -> dict[str, Callable[[], Any]]:
    try:
        models = importlib.import_module("tilegrad.models")
    except ImportError:
        return {}
    names = getattr(models, "__all__", [n for n in dir(models) if not n.startswith("_")])
    found = {}
    for n in names:
        obj = getattr(models, n, None)
        if (isinstance(obj, type) and issubclass(obj, nn.Module)) or (
            callable(obj) and not isinstance(obj, type)
        ):
            found[n] = obj
    return found


def _torchvision_names() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models())


def resolve_model(spec: str) -> tuple[Factory, str]:
    """Return ``(factory, label)`` for a model spec; ``factory()`` builds a fresh model with random weights.

    Accepted, in this order: ``package.module:factory`` or ``path/to/file.py:factory`` (a callable taking no
    arguments), a tilegrad model name (``tilegrad.models``, default arguments), a torchvision model name
    (``weights=None``: nothing is downloaded).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TilegradError(f"expected a model name or package.module:factory, received {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        return _from_colon_spec(spec), spec
    own = _tilegrad_models()
    lowered = {n.lower(): n for n in own}
    if spec.lower() in lowered:
        name = lowered[spec.lower()]
        return _checked(own[name], f"tilegrad.models.{name}"), name
    vision = _torchvision_names()
    if spec.lower() in vision:
        import torchvision

        name = spec.lower()
        return _checked(lambda: torchvision.models.get_model(name, weights=None), name), name
    close = difflib.get_close_matches(spec.lower(), [*vision, *lowered], n=4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise TilegradError(
        f"unknown model {spec!r}: expected a torchvision model name (e.g. resnet34, vgg16, densenet121), a "
        f"tilegrad model name, or package.module:factory / file.py:factory.{hint}"
    )
