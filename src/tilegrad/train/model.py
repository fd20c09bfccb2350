"""Slide classifiers: a streamed trunk (the local layers) and a head (global pooling + a linear classifier, or
gated attention-MIL: tilegrad.heads).

:func:`build_model` accepts

* a torchvision classification model name (``resnet18``, ``resnet34``, ``densenet121``, ``vgg16``, ...),
* a built-in tilegrad model (``small_cnn``, the demo's network),
* ``package.module:factory``: a callable returning either an ``nn.Module`` (split automatically into trunk and head,
  see :func:`tilegrad.split_model`; a fully convolutional one is the trunk, given the ``head``) or a ``(trunk,
  head)`` pair (used as given). MONAI's classification networks
  work this way, e.g. ``monai.networks.nets:DenseNet121`` with ``{"spatial_dims": 2, "in_channels": 3,
  "out_channels": 2}`` or ``monai.networks.nets:resnet18`` with ``{"spatial_dims": 2, "n_input_channels": 3}``.

The trunk is wrapped in :class:`tilegrad.StreamingModule` when a tile size or memory budget is given, so a slide of
any size runs through it tile by tile with exact gradients; without one the trunk runs on the whole image
(conventional training, e.g. on downsampled slides).

NOTE [ Frozen normalisation ]: with ``freeze_norm`` (the default) every BatchNorm/InstanceNorm layer stays in eval
mode, using its running statistics, even while the rest of the model trains; their affine weights are still trained.
:meth:`SlideClassifier.train` re-applies this every time the mode changes. This is what CLAM-style pipelines and
StreamingCLAM do with one slide per step: batch statistics of a single slide are noisy, and pretrained running
statistics are kept. ``freeze_norm=False`` trains them as conventional training does: the streamed trunk computes
each layer's statistics over the whole slide tile by tile (NOTE [ Streamed statistics ] in tilegrad/statistics.py),
so outputs, gradients and the running-statistics update equal those of the whole image; it costs time (each
statistic is a segment boundary the engine must complete before the next layer runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, NotStreamableError, TilegradError
from ..heads import AttentionMIL, GlobalPool, StreamedHead
from ..models import small_cnn
from ..models.resolve import find_model
from ..split import has_head, local_trunk

__all__ = [
    "HEADS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORM_TYPES",
    "PoolingHead",
    "SlideClassifier",
    "build_model",
    "make_head",
    "small_cnn",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)  # with a train/eval mode


class PoolingHead(StreamedHead):
    """Global max or average pooling over all spatial axes (:class:`tilegrad.heads.GlobalPool`), then a linear
    classifier. A streamed head (NOTE [ Streamed heads ] in tilegrad/heads.py): its partials are the pooling's.

    >>> head = PoolingHead(8, 2, pool="max")
    >>> head(torch.zeros(1, 8, 5, 7)).shape
    torch.Size([1, 2])
    """

    def __init__(self, channels: int, num_classes: int, pool: str = "max") -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ConfigError(f"pool must be 'max' or 'avg', received {pool!r}")
        self.pool = pool
        self.pooling = GlobalPool(pool)  # no parameters: the state_dict keys stay fc.weight, fc.bias
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooling(features))

    def partial(self, core: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.pooling.partial(core)

    def merge(self, partials: Sequence[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        return self.pooling.merge(partials)

    def finish(self, merged: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.fc(self.pooling.finish(merged))


# ``--head``: the heads tilegrad train builds on a trunk (a factory's own (trunk, head) pair is used as given).
HEADS = ("max", "avg", "attention")


def make_head(kind: str, channels: int, num_classes: int, **kwargs: Any) -> StreamedHead:
    """The head ``kind`` (one of :data:`HEADS`) on ``channels`` trunk channels; ``kwargs`` go to
    :class:`tilegrad.heads.AttentionMIL` (``hidden``, ``gated``, ``dropout``); pooling heads take none.

    >>> make_head("attention", 8, 2, hidden=4)(torch.zeros(1, 8, 3, 3)).shape
    torch.Size([1, 2])
    """
    if kind not in HEADS:
        raise ConfigError(f"head must be {', '.join(HEADS[:-1])} or {HEADS[-1]}, received {kind!r}")
    if kind == "attention":
        try:
            return AttentionMIL(channels, classes=num_classes, **kwargs)
        except TypeError as err:  # an unknown keyword
            raise ConfigError(
                f"--head-kwargs for the attention head take hidden, gated and dropout; {err}"
            ) from None
    if kwargs:
        raise ConfigError(
            f"the {kind} pooling head takes no --head-kwargs, received {sorted(kwargs)}; they are for --head "
            f"attention (hidden, gated, dropout)"
        )
    return PoolingHead(channels, num_classes, pool=kind)


class SlideClassifier(nn.Module):
    """``head(trunk(x))`` with the trunk optionally streamed; see the module docstring.

    ``tile_size`` (int or tuple) or ``memory_budget`` (``"2GiB"``: tile size chosen automatically) turns streaming
    on; with neither, the trunk runs on the whole input.
    """

    def __init__(
        self,
        trunk: nn.Module,
        head: nn.Module,
        *,
        tile_size: int | tuple[int, ...] | None = None,
        memory_budget: int | str | None = None,
        freeze_norm: bool = True,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.freeze_norm = freeze_norm
        self.tile_size = tile_size
        self.memory_budget = memory_budget
        # The streaming wrapper holds the same trunk object; kept out of the module registry so that parameters
        # and state_dict keys appear once (under ``trunk.``).
        # A streamed head (tilegrad.heads) runs inside the engine: the trunk's output map is never whole.
        self.__dict__["streamed"] = _make_streamed(trunk, head, tile_size, memory_budget)
        self.train(self.training)

    @property
    def is_streamed(self) -> bool:
        return self.streamed is not None

    @property
    def streams_head(self) -> bool:
        """Whether the head is reduced tile by tile inside the streaming engine (NOTE [ Streamed heads ])."""
        return self.streamed is not None and getattr(self.streamed, "head", None) is not None

    def features(self, x: Any) -> torch.Tensor:
        """Trunk output for a (1, C, H, W) tensor or lazy array (lazy arrays need streaming). With a streamed head
        the model itself never holds this map: this runs the trunk alone, streamed, and returns it whole."""
        if self.streamed is not None:
            if self.streams_head:
                if "trunk_streamed" not in self.__dict__:
                    self.__dict__["trunk_streamed"] = _make_streamed(
                        self.trunk, None, self.tile_size, self.memory_budget
                    )
                self.trunk_streamed.training = self.training
                return self.trunk_streamed(x)
            return self.streamed(x)
        if not isinstance(x, torch.Tensor):
            x = x.materialize() if hasattr(x, "materialize") else torch.as_tensor(x[:])
        param = next(self.trunk.parameters(), None)
        if param is not None:
            x = x.to(param.device)
        return self.trunk(x)

    def forward(self, x: Any, *, grad_sink: Any = None) -> torch.Tensor:
        """``head(trunk(x))``. ``grad_sink`` (a streamed model and a lazy ``x``): receives the input gradient tile by
        tile (tilegrad.stream.GradientSink)."""
        if self.streams_head:
            return self.streamed(x, grad_sink=grad_sink)
        if grad_sink is not None:
            if self.streamed is None:
                raise ConfigError("grad_sink needs a streamed model (tile_size= or memory_budget=)")
            return self.head(self.streamed(x, grad_sink=grad_sink))
        return self.head(self.features(x))

    def train(self, mode: bool = True) -> SlideClassifier:
        super().train(mode)
        if self.streamed is not None:
            self.streamed.training = (
                mode  # not a registered child (see __init__); its plans are keyed by mode
            )
        if self.freeze_norm:  # NOTE [ Frozen normalisation ]
            for module in self.trunk.modules():
                if isinstance(module, NORM_TYPES):
                    module.eval()
        return self


def _make_streamed(
    trunk: nn.Module, head: nn.Module | None, tile_size: Any, memory_budget: Any
) -> nn.Module | None:
    """The StreamingModule of the trunk, with the head inside when it is a streamed head (a factory's own head is
    applied to the trunk's output map instead)."""
    if tile_size is None and memory_budget is None:
        return None
    from ..stream import StreamingModule

    options: dict[str, Any] = {"head": head} if isinstance(head, StreamedHead) else {}
    if memory_budget is not None:
        return StreamingModule(trunk, tile_size="auto", memory_budget=memory_budget, **options)
    return StreamingModule(trunk, tile_size=tile_size, **options)


def build_model(
    name: str,
    num_classes: int,
    *,
    in_channels: int = 3,
    head: str = "max",
    head_kwargs: dict[str, Any] | None = None,
    pretrained: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    tile_size: int | tuple[int, ...] | None = None,
    memory_budget: int | str | None = None,
    freeze_norm: bool = True,
) -> SlideClassifier:
    """Build a :class:`SlideClassifier` from a model name (see the module docstring).

    ``head`` is one of :data:`HEADS` (``max``/``avg``: :class:`PoolingHead`; ``attention``:
    :class:`tilegrad.heads.AttentionMIL` with ``head_kwargs``); a factory that returns a (trunk, head) pair keeps
    its own head.

    >>> m = build_model("small_cnn", 2, model_kwargs={"width": 4})
    >>> m(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 2])
    """
    trunk, given = _trunk_and_head(name, in_channels, pretrained, dict(model_kwargs or {}))
    if given is None:
        channels = _output_channels(trunk, in_channels, name)
        given = make_head(head, channels, num_classes, **dict(head_kwargs or {}))
    return SlideClassifier(
        trunk, given, tile_size=tile_size, memory_budget=memory_budget, freeze_norm=freeze_norm
    )


def _trunk_and_head(
    name: str, in_channels: int, pretrained: bool, kwargs: dict[str, Any]
) -> tuple[nn.Module, nn.Module | None]:
    spec = find_model(name)  # the resolver every command uses (tilegrad/models/resolve.py)
    if spec.source == "factory":
        made = spec.build(**kwargs)
        if isinstance(made, tuple) and len(made) == 2 and all(isinstance(m, nn.Module) for m in made):
            return made[0], made[1]
        if not isinstance(made, nn.Module):
            raise ConfigError(
                f"factory {name!r} returned {type(made).__name__}; expected an nn.Module or a (trunk, head) pair"
            )
        return _split_if_needed(made, name), None
    if spec.source == "tilegrad":
        if pretrained:
            raise ConfigError(f"there are no pretrained weights for the built-in model {name!r}")
        return _split_if_needed(spec.module(in_channels=in_channels, **kwargs), name), None
    if in_channels != 3:
        raise ConfigError(f"torchvision model {name!r} takes 3 input channels, the slides have {in_channels}")
    try:
        model = spec.module(weights="DEFAULT" if pretrained else None, **kwargs)
    except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError
        if not pretrained:
            raise
        raise ConfigError(
            f"could not load pretrained weights for {name!r} ({err}); put them in the torch hub cache "
            f"($TORCH_HOME/hub/checkpoints) or train without --pretrained"
        ) from None
    return _split(model, name), None


def _split_if_needed(model: nn.Module, name: str) -> nn.Module:
    """A fully convolutional network (no global pooling, Flatten or Linear: small_cnn, a factory's trunk) is the
    trunk as it is; a classifier is split."""
    return _split(model, name) if has_head(model) else model


def _split(model: nn.Module, name: str) -> nn.Module:
    """The local part of a classification network (everything before global pooling), via split_model: the head is
    replaced by a PoolingHead, so the point-wise layers it applied first join the trunk (split.local_trunk)."""
    try:
        trunk, _ = local_trunk(model)
    except NotStreamableError:  # a known family that cannot stream says why, and what to do instead
        raise
    except TilegradError as err:
        raise ConfigError(
            f"cannot split model {name!r} into a streamed trunk and a head: {err}. Give a factory that returns "
            f"a (trunk, head) pair instead"
        ) from None
    return trunk


def _output_channels(trunk: nn.Module, in_channels: int, name: str) -> int:
    was_training = trunk.training
    trunk.eval()
    try:
        param = next(trunk.parameters(), None)
        dtype = param.dtype if param is not None else torch.float32
        for size in (64, 256):
            try:
                with torch.no_grad():
                    out = trunk(torch.zeros(1, in_channels, size, size, dtype=dtype))
                return int(out.shape[1])
            except RuntimeError:
                continue
    finally:
        trunk.train(was_training)
    raise TilegradError(f"could not run the trunk of {name!r} on a 256x256 input to find its output channels")
