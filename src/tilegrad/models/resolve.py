"""One resolver of model specs for every command: a torchvision name, a tilegrad model, or a factory.

Accepted, in this order: ``package.module:factory`` or ``path/to/file.py:factory`` (any callable), a tilegrad model
name (:mod:`tilegrad.models`), a torchvision model name (built with ``weights=None`` unless the caller asks for
weights: nothing is downloaded). ``tilegrad memory``, ``plan``, ``infer`` and ``train`` all read ``MODEL`` through
:func:`find_model`.

>>> spec = find_model("torch.nn:Identity")
>>> spec.source, spec.label, type(spec.module()).__name__
('factory', 'torch.nn:Identity', 'Identity')
>>> factory, label = resolve_model("small_cnn")
>>> label, type(factory()).__name__
('small_cnn', 'Sequential')
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = ["KNOWN_MODULES", "ModelSpec", "find_model", "needs_trust", "resolve_model"]

Factory = Callable[[], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """A model spec resolved to a factory.

    ``source`` is ``"factory"`` (``module:factory`` or ``file.py:factory``), ``"tilegrad"`` (:mod:`tilegrad.models`)
    or ``"torchvision"``; ``label`` names the model in messages and reports.
    """

    label: str
    source: str
    factory: Callable[..., Any]

    def build(self, **kwargs: Any) -> Any:
        """Call the factory with ``kwargs``; a call with arguments it does not take is a ConfigError."""
        try:
            return self.factory(**kwargs)
        except TypeError as err:
            if kwargs:
                raise ConfigError(
                    f"calling {self.label}(**{kwargs}) failed: {err}. Check the keyword arguments "
                    "(--model-kwargs, model_kwargs) against the factory's signature"
                ) from err
            raise ConfigError(
                f"calling {self.label}() failed: {err}. MODEL must name a factory that takes no arguments; wrap "
                "the call with your arguments in a function, e.g. in my_models.py: def build(): return UNet(...), "
                "then pass my_models.py:build"
            ) from err

    def module(self, **kwargs: Any) -> nn.Module:
        """:meth:`build`, which must return an ``nn.Module``."""
        model = self.build(**kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{self.label}() returned {type(model).__name__}, expected a torch.nn.Module")
        return model


def _from_colon_spec(spec: str) -> Callable[..., Any]:
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ConfigError(
            f"cannot read model spec {spec!r}: expected package.module:factory or file.py:factory"
        )
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"model file {where!r} (from {spec!r}) does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_tilegrad_model_{path.stem}", path)
        if module_spec is None or module_spec.loader is None:  # pragma: no cover - only for odd suffixes
            raise ConfigError(f"cannot load {where!r} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise ConfigError(f"cannot import module {where!r} from model spec {spec!r}: {err}") from err
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(attr, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{where!r} has no callable {attr!r} (from model spec {spec!r}){hint}")
    return factory


def _tilegrad_models() -> dict[str, Callable[..., Any]]:
    from .. import models as zoo

    found = {}
    for n in zoo.__all__:
        obj = getattr(zoo, n, None)
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


def _torchvision_factory(name: str) -> Callable[..., Any]:
    def build(**kwargs: Any) -> Any:
        import torchvision

        return torchvision.models.get_model(name, **{"weights": None, **kwargs})

    return build


def find_model(spec: str) -> ModelSpec:
    """Resolve ``spec`` (see the module docstring); an unknown name is a ConfigError listing close matches."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"expected a model name or package.module:factory, received {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        return ModelSpec(spec, "factory", _from_colon_spec(spec))
    own = _tilegrad_models()
    lowered = {n.lower(): n for n in own}
    if spec.lower() in lowered:
        name = lowered[spec.lower()]
        return ModelSpec(name, "tilegrad", own[name])
    vision = _torchvision_names()
    if spec.lower() in vision:
        return ModelSpec(spec.lower(), "torchvision", _torchvision_factory(spec.lower()))
    close = difflib.get_close_matches(spec.lower(), [*vision, *lowered], n=4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(
        f"unknown model {spec!r}: expected a torchvision model name (e.g. resnet34, vgg16, densenet121), a "
        f"tilegrad model name ({', '.join(sorted(own))}), or package.module:factory / file.py:factory.{hint}"
    )


def resolve_model(spec: str) -> tuple[Factory, str]:
    """``(factory, label)`` for a model spec; ``factory()`` builds a fresh model with random weights."""
    found = find_model(spec)
    return found.module, found.label


KNOWN_MODULES = ("tilegrad.models", "torchvision.models", "monai.networks.nets", "timm", "timm.models")
"""Modules whose public model classes and builders a checkpoint may name without ``--trust-model-code``."""

_RISKY_KWARGS = ("pretrained", "weights", "checkpoint", "file", "path", "url", "hub")


def needs_trust(spec: str, kwargs: dict[str, Any] | None = None) -> str | None:
    """Why rebuilding ``spec(**kwargs)`` read from a checkpoint would run code tilegrad does not know by name, or
    None when it would not (NOTE [ A checkpoint never runs code ]).

    >>> needs_trust("resnet18"), needs_trust("torchvision.models:resnet18")
    (None, None)
    >>> needs_trust("subprocess:getoutput", {"cmd": "id"})
    "it names the factory 'subprocess:getoutput', outside the known model libraries"
    >>> needs_trust("resnet18", {"weights": "/tmp/w.pt"})
    "its model keyword arguments ask to load files or weights ('weights')"
    """
    if not isinstance(spec, str):
        return f"its model spec is a {type(spec).__name__}, not a name"
    risky = [k for k in (kwargs or {}) if any(word in str(k).lower() for word in _RISKY_KWARGS)]
    if risky:
        return f"its model keyword arguments ask to load files or weights ({', '.join(map(repr, risky))})"
    if ":" not in spec:  # find_model resolves a bare name only to tilegrad's models or torchvision's
        return None
    where, _, attr = spec.strip().rpartition(":")
    if where not in KNOWN_MODULES or not attr.isidentifier() or attr.startswith("_"):
        return f"it names the factory {spec!r}, outside the known model libraries"
    return None


# NOTE [ A checkpoint never runs code ]
# A training checkpoint stores the model spec it was trained with (``config.model``, ``config.model_kwargs``) so
# that predict, saliency and infer can rebuild the model. A spec ``package.module:factory`` or ``file.py:factory``
# is imported and called: read from a file someone sent, that is running their code (``subprocess:getoutput`` with
# ``{"cmd": ...}`` runs a shell command), although torch.load(weights_only=True) itself runs none. So a spec read
# from a checkpoint is rebuilt only when tilegrad knows it by name: a bare name (tilegrad's models, torchvision's),
# or ``module:Name`` with module one of KNOWN_MODULES, and no keyword argument that loads files or weights (the
# checkpoint holds the weights). Anything else needs the user's consent: ``--trust-model-code`` on the command line,
# ``trust_model_code=True`` in Python. Specs typed by the user (``tilegrad train --model``, ``infer MODEL``) are theirs.
