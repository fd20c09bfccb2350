"""StreamingModule: exact tile-by-tile forward and backward through the local part of a CNN.

Forward runs each segment of the plan (see tilegrad/plan.py) tile by tile without recording a graph, crops each
tile's output to its core (NOTE [ Valid region ] in geometry/core.py) and assembles the segment's output. Backward goes
through the segments in reverse: each tile is recomputed with a graph, and the gradient of its core is pushed
through it with ``torch.autograd.grad``; parameter gradients are summed over tiles (NOTE [ Disjoint cores ] in
tiling.py), input gradients are added into the tile's input box. All of this happens inside one
``torch.autograd.Function``, so a single ``loss.backward()`` gives the conventional gradients of every parameter and,
when the input requires grad, of the input (a saliency map).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ._allocator import STREAM_THRESHOLD, pin_mmap_threshold
from .errors import ConfigError, DataError, ShapeError, TilegradError
from .execute import Reader, run_plan
from .geometry.toolkit import planning_state
from .heads import streamed_head
from .options import budget_option, mode_option, require_budget, shape_option, source_option, tile_size_option
from .plan import TIERS, Plan, plan_streaming
from .typing import ArrayLike, Bytes, TileSize

__all__ = ["GradientSink", "StreamingModule"]

log = logging.getLogger(__name__)


class GradientSink(Protocol):
    """Receives the input gradient of a lazy input, tile by tile (``StreamingModule(..)(x, grad_sink=sink)``).

    ``add(box, grad)`` is called once per tile of the first streamed segment during backward, in raster order
    (first spatial dim slowest), with the tile's input box (one slice per spatial dim, in input pixels) and the
    gradient contribution of that tile, shaped (N, C, *box). Boxes overlap by the halo: the input gradient at a
    pixel is the sum of the contributions of every box that contains it. Because boxes come in raster order and
    their starts never decrease along the first dim, every pixel above the current box's start is final.
    """

    def add(self, box: tuple[slice, ...], grad: torch.Tensor) -> None: ...


class StreamingModule(nn.Module):
    """Wrap the local part of a CNN so it runs tile by tile with exactly the conventional results and gradients.

    Args:
        module: the trunk: any module built from local operations (see :func:`tilegrad.receptive_field`).
        tile_size: tile extent in input pixels, halo included: an int, a tuple per spatial dim, or ``"auto"``
            (needs ``memory_budget``) to pick the fastest plan whose predicted peak fits.
        memory_budget: bytes or a string such as ``"2GiB"``; the planner keeps the predicted peak of a training
            step under it (with 20% slack) and raises :class:`tilegrad.MemoryBudgetError` if nothing fits.
            Option mistakes (``tile_size=0``, ``"auto"`` without a budget, an unknown ``mode``) raise
            :class:`tilegrad.ConfigError`.
        mode: ``"lean"`` streams the trunk as one segment (memory flat in the image size, the whole halo recomputed
            per tile); ``"stages"`` cuts it after every layer that changes the scale and keeps those feature maps
            (much less recomputation); ``"auto"`` (default) decides: with a budget the fastest plan that fits
            (plain execution included), without one the lean plan plus cuts at maps no larger than the input.
        progress: show a tqdm bar over tiles (default: only when there are more than 16 tiles and stderr is a tty).

    The wrapped module's parameters, buffers and ``state_dict`` keys are exactly the module's own.

    >>> import torch, torch.nn as nn
    >>> trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1))
    >>> streamed = StreamingModule(trunk, tile_size=16)
    >>> x = torch.randn(2, 1, 50, 37, dtype=torch.float64, requires_grad=True)
    >>> _ = trunk.double()
    >>> y = streamed(x)
    >>> torch.allclose(y, trunk(x))
    True
    >>> y.square().sum().backward()
    >>> streamed.tile_size
    (16, 16)
    """

    def __init__(
        self,
        module: nn.Module,
        tile_size: TileSize = "auto",
        *,
        memory_budget: Bytes | None = None,
        mode: str = "auto",
        head: nn.Module | None = None,
        tiers: str = "auto",
        scratch_dir: str | None = None,
        progress: bool | None = None,
    ):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"StreamingModule wraps an nn.Module, received {type(module).__name__}")
        if tiers not in TIERS:
            raise ConfigError(f"tiers must be one of {', '.join(TIERS)}; received {tiers!r}")
        self.module = module
        self.head = streamed_head(head) if head is not None else None
        self.tiers = tiers
        self.scratch_dir = scratch_dir
        self._tile_request = tile_size_option(tile_size)
        self.memory_budget = budget_option(memory_budget)
        require_budget(self._tile_request, self.memory_budget)
        mode = mode_option(mode)
        self.mode = mode
        self.progress = progress
        self._plans: dict[tuple, Plan] = {}
        self.last_plan: Plan | None = None
        self._register_load_state_dict_pre_hook(self._add_prefix)

    # -- state_dict keys are the wrapped module's own ------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        if self.head is None:
            return self.module.state_dict(*args, **kwargs)
        return nn.Module.state_dict(self, *args, **kwargs)

    def _add_prefix(self, state_dict: dict, prefix: str, *args: Any) -> None:
        if self.head is not None:  # with a head the keys are module.* and head.*
            return
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "module.")]:
            state_dict[prefix + "module." + key[len(prefix) :]] = state_dict.pop(key)

    # -- configuration --------------------------------------------------------------------------------------
    @property
    def tile_size(self) -> tuple[int, ...] | int | str:
        """The tile of the last plan (input pixels), or the requested value before the first forward."""
        if self.last_plan is not None:
            return self.last_plan.tile_size
        return self._tile_request

    def plan(self, input_shape: Sequence[int], *, dtype: torch.dtype | None = None, lazy: bool = False,
             input_grad: bool = False) -> Plan:  # fmt: skip
        """The plan used for an input of ``input_shape`` (N, C, *spatial); computed once per shape and mode."""
        input_shape = shape_option(input_shape)
        if len(input_shape) not in (3, 4, 5):
            raise ShapeError(
                f"expected an input of shape (N, C, H, W) or (N, C, D, H, W), received {len(input_shape)}-d "
                f"shape {input_shape}"
            )
        tile = self._tile_request  # plan_streaming checks it against the input's rank
        dtype = dtype or self._param_dtype()
        state = planning_state(self)  # every layer's train flag and hooks, not only the wrapper's
        key = (input_shape, dtype, lazy, input_grad, state, self.mode, self.tiers)
        if key not in self._plans:
            plan = plan_streaming(
                self.module,
                input_shape,
                tile_size=tile,
                memory_budget=self.memory_budget,
                dtype=dtype,
                mode=self.mode,
                input_in_memory=not lazy,
                input_grad=input_grad,
                head=self.head,
                tiers=self.tiers,
            )
            self._plans = {k: v for k, v in self._plans.items() if k[4] == state}
            self._plans[key] = plan
            if tile == "auto":
                log.info("tilegrad chose a plan for %s:\n%s", input_shape, plan)
        self.last_plan = self._plans[key]
        return self.last_plan

    def _param_dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def _device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: ArrayLike, *, grad_sink: GradientSink | None = None) -> torch.Tensor:
        """Run the trunk on ``x`` (a tensor, or a lazy array read tile by tile).

        ``grad_sink``: for a lazy input, which has no ``.grad``, an object receiving the input gradient tile by
        tile during backward (see :class:`tilegrad.stream.GradientSink`); with it the whole-image input gradient
        never exists in memory at once (``tilegrad saliency`` reduces it on the fly).
        """
        x = source_option(x, "StreamingModule")
        lazy = not isinstance(x, torch.Tensor)
        if grad_sink is not None and not lazy:
            raise ShapeError(
                "grad_sink is for lazy inputs; a tensor input gets its gradient in x.grad (call x.requires_grad_())"
            )
        if grad_sink is not None and not torch.is_grad_enabled():
            raise TilegradError("grad_sink needs gradients: call the module outside torch.no_grad()")
        shape = tuple(int(s) for s in x.shape)
        device = self._device()
        dtype = self._param_dtype()
        if not lazy and x.is_floating_point():
            dtype = x.dtype
        elif not lazy:
            scale = " / 255 (if the model was trained on values in [0, 1])" if x.dtype == torch.uint8 else ""
            raise DataError(
                f"the input is a {x.dtype} tensor; the model computes in {dtype}: convert it first, e.g. "
                f"x.to({dtype}){scale}. A lazy array of integers is converted tile by tile"
            )
        if not lazy and x.device != device:
            raise ShapeError(
                f"the input is on {x.device} but the module is on {device}; move one of them "
                "(or pass a lazy array, whose tiles are sent to the module's device)"
            )
        grad_params = [p for p in self.module.parameters() if p.requires_grad]
        if self.head is not None:
            grad_params += [p for p in self.head.parameters() if p.requires_grad]
        input_grad = not lazy and x.requires_grad
        training = torch.is_grad_enabled() and (bool(grad_params) or input_grad or grad_sink is not None)
        plan = self.plan(shape, dtype=dtype, lazy=lazy, input_grad=input_grad)
        whole_box = tuple(slice(0, n) for n in shape[2:])
        if plan.conventional or (len(plan.segments) == 1 and len(plan.segments[0].grid) == 1):
            # one tile covers everything: streaming would only add a recomputation
            if lazy:
                x = Reader(x, device, dtype).read(whole_box)
                if (
                    grad_sink is not None
                ):  # the whole image is one box: its gradient goes to the sink in one piece
                    x.requires_grad_(True)
                    x.register_hook(lambda g: grad_sink.add(whole_box, g))
            y = self.module(x)
            return self.head(y) if self.head is not None else y
        pin_mmap_threshold(device, STREAM_THRESHOLD)  # NOTE [ Heap growth under a budget ] in _allocator.py
        return run_plan(
            plan,
            self.module,
            x,
            training=training,
            head=self.head,
            sink=grad_sink,
            scratch_dir=self.scratch_dir,
            progress=self.progress,
            device=device,
            dtype=dtype,
        )

    def extra_repr(self) -> str:
        budget = f", memory_budget={self.memory_budget}" if self.memory_budget else ""
        return f"tile_size={self._tile_request!r}{budget}, mode={self.mode!r}"
