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


class _MeanHead(nn.Module):
    """``classifier(x.mean(dims))``: torchvision ShuffleNetV2 and MNASNet pool with a mean in ``forward``."""

    def __init__(self, classifier: nn.Module, ndim: int = 2):
        super().__init__()
        self.classifier = classifier
        self.dims = tuple(range(2, 2 + ndim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.mean(list(self.dims)))


class _Method(nn.Module):
    """``model.<method>(x)`` as a module: timm's ``forward_features`` / ``forward_head`` contract."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


class _TransformInput(nn.Module):
    """torchvision GoogLeNet's and Inception3's ``_transform_input`` (a per-channel affine map: local)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._transform = model._transform_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._transform(x)


class _OnlyMap(nn.Module):
    """A timm ``features_only`` model created with one ``out_indices``: the one feature map it returns."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (feature,) = self.model(x)
        return feature


class _CriticHead(nn.Module):
    """MONAI Critic's forward after ``net``: ``final`` (Flatten), the mean over the flattened values, one column."""

    def __init__(self, final: nn.Module):
        super().__init__()
        self.final = final

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.final(x).mean(1)
        return x.view((x.shape[0], -1))


class _NetAdapterHead(nn.Module):
    """MONAI NetAdapter's (TorchVisionFCModel's) forward after ``features``: ``pool``, then flatten (or, with
    ``use_conv``, singleton dims put back), then ``fc``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.pool = model.pool
        self.fc = model.fc
        self.use_conv = bool(model.use_conv)
        self.dim = int(model.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = self.pool(x)
        if not self.use_conv:
            x = torch.flatten(x, 1)
        else:
            while x.dim() < self.dim + 2:
                x = x[..., None]
        return self.fc(x)


def _children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(model.named_children())


def _pick(model: nn.Module, names: list[str]) -> nn.Sequential:
    return nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names))


def _check_at(kind: str, at: str | int | None, allowed: tuple[str, ...], where: str) -> None:
    if at is not None and at not in allowed:
        raise ConfigError(
            f"{kind} is split {where}; received at={at!r} (expected one of {list(allowed)} or None)"
        )


def _torchvision_family(model: nn.Module, at: str | int | None) -> tuple[nn.Module, nn.Module] | None:
    """torchvision classification families whose ``forward`` is not a plain chain of children."""
    kind = type(model).__name__
    names = [n for n, _ in model.named_children()]
    pool_flatten = ("features", "avgpool", "classifier")
    if kind in ("MobileNetV3", "EfficientNet") and names == list(pool_flatten):
        # forward: features, avgpool, flatten, classifier
        _check_at(kind, at, ("features", "avgpool"), "after 'features' (before 'avgpool')")
        return model.features, nn.Sequential(
            OrderedDict(avgpool=model.avgpool, flatten=nn.Flatten(1), classifier=model.classifier)
        )
    if kind == "ConvNeXt" and names == list(pool_flatten):
        # forward: features, avgpool, classifier (LayerNorm2d, Flatten, Linear)
        _check_at(kind, at, ("features", "avgpool"), "after 'features' (before 'avgpool')")
        return model.features, nn.Sequential(OrderedDict(avgpool=model.avgpool, classifier=model.classifier))
    if kind == "MobileNetV2" and names == ["features", "classifier"]:
        # forward: features, F.adaptive_avg_pool2d(x, (1, 1)), flatten, classifier
        _check_at(kind, at, ("features", "classifier"), "after 'features'")
        return model.features, nn.Sequential(
            OrderedDict(
                avgpool=nn.AdaptiveAvgPool2d((1, 1)), flatten=nn.Flatten(1), classifier=model.classifier
            )
        )
    if kind == "RegNet" and names == ["stem", "trunk_output", "avgpool", "fc"]:
        _check_at(kind, at, ("avgpool",), "after 'trunk_output' (before 'avgpool')")
        return _pick(model, ["stem", "trunk_output"]), nn.Sequential(
            OrderedDict(avgpool=model.avgpool, flatten=nn.Flatten(1), fc=model.fc)
        )
    if kind == "ShuffleNetV2" and names[-1] == "fc":
        # forward: conv1, maxpool, stage2..4, conv5, x.mean([2, 3]), fc
        _check_at(kind, at, ("fc",), "after 'conv5' (before the mean and 'fc')")
        return _pick(model, names[:-1]), _MeanHead(model.fc)
    if kind == "MNASNet" and names == ["layers", "classifier"]:
        # forward: layers, x.mean([2, 3]), classifier
        _check_at(kind, at, ("layers", "classifier"), "after 'layers'")
        return model.layers, _MeanHead(model.classifier)
    if kind == "SqueezeNet" and names == ["features", "classifier"]:
        # forward: features, classifier (Dropout, 1x1 conv, ReLU, AdaptiveAvgPool2d), flatten
        _check_at(kind, at, ("features", "classifier"), "after 'features'")
        return model.features, nn.Sequential(OrderedDict(classifier=model.classifier, flatten=nn.Flatten(1)))
    if kind in ("GoogLeNet", "Inception3") and "avgpool" in names:
        # forward (eval): _transform_input, the stem and inception blocks (aux heads run only in training),
        # avgpool, [dropout,] flatten, dropout, fc
        _check_at(kind, at, ("avgpool",), "before 'avgpool'")
        if model.training and getattr(model, "aux_logits", False):
            raise ConfigError(
                f"{kind} in training mode with aux_logits=True returns the auxiliary classifiers' outputs too; "
                "split it in eval mode or build it with aux_logits=False"
            )
        skip = {"aux1", "aux2", "AuxLogits"}
        trunk_names = [n for n in names[: names.index("avgpool")] if n not in skip]
        layers = [(n, getattr(model, n)) for n in trunk_names]
        if getattr(model, "transform_input", False):
            layers.insert(0, ("transform_input", _TransformInput(model)))
        rest = [(n, getattr(model, n)) for n in names[names.index("avgpool") :] if n not in skip]
        if kind == "GoogLeNet":  # avgpool, flatten, dropout, fc
            rest.insert(1, ("flatten", nn.Flatten(1)))
        else:  # avgpool, dropout, flatten, fc
            rest.insert(2, ("flatten", nn.Flatten(1)))
        return nn.Sequential(OrderedDict(layers)), nn.Sequential(OrderedDict(rest))
    return None


def _timm_family(model: nn.Module, at: str | int | None) -> tuple[nn.Module, nn.Module] | None:
    """timm models, through timm's own contract: ``forward(x) == forward_head(forward_features(x))``."""
    if not type(model).__module__.startswith("timm."):
        return None
    kind = type(model).__name__
    if hasattr(model, "feature_info") and not hasattr(model, "forward_head"):  # features_only=True
        indices = getattr(model.feature_info, "out_indices", None)
        if indices is not None and len(indices) != 1:
            raise NotStreamableError(
                f"{kind} (a timm features_only model) returns {len(indices)} feature maps; a streamed trunk "
                "returns one: create it with out_indices=(i,) for the map you need"
            )
        _check_at(kind, at, (), "nowhere: it has no head")
        return _OnlyMap(model), nn.Identity()
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return None
    _check_at(
        kind,
        at,
        ("global_pool", "avgpool", "forward_head"),
        "between forward_features and forward_head (timm)",
    )
    return _Method(model, "forward_features"), _Method(model, "forward_head")


def _monai_family(model: nn.Module, at: str | int | None) -> tuple[nn.Module, nn.Module] | None:
    """MONAI classification networks whose ``forward`` is not a plain chain of children (DenseNet is below)."""
    if not type(model).__module__.startswith("monai."):
        return None
    kinds = {cls.__name__ for cls in type(model).__mro__}
    kind = type(model).__name__
    if "MILModel" in kinds:
        raise NotStreamableError(
            f"{kind} classifies a bag of patches (input N x patches x C x H x W): each patch runs through its "
            "backbone whole, and its attention pools over the patches. To train on whole slides with slide labels, "
            "stream a backbone over the slide with tilegrad's own attention head instead: `StreamingModule(trunk, "
            "head=tilegrad.heads.AttentionMIL(...))` or `tilegrad train --head attention`"
        )
    if "NetAdapter" in kinds and all(
        hasattr(model, n) for n in ("features", "pool", "fc", "use_conv", "dim")
    ):
        # TorchVisionFCModel: features (a torchvision model without its pooling and fc) | pool, flatten, fc
        _check_at(kind, at, ("pool", "fc"), "after 'features' (before 'pool')")
        if isinstance(model.features, nn.Sequential):
            return model.features, _NetAdapterHead(model)
        if getattr(model, "node_name", ""):
            raise NotStreamableError(
                f"{kind} was built with node_name= (a torchvision feature extractor as its features): split_model "
                "streams the plain chain of the torchvision model's children only (node_name='')"
            )
        # pool=None: features is the whole torchvision model with its fc replaced by an identity
        trunk, inner_head = split_model(model.features)
        return trunk, nn.Sequential(OrderedDict(features_head=inner_head, adapter=_NetAdapterHead(model)))
    if "ResNetFeatures" in kinds:  # ResNetFeatures, ResNetEncoder (FlexibleUNet's encoder)
        raise NotStreamableError(
            f"{kind} returns the feature maps of several stages (a list), not one map: tilegrad streams a trunk "
            "with one output map. Wrap it in a module that returns the one map you need, or stream the network it "
            "is the encoder of (MONAI FlexibleUNet streams whole)"
        )
    global_kind = next((k for k in ("VarAutoEncoder", "SegResNetVAE", "GlobalNet") if k in kinds), None)
    if global_kind is not None:
        what, forward = {
            "VarAutoEncoder": (
                "its latent code (mean and log-variance) is a Linear layer over the whole encoded map",
                "stream its convolutional encoder (model.encode's conv layers) yourself, or use MONAI's "
                "AutoEncoder, which has no latent layer and streams whole",
            ),
            "SegResNetVAE": (
                "its VAE branch reads the whole encoded map through Linear layers",
                "for segmentation, load its weights into MONAI SegResNet (the same network without the VAE branch, "
                "strict=False), which streams whole",
            ),
            "GlobalNet": (
                "it predicts one affine transform for the whole image from a Linear layer over the map",
                "use MONAI LocalNet, whose displacement field is local, or run GlobalNet whole",
            ),
        }[global_kind]
        raise NotStreamableError(
            f"{kind} cannot be streamed: {what}, a global operation. Way forward: {forward}"
        )
    if "SENet" in kinds:
        # features: layer0..layer4; logits: adaptive_avg_pool, [dropout,] flatten, last_linear
        _check_at(kind, at, ("adaptive_avg_pool",), "after 'layer4' (before 'adaptive_avg_pool')")
        head = [("adaptive_avg_pool", model.adaptive_avg_pool)]
        if model.dropout is not None:
            head.append(("dropout", model.dropout))
        head += [("flatten", nn.Flatten(1)), ("last_linear", model.last_linear)]
        return _pick(model, ["layer0", "layer1", "layer2", "layer3", "layer4"]), nn.Sequential(
            OrderedDict(head)
        )
    if "EfficientNet" in kinds and hasattr(model, "_blocks"):
        base = next(c for c in type(model).__mro__ if c.__name__ == "EfficientNet")
        if type(model).forward is not base.forward:  # EfficientNetBNFeatures, EfficientNetEncoder
            raise NotStreamableError(
                f"{kind} returns the feature maps of several stages (a list), not one map: tilegrad streams a trunk "
                "with one output map. Wrap it in a module that returns the one map you need (e.g. "
                "`lambda x: model(x)[-1]` as an nn.Module's forward), or use EfficientNetBN for a classifier"
            )
        # stem padding, conv, bn0, swish, blocks, head padding, conv, bn1, swish | pool, flatten, dropout, fc
        _check_at(kind, at, ("_avg_pooling",), "after '_bn1' (before '_avg_pooling')")
        trunk = [
            ("_conv_stem_padding", model._conv_stem_padding),
            ("_conv_stem", model._conv_stem),
            ("_bn0", model._bn0),
            ("_swish0", model._swish),
            ("_blocks", model._blocks),
            ("_conv_head_padding", model._conv_head_padding),
            ("_conv_head", model._conv_head),
            ("_bn1", model._bn1),
            ("_swish1", model._swish),
        ]
        head = [
            ("_avg_pooling", model._avg_pooling),
            ("flatten", nn.Flatten(1)),
            ("_dropout", model._dropout),
            ("_fc", model._fc),
        ]
        return nn.Sequential(OrderedDict(trunk)), nn.Sequential(OrderedDict(head))
    if "Regressor" in kinds and hasattr(model, "net") and hasattr(model, "final"):
        _check_at(kind, at, ("final",), "after 'net' (before 'final')")
        if "Critic" in kinds:  # net | final (Flatten), mean over the values, view (N, 1)
            return model.net, _CriticHead(model.final)
        # Classifier, Discriminator, Regressor: net | final (flatten, linear over the whole map), reshape
        return model.net, nn.Sequential(OrderedDict(final=model.final, reshape=model.reshape))
    return None


class _NoHeadChild(ConfigError):
    """split_model of a model of no known family without ``at=`` and with no head layer among its children."""


def split_model(model: nn.Module, at: str | None = None) -> tuple[nn.Module, nn.Module]:
    """Split ``model`` before the child named ``at`` into ``(trunk, head)`` with ``head(trunk(x)) == model(x)``.

    Supported: torchvision ResNet (default ``at="avgpool"``), VGG and DenseNet (the trunk is ``features``),
    MobileNetV2/V3, EfficientNet/V2, ConvNeXt, SqueezeNet (``features``), MNASNet (``layers``), RegNet (``stem`` and
    ``trunk_output``), ShuffleNetV2 (up to ``conv5``), GoogLeNet and Inception3 (up to ``avgpool``, without the
    auxiliary classifiers, which run only in training); timm models through their own contract (the trunk is
    ``forward_features``, the head ``forward_head``; ``at`` may be timm's ``"global_pool"``; a ``features_only``
    model with one ``out_indices`` is a trunk with an identity head); MONAI's ResNet (as torchvision's; with
    ``no_max_pool=True`` the unused ``maxpool`` child is left out), DenseNet (``features`` | ``class_layers``), SENet
    (``layer0``..``layer4``), EfficientNetBN, TorchVisionFCModel (``features`` | ``pool``, ``fc``) and
    Classifier/Regressor (``net`` | ``final``); and any
    ``nn.Sequential`` (``at`` is a child name or index; default: the first adaptive/global pooling or Flatten
    layer). A trunk built from children is an ``nn.Sequential`` with the original child names, so errors name
    layers as in the model (``layer3.1.conv2``).

    >>> import torchvision
    >>> trunk, head = split_model(torchvision.models.resnet18(), at="avgpool")
    >>> list(trunk._modules)[-1], type(head[0]).__name__
    ('layer4', 'AdaptiveAvgPool2d')
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"split_model takes an nn.Module, received {type(model).__name__}: pass the model itself, e.g. "
            "split_model(torchvision.models.resnet34())"
        )
    tv_name = type(model).__name__
    found = _timm_family(model, at)  # first: timm's VGG and DenseNet share torchvision's class names
    if found is not None:
        return found
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
    for family in (_torchvision_family, _monai_family):
        found = family(model, at)
        if found is not None:
            return found
    if at is None:
        at = _default_split(model)
        if at is None:
            raise _NoHeadChild(
                f"cannot split {tv_name}: none of its children is a head layer (global pooling, Flatten, Linear) "
                f"and split_model does not know its family; pass at=, the name of the child where the head "
                f"begins, one of {names}"
            )
    if isinstance(at, int):
        at = names[at] if -len(names) <= at < len(names) else str(at)
    if at not in names:
        raise ConfigError(
            f"cannot split {tv_name} at {at!r}: expected the name of one of its children {names}"
        )
    if not isinstance(model, nn.Sequential) and tv_name != "ResNet":
        raise NotStreamableError(
            f"cannot split {tv_name} into a streamable trunk and a head: "
            f"split_model knows torchvision's and MONAI's classification families, timm models and nn.Sequential; "
            f"{tv_name}'s forward may not be a plain chain of its children. Build the trunk and head yourself "
            "(trunk = an nn.Sequential of the local layers)"
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
    except NotStreamableError:  # a known family that cannot stream says why itself
        raise
    except _NoHeadChild:
        # no known family and no head among its children: its pooling or Linear layers sit inside its blocks (a
        # segmentation network's ASPP pooling branch, a transformer's attention and MLPs). Streamed whole, so that
        # the refusal names the layer that cannot stream, not the split
        return model, None
    except TilegradError as err:
        raise NotStreamableError(
            f"cannot split {type(model).__name__} into a streamable trunk and a head: {err}"
        ) from err


def _default_split(model: nn.Module) -> str | None:
    """The child :func:`split_model` splits a model of no known family at: ``avgpool`` (ResNet), else the first
    child of :data:`HEAD_LAYERS`, or the last child when it begins with one (torchvision's MaxViT: ``classifier``
    begins with its global pool; a squeeze-excitation gate elsewhere does too); None when it has none."""
    children = _children(model)
    if type(model).__name__ == "ResNet" or "avgpool" in [n for n, _ in children]:
        return "avgpool"
    for k, (name, child) in enumerate(children):
        first = next((m for m in child.modules() if not list(m.children())), child)
        if isinstance(child, HEAD_LAYERS) or (k == len(children) - 1 and isinstance(first, HEAD_LAYERS)):
            return name
    return None


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
