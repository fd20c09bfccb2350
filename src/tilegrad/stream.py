"""StreamingModule: exact tile-by-tile forward and backward through the local part of a CNN.

Forward runs each segment of the plan (see tilegrad/plan.py) tile by tile without recording a graph, crops each
tile's output to its core (NOTE [ Valid region ] in geometry.py) and assembles the segment's output. Backward goes
through the segments in reverse: each tile is recomputed with a graph, and the gradient of its core is pushed
through it with ``torch.autograd.grad``; parameter gradients are summed over tiles (NOTE [ Disjoint cores ] in
tiling.py), input gradients are added into the tile's input box. All of this happens inside one
``torch.autograd.Function``, so a single ``loss.backward()`` gives the conventional gradients of every parameter and,
when the input requires grad, of the input (a saliency map).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ._autocast import autocast_state, replay_autocast
from .errors import GeometryError, ShapeError, TilegradError
from .plan import Plan, SegmentPlan, plan_streaming
from .typing import ArrayLike, Bytes, TileSize
from .units import parse_bytes

__all__ = ["StreamingModule"]

log = logging.getLogger(__name__)


class _Reader:
    """Reads input boxes from a tensor or a lazy array, as tensors on the module's device and dtype."""

    def __init__(self, source: ArrayLike, device: torch.device, dtype: torch.dtype):
        self.source = source
        self.device = device
        self.dtype = dtype
        self.is_tensor = isinstance(source, torch.Tensor)

    def read(self, box: tuple[slice, ...]) -> torch.Tensor:
        key = (slice(None), slice(None), *box)
        if self.is_tensor:
            return self.source[key]
        block = np.asarray(self.source[key])
        if block.dtype.kind in "ui" and self.dtype.is_floating_point:
            block = block.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(block)).to(device=self.device, dtype=self.dtype)


def _run_forward(seg: SegmentPlan, reader: _Reader, out: torch.Tensor | None, progress: Any) -> torch.Tensor:
    chain = seg.chain
    for tile in seg.grid:
        y = chain(reader.read(tile.inputs))
        core = y[(slice(None), slice(None), *tile.crop)]
        if out is None:
            shape = (*y.shape[:2], *(s for s in seg.out_shape[2:]))
            out = torch.empty(shape, dtype=y.dtype, device=y.device)
            if y.is_contiguous(memory_format=torch.channels_last) and y.dim() == 4:
                out = out.contiguous(memory_format=torch.channels_last)
        out[(slice(None), slice(None), *tile.outputs)] = core
        if progress is not None:
            progress.update(1)
    assert out is not None
    return out


class _StreamFunction(torch.autograd.Function):
    """Streams the plan's segments; parameters are inputs so autograd routes their gradients normally."""

    @staticmethod
    def forward(
        ctx: Any, owner: StreamingModule, plan: Plan, x: torch.Tensor | None, reader: _Reader, *params: Any
    ):
        device_type = reader.device.type
        ctx.autocast = autocast_state(device_type)
        ctx.device_type = device_type
        ctx.owner, ctx.plan, ctx.reader = owner, plan, reader
        ctx.params = params
        ctx.x_needs_grad = x is not None and x.requires_grad
        boundaries: list[torch.Tensor] = []
        source = reader
        with owner._progress(plan, "forward") as bar:
            for seg in plan.segments:
                y = _run_forward(seg, source, None, bar)
                boundaries.append(y)
                source = _Reader(y, y.device, y.dtype)
        ctx.boundaries = boundaries[:-1]
        if x is not None:
            ctx.save_for_backward(x)
        return boundaries[-1]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        if ctx.boundaries is None:
            raise TilegradError(
                "this streamed forward has already been backpropagated once (its boundary maps are freed); "
                "run the StreamingModule forward again before another backward"
            )
        plan: Plan = ctx.plan
        params = ctx.params
        param_index = {id(p): i for i, p in enumerate(params)}
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        boundaries = ctx.boundaries
        ctx.boundaries = None
        x_grad = None
        upstream = grad_out  # gradient of the current segment's output
        del grad_out
        with ctx.owner._progress(plan, "backward") as bar:
            for k in range(len(plan.segments) - 1, -1, -1):
                seg = plan.segments[k]
                if k > 0:
                    reader = _Reader(boundaries[k - 1], boundaries[k - 1].device, boundaries[k - 1].dtype)
                    need_input_grad = True
                else:
                    reader = ctx.reader
                    if reader.is_tensor:
                        (x,) = ctx.saved_tensors
                        reader = _Reader(x.detach(), reader.device, reader.dtype)
                    need_input_grad = ctx.x_needs_grad
                grad_in = torch.zeros_like(reader.source) if need_input_grad else None
                chain = seg.chain
                seg_params = [p for p in chain.parameters_of() if id(p) in param_index]
                for tile in seg.grid:
                    xin = reader.read(tile.inputs).detach()
                    if need_input_grad:
                        xin.requires_grad_(True)
                    with torch.enable_grad(), replay_autocast(ctx.device_type, ctx.autocast):
                        y = chain(xin)
                        core = y[(slice(None), slice(None), *tile.crop)]
                    g = upstream[(slice(None), slice(None), *tile.outputs)]
                    inputs = ([xin] if need_input_grad else []) + seg_params
                    if not inputs:
                        continue
                    grads = torch.autograd.grad(core, inputs, g.to(core.dtype), allow_unused=True)
                    if need_input_grad:
                        grad_in[(slice(None), slice(None), *tile.inputs)] += grads[0]
                        grads = grads[1:]
                    for p, gp in zip(seg_params, grads):
                        if gp is None:
                            continue
                        i = param_index[id(p)]
                        param_grads[i] = gp if param_grads[i] is None else param_grads[i] + gp
                    del y, core, grads
                    if bar is not None:
                        bar.update(1)
                if k > 0:
                    boundaries[k - 1] = None  # free the map as soon as its gradient exists
                    upstream = grad_in
                else:
                    x_grad = grad_in
        return (None, None, x_grad, None, *param_grads)


class StreamingModule(nn.Module):
    """Wrap the local part of a CNN so it runs tile by tile with exactly the conventional results and gradients.

    Args:
        module: the trunk: any module built from local operations (see :func:`tilegrad.receptive_field`).
        tile_size: tile extent in input pixels, halo included: an int, a tuple per spatial dim, or ``"auto"``
            (needs ``memory_budget``) to pick the fastest plan whose predicted peak fits.
        memory_budget: bytes or a string such as ``"2GiB"``; the planner keeps the predicted peak of a training
            step under it (with 20% slack) and raises :class:`tilegrad.MemoryBudgetError` if nothing fits.
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
        progress: bool | None = None,
    ):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"StreamingModule wraps an nn.Module, received {type(module).__name__}")
        self.module = module
        self._tile_request = self._check_tile(tile_size)
        self.memory_budget = None if memory_budget is None else parse_bytes(memory_budget)
        if self._tile_request == "auto" and self.memory_budget is None:
            raise GeometryError(
                "tile_size='auto' needs memory_budget= (bytes or a string such as '2GiB') to choose a tile"
            )
        if mode not in ("auto", "lean", "stages"):
            raise GeometryError(f"mode must be 'auto', 'lean' or 'stages', received {mode!r}")
        self.mode = mode
        self.progress = progress
        self._plans: dict[tuple, Plan] = {}
        self.last_plan: Plan | None = None
        self._register_load_state_dict_pre_hook(self._add_prefix)

    # -- state_dict keys are the wrapped module's own ------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.state_dict(*args, **kwargs)

    @staticmethod
    def _add_prefix(state_dict: dict, prefix: str, *args: Any) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "module.")]:
            state_dict[prefix + "module." + key[len(prefix) :]] = state_dict.pop(key)

    # -- configuration --------------------------------------------------------------------------------------
    @staticmethod
    def _check_tile(tile_size: TileSize) -> int | tuple[int, ...] | str:
        if tile_size == "auto":
            return "auto"
        if isinstance(tile_size, bool) or not isinstance(tile_size, (int, tuple, list)):
            raise ShapeError(f"tile_size must be an int, a tuple of ints or 'auto', received {tile_size!r}")
        values = (tile_size,) if isinstance(tile_size, int) else tuple(tile_size)
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ShapeError(f"tile_size must hold positive ints, received {tile_size!r}")
        return tile_size if isinstance(tile_size, int) else tuple(values)

    @property
    def tile_size(self) -> tuple[int, ...] | int | str:
        """The tile of the last plan (input pixels), or the requested value before the first forward."""
        if self.last_plan is not None:
            return self.last_plan.tile_size
        return self._tile_request

    def plan(self, input_shape: Sequence[int], *, dtype: torch.dtype | None = None, lazy: bool = False,
             input_grad: bool = False) -> Plan:  # fmt: skip
        """The plan used for an input of ``input_shape`` (N, C, *spatial); computed once per shape and mode."""
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) not in (3, 4, 5):
            raise ShapeError(
                f"expected an input of shape (N, C, H, W) or (N, C, D, H, W), received {len(input_shape)}-d "
                f"shape {input_shape}"
            )
        ndim = len(input_shape) - 2
        tile = self._tile_request
        if isinstance(tile, tuple) and len(tile) != ndim:
            raise ShapeError(
                f"tile_size {tile} has {len(tile)} entries but the input has {ndim} spatial dims "
                f"(shape {input_shape}): give one entry per spatial dim or a single int"
            )
        dtype = dtype or self._param_dtype()
        key = (input_shape, dtype, lazy, input_grad, self.training, self.mode)
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
            )
            self._plans = {k: v for k, v in self._plans.items() if k[4] == self.training}
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

    def _progress(self, plan: Plan, what: str) -> Any:
        total = sum(len(s.grid) for s in plan.segments)
        show = self.progress if self.progress is not None else False
        if not show or total <= 1:
            return _NullBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"tilegrad {what}", unit="tile", leave=False)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: ArrayLike) -> torch.Tensor:
        lazy = not isinstance(x, torch.Tensor)
        if lazy and not (hasattr(x, "shape") and hasattr(x, "__getitem__")):
            raise ShapeError(
                f"expected a tensor or a lazy array with .shape and numpy-style slicing, received {type(x).__name__}"
            )
        shape = tuple(int(s) for s in x.shape)
        device = self._device()
        dtype = self._param_dtype()
        if not lazy and x.is_floating_point():
            dtype = x.dtype
        if not lazy and x.device != device:
            raise ShapeError(
                f"the input is on {x.device} but the module is on {device}; move one of them "
                "(or pass a lazy array, whose tiles are sent to the module's device)"
            )
        grad_params = [p for p in self.module.parameters() if p.requires_grad]
        input_grad = not lazy and x.requires_grad
        training = torch.is_grad_enabled() and (bool(grad_params) or input_grad)
        plan = self.plan(shape, dtype=dtype, lazy=lazy, input_grad=input_grad)
        reader = _Reader(x, device, dtype)
        if plan.conventional or (len(plan.segments) == 1 and len(plan.segments[0].grid) == 1):
            # one tile covers everything: streaming would only add a recomputation
            return self.module(x if not lazy else reader.read(tuple(slice(None) for _ in shape[2:])))
        if not training:
            with self._progress(plan, "forward") as bar:
                source = reader
                for seg in plan.segments:
                    y = _run_forward(seg, source, None, bar)
                    source = _Reader(y, y.device, y.dtype)
            return y
        return _StreamFunction.apply(self, plan, x if not lazy else None, reader, *grad_params)

    def extra_repr(self) -> str:
        budget = f", memory_budget={self.memory_budget}" if self.memory_budget else ""
        return f"tile_size={self._tile_request!r}{budget}, mode={self.mode!r}"


class _NullBar:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
