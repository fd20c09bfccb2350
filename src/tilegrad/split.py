"""split_model: cut a classification network into a streamable trunk and a head, with head(trunk(x)) == model(x)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .errors import ConfigError, NotStreamableError, TilegradError
from .geometry import ACTIVATIONS

__all__ = ["HEAD_LAYERS", "has_head", "local_trunk", "split_model", "streamable_part"]

HEAD_LAYERS: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Flatten,
    nn.Linear,
)
"""Layers that begin a classifier head: global (adaptive) pooling, Flatten, Linear. A model without any of them is
fully convolutional (a U-Net, ESPCN) and is streamed whole."""


class _DenseNetHead(nn.Module):
    """torchvision DenseNet's forward after ``features``: relu, global average pool, flatten, classifier.

    The ReLU runs in ``forward``, not as a module; ``leading_local`` says so to :func:`local_trunk`.
    """

    leading_local: tuple[type[nn.Module], ...] = (nn.ReLU,)

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def _children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_children())


def split_model(model: nn.Module, at: str | None = None) -> tuple[nn.Sequential, nn.Module]:
    """Split ``model`` before the child named ``at`` into ``(trunk, head)``.

    Supported: torchvision ResNet (default ``at="avgpool"``), VGG and DenseNet (default ``at="features"``'s end,
    i.e. the trunk is ``features``), MONAI's ResNet (``monai.networks.nets.resnet18`` ...: as torchvision's; with
    ``no_max_pool=True`` the unused ``maxpool`` child is left out) and DenseNet (``DenseNet121`` ...: the trunk is
    ``features``, the head ``class_layers``), and any ``nn.Sequential`` (``at`` is a child name or index; default: the
    first adaptive/global pooling or Flatten layer). The trunk is an ``nn.Sequential`` with the original child names,
    so errors name layers as in the model (``layer3.1.conv2``).

    >>> import torchvision
    >>> trunk, head = split_model(torchvision.models.resnet18(), at="avgpool")
    >>> list(trunk._modules)[-1], type(head[0]).__name__
    ('layer4', 'AdaptiveAvgPool2d')
    """
    tv_name = type(model).__name__
    kinds = {cls.__name__ for cls in type(model).__mro__}  # MONAI's DenseNet121 is a subclass of its DenseNet
    children = _children(model)
    names = [n for n, _ in children]
    if tv_name == "DenseNet" and hasattr(model, "features") and hasattr(model, "classifier"):
        if at not in (None, "features", "classifier"):
            raise ConfigError(f"DenseNet is split after 'features'; received at={at!r}")
        return model.features, _DenseNetHead(model.classifier)
    if "DenseNet" in kinds and names == ["features", "class_layers"]:
        # MONAI: forward is class_layers(features(x)); class_layers = relu, global pool, flatten, linear
        if at not in (None, "features", "class_layers"):
            raise ConfigError(
                f"{tv_name} is split after 'features' (before 'class_layers'); received at={at!r}"
            )
        return model.features, model.class_layers
    if tv_name in ("VGG", "AlexNet") and hasattr(model, "features"):
        if at not in (None, "avgpool", "features"):
            raise ConfigError(f"{tv_name} is split after 'features' (before 'avgpool'); received at={at!r}")
        return model.features, nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
    if at is None:
        if tv_name == "ResNet" or "avgpool" in names:
            at = "avgpool"
        else:
            for name, child in children:
                if isinstance(child, HEAD_LAYERS):
                    at = name
                    break
    if isinstance(at, int):
        at = names[at] if -len(names) <= at < len(names) else str(at)
    if at not in names:
        raise ConfigError(
            f"cannot split {tv_name} at {at!r}: expected the name of one of its children {names}"
        )
    if not isinstance(model, nn.Sequential) and tv_name != "ResNet":
        raise NotStreamableError(
            f"split_model knows torchvision and MONAI ResNet and DenseNet, torchvision VGG and nn.Sequential; "
            f"{tv_name}'s forward may not be "
            "a plain chain of its children. Build the trunk and head yourself (trunk = an nn.Sequential of the "
            "local layers)"
        )
    k = names.index(at)
    local = children[:k]
    if tv_name == "ResNet" and getattr(model, "no_max_pool", False):
        local = [(n, m) for n, m in local if n != "maxpool"]  # MONAI's forward skips it
    trunk = nn.Sequential(OrderedDict(local))
    rest = children[k:]
    if tv_name == "ResNet":
        # ResNet.forward flattens between avgpool and fc
        rest = [(n, m) for n, m in rest]
        idx = [n for n, _ in rest].index("fc") if "fc" in [n for n, _ in rest] else len(rest)
        rest.insert(idx, ("flatten", nn.Flatten(1)))
    head = nn.Sequential(OrderedDict(rest))
    return trunk, head


def has_head(model: nn.Module) -> bool:
    """Whether ``model`` holds a layer of :data:`HEAD_LAYERS` (global pooling, Flatten, Linear) anywhere."""
    return any(isinstance(m, HEAD_LAYERS) for m in model.modules())


def streamable_part(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(trunk, head)`` to stream: ``(model, None)`` for a fully convolutional model (no :data:`HEAD_LAYERS`), else
    :func:`split_model`. What ``tilegrad plan`` and ``tilegrad memory --tile/--budget`` stream.

    >>> trunk, head = streamable_part(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    >>> head is None
    True
    """
    if not has_head(model):
        return model, None
    try:
        return split_model(model)
    except TilegradError as err:
        raise NotStreamableError(
            f"cannot split {type(model).__name__} into a streamable trunk and a head: {err}"
        ) from err


def local_trunk(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """:func:`split_model`, with the point-wise layers the head applies before pooling moved into the trunk.

    For a caller that replaces the head with its own pooling classifier (``tilegrad train``): torchvision's DenseNet
    applies a ReLU to the features in ``forward``, MONAI's DenseNet starts ``class_layers`` with one; both belong to
    the trunk, or the new head would pool features the original model never pooled.

    >>> import torchvision
    >>> trunk, head = local_trunk(torchvision.models.densenet121())
    >>> type(trunk[-1]).__name__
    'ReLU'
    """
    trunk, head = split_model(model)
    if isinstance(head, _DenseNetHead):
        leading: list[nn.Module] = [layer() for layer in head.leading_local]
    else:
        leading = []
        for child in head.children() if isinstance(head, nn.Sequential) else ():
            if not isinstance(child, ACTIVATIONS):
                break
            leading.append(child)
    return (nn.Sequential(trunk, *leading) if leading else trunk), head
