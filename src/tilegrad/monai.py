"""A MONAI inferer that runs :func:`tilegrad.infer`: exact tiled inference wherever MONAI takes an inferer.

``ExactInferer`` is a :class:`monai.inferers.Inferer`, so it goes where ``SimpleInferer`` or
``SlidingWindowInferer`` go: ``SupervisedEvaluator(inferer=...)``, ``SupervisedTrainer``'s validation, a bundle's
``inferer`` entry (``_target_: tilegrad.monai.ExactInferer``). It returns what ``SimpleInferer`` returns, the whole
volume's ``network(inputs)`` (same shape, dtype, device and, for a MetaTensor batch, the same metadata), computed tile
by tile with memory bounded by ``memory_budget``. Unlike sliding-window inference there is no overlap blending and no
seam: tiles carry the halo of the network's receptive field and only their exact cores are kept (NOTE [ Disjoint
cores ] in tiling.py).

This module imports MONAI at import time (it subclasses MONAI's ``Inferer``); ``import tilegrad`` does not import
it. Install MONAI with ``pip install 'tilegrad[monai]'``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ConfigError, MissingDependencyError
from .infer import infer
from .options import batch_tiles_option, budget_option, tile_size_option
from .typing import Bytes

try:
    from monai.inferers import Inferer
except ImportError as err:  # pragma: no cover - monai is a dev dependency
    raise MissingDependencyError(
        f"tilegrad.monai needs MONAI ({err}): pip install 'tilegrad[monai]' (or pip install monai)"
    ) from err

__all__ = ["ExactInferer"]


class ExactInferer(Inferer):
    """Exact tiled inference (:func:`tilegrad.infer`) behind MONAI's inferer interface.

    Usage is as in the :py:class:`monai.inferers.Inferer` base class::

        inferer = ExactInferer(memory_budget="2GiB")
        model.eval()
        with torch.no_grad():
            pred = inferer(inputs=data, network=model)   # == model(data), computed tile by tile

    Args:
        memory_budget: bytes or a string such as ``"2GiB"``: each call takes the largest tile whose predicted peak
            fits (NOTE [ Heap growth under a budget ] in tilegrad/_allocator.py).
        tile_size: input tile extent in pixels, halo included: an int or one int per spatial dim. Give it instead of
            (or with) ``memory_budget``; at least one of the two is needed.
        batch_tiles: run up to this many tiles of equal shape in one forward call (NOTE [ Tile batches ] in infer.py).
        progress: whether to print a tqdm progress bar over the tiles of each call.

    Note:
        ``network`` must be a ``torch.nn.Module`` of local layers in eval mode (the evaluators put it there):
        tilegrad reads its receptive field from the module itself, so a lambda cannot be traced, and a training-mode
        network is refused (train with :class:`tilegrad.StreamingModule`). The whole batch is planned and run at
        once; samples are independent in eval mode.

    >>> import torch, monai
    >>> net = monai.networks.nets.UNet(2, 1, 2, channels=(4, 8), strides=(2,), norm="batch").eval()
    >>> image = torch.randn(2, 1, 96, 80)
    >>> with torch.no_grad():
    ...     pred = ExactInferer(tile_size=48)(image, net)
    ...     torch.allclose(pred, net(image), atol=1e-5)
    True
    """

    def __init__(
        self,
        memory_budget: Bytes | None = None,
        tile_size: int | tuple[int, ...] | None = None,
        batch_tiles: int = 1,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if tile_size is None and memory_budget is None:
            raise ConfigError(
                "ExactInferer needs memory_budget= (e.g. memory_budget='2GiB', the tile is chosen to fit) or "
                "tile_size= (input pixels per tile, halo included)"
            )
        if tile_size is not None and tile_size_option(tile_size) == "auto":
            raise ConfigError(
                "ExactInferer takes tile_size=None with memory_budget= to choose the tile; 'auto' is not needed"
            )
        self.memory_budget = budget_option(memory_budget)
        self.tile_size = None if tile_size is None else tile_size_option(tile_size)
        self.batch_tiles = batch_tiles_option(batch_tiles)
        self.progress = bool(progress)

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Unified callable function API of Inferers.

        Args:
            inputs: model input data for inference, a batch (N, C, *spatial) (a MetaTensor keeps its metadata).
            network: target model to execute inference, an ``nn.Module`` in eval mode.
            args: not supported: tiles are run as ``network(tile)``; bind extra arguments in a module.
            kwargs: not supported, as ``args``.
        """
        if args or kwargs:
            extra = [*(type(a).__name__ for a in args), *kwargs]
            raise ConfigError(
                f"ExactInferer runs network(tile) and passes no other arguments; received {extra}. Wrap the network "
                "in an nn.Module whose forward(x) supplies them"
            )
        if not isinstance(network, nn.Module):
            raise ConfigError(
                f"ExactInferer needs the network as a torch.nn.Module (its receptive field is read from its layers); "
                f"received {type(network).__name__}. Wrap a function in an nn.Module whose forward(x) calls it"
            )
        if network.training:
            raise ConfigError(
                f"ExactInferer runs inference and needs {type(network).__name__} in eval mode (network.eval(); "
                "MONAI's evaluators do this); to train tile by tile use tilegrad.StreamingModule"
            )
        if not isinstance(inputs, torch.Tensor):
            raise ConfigError(
                f"ExactInferer takes a tensor batch (N, C, *spatial); received {type(inputs).__name__}"
            )
        plain = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs  # MetaTensor -> torch.Tensor
        out = infer(  # runs under torch.no_grad()
            network,
            plain,
            tile_size=self.tile_size,
            memory_budget=self.memory_budget,
            batch_tiles=self.batch_tiles,
            progress=self.progress,
        )
        return _with_meta_of(inputs, out)

    def __repr__(self) -> str:
        return (
            f"ExactInferer(memory_budget={self.memory_budget}, tile_size={self.tile_size}, "
            f"batch_tiles={self.batch_tiles})"
        )


def _with_meta_of(inputs: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` as a MetaTensor carrying ``inputs``' metadata when ``inputs`` is one, as ``network(inputs)`` would be:
    MONAI's ``MetaTensor.update_meta`` shares a batch's metadata (and copies a single image's)."""
    from monai.data import MetaTensor

    if not isinstance(inputs, MetaTensor):
        return out
    result = MetaTensor(out)
    result.is_batch = inputs.is_batch
    result.copy_meta_from(inputs, copy_attr=not inputs.is_batch)
    return result
