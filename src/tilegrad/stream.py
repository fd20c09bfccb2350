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
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ._allocator import pin_mmap_threshold
from ._autocast import autocast_state, replay_autocast
from .errors import ConfigError, ShapeError, TilegradError
from .options import budget_option, mode_option, require_budget, tile_size_option
from .plan import Plan, SegmentPlan, plan_streaming
from .typing import ArrayLike, Bytes, TileSize

__all__ = ["GradientSink", "StreamingModule"]

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


class _Step:
    """What the segments of one streamed forward share: the progress bars (one for the forward over every tile,
    one for the backward, opened by the first segment whose backward runs and closed after the last tile)."""

    def __init__(self, owner: StreamingModule, plan: Plan):
        self.owner = owner
        self.total = sum(len(s.grid) for s in plan.segments if not s.keep)
        self.remaining = self.total
        self.forward_bar: Any = None
        self._backward: Any = None

    def tick_backward(self) -> None:
        if self._backward is None:
            self._backward = self.owner._open_bar(self.total, "backward")
        if self._backward is not None:
            self._backward.update(1)
        self.remaining -= 1
        if self.remaining <= 0 and self._backward is not None:
            self._backward.close()


class _SegmentFunction(torch.autograd.Function):
    """One streamed segment. Forward: its tiles without a graph. Backward: each tile again with a graph, the
    gradient of its core pushed through it (NOTE [ Disjoint cores ] in tiling.py). The segment's parameters are
    inputs of the Function, so autograd routes their gradients (and sums them with other uses) as usual; segments
    compose through ordinary autograd, so kept segments and other layers can sit between them."""

    @staticmethod
    def forward(
        ctx: Any,
        seg: SegmentPlan,
        step: _Step,
        reader: _Reader,
        sink: GradientSink | None,
        x: torch.Tensor | None,
        anchor: torch.Tensor | None,
        *params: Any,
    ):
        ctx.device_type = reader.device.type
        ctx.autocast = autocast_state(ctx.device_type)
        ctx.seg, ctx.step, ctx.sink = seg, step, sink
        ctx.seg_params = params  # parameters live as long as the module; no activation is held here
        # NOTE [ Boundary lifetime ]: a tensor input is kept only through save_for_backward, never as a ctx
        # attribute, so autograd frees it as soon as this segment's backward has run (ctx itself lives as long as
        # the graph). A lazy input is kept as its reader: it costs no memory.
        ctx.lazy_reader = None if x is not None else reader
        if x is not None:
            ctx.save_for_backward(x)
        ctx.reader_device, ctx.reader_dtype = reader.device, reader.dtype
        return _run_forward(seg, reader, None, step.forward_bar)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        seg: SegmentPlan = ctx.seg
        if ctx.lazy_reader is not None:
            reader = ctx.lazy_reader
        else:
            (x,) = ctx.saved_tensors
            reader = _Reader(x.detach(), ctx.reader_device, ctx.reader_dtype)
        sink: GradientSink | None = ctx.sink
        need_input_grad = ctx.needs_input_grad[4] or sink is not None
        params = ctx.seg_params
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[6:]) if need]
        param_grads: dict[int, torch.Tensor] = {}
        grad_in = torch.zeros_like(reader.source) if need_input_grad and sink is None else None
        chain = seg.chain
        for tile in seg.grid:
            ctx.step.tick_backward()
            inputs = wanted
            xin = reader.read(tile.inputs).detach()
            if need_input_grad:
                xin.requires_grad_(True)
                inputs = [xin, *wanted]
            if not inputs:
                continue
            with torch.enable_grad(), replay_autocast(ctx.device_type, ctx.autocast):
                y = chain(xin)
                core = y[(slice(None), slice(None), *tile.crop)]
            g = grad_out[(slice(None), slice(None), *tile.outputs)]
            grads = torch.autograd.grad(core, inputs, g.to(core.dtype), allow_unused=True)
            if need_input_grad:
                if sink is not None:
                    sink.add(tile.inputs, grads[0])
                else:
                    grad_in[(slice(None), slice(None), *tile.inputs)] += grads[0]
                grads = grads[1:]
            for p, gp in zip(wanted, grads):
                if gp is not None:
                    param_grads[id(p)] = gp if id(p) not in param_grads else param_grads[id(p)] + gp
            del y, core, grads, xin
        return (None, None, None, None, grad_in, None, *(param_grads.get(id(p)) for p in params))

    @classmethod
    def run(
        cls, seg: SegmentPlan, step: _Step, reader: _Reader, x: torch.Tensor | None, sink: GradientSink | None
    ) -> torch.Tensor:
        params = [p for p in seg.chain.parameters_of() if p.requires_grad]
        # with a sink and frozen parameters nothing else would put this segment on the graph
        anchor = torch.zeros((), requires_grad=True) if sink is not None else None
        return cls.apply(seg, step, reader, sink, x, anchor, *params)


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
        progress: bool | None = None,
    ):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"StreamingModule wraps an nn.Module, received {type(module).__name__}")
        self.module = module
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
        return self.module.state_dict(*args, **kwargs)

    @staticmethod
    def _add_prefix(state_dict: dict, prefix: str, *args: Any) -> None:
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
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) not in (3, 4, 5):
            raise ShapeError(
                f"expected an input of shape (N, C, H, W) or (N, C, D, H, W), received {len(input_shape)}-d "
                f"shape {input_shape}"
            )
        tile = self._tile_request  # plan_streaming checks it against the input's rank
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

    def _open_bar(self, total: int, what: str) -> Any:
        """A tqdm bar over ``total`` tiles, or None (default: only with more than 16 tiles and a terminal)."""
        show = self.progress if self.progress is not None else (total > 16 and sys.stderr.isatty())
        if not show or total <= 1:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"tilegrad {what}", unit="tile", leave=False)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: ArrayLike, *, grad_sink: GradientSink | None = None) -> torch.Tensor:
        """Run the trunk on ``x`` (a tensor, or a lazy array read tile by tile).

        ``grad_sink``: for a lazy input, which has no ``.grad``, an object receiving the input gradient tile by
        tile during backward (see :class:`tilegrad.stream.GradientSink`); with it the whole-image input gradient
        never exists in memory at once (``tilegrad saliency`` reduces it on the fly).
        """
        lazy = not isinstance(x, torch.Tensor)
        if lazy and not (hasattr(x, "shape") and hasattr(x, "__getitem__")):
            raise ShapeError(
                f"expected a tensor or a lazy array with .shape and numpy-style slicing, received {type(x).__name__}"
            )
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
        if not lazy and x.device != device:
            raise ShapeError(
                f"the input is on {x.device} but the module is on {device}; move one of them "
                "(or pass a lazy array, whose tiles are sent to the module's device)"
            )
        grad_params = [p for p in self.module.parameters() if p.requires_grad]
        input_grad = not lazy and x.requires_grad
        training = torch.is_grad_enabled() and (bool(grad_params) or input_grad or grad_sink is not None)
        plan = self.plan(shape, dtype=dtype, lazy=lazy, input_grad=input_grad)
        reader = _Reader(x, device, dtype)
        whole = tuple(slice(None) for _ in shape[2:])
        whole_box = tuple(slice(0, n) for n in shape[2:])

        def read_whole() -> torch.Tensor:
            t = reader.read(whole)
            if (
                grad_sink is not None
            ):  # the whole image is one box: hand its gradient to the sink in one piece
                t.requires_grad_(True)
                t.register_hook(lambda g: grad_sink.add(whole_box, g))
            return t

        if plan.conventional or (len(plan.segments) == 1 and len(plan.segments[0].grid) == 1):
            # one tile covers everything: streaming would only add a recomputation
            return self.module(x if not lazy else read_whole())
        pin_mmap_threshold(device)  # NOTE [ Heap growth under a budget ] in _allocator.py
        step = _Step(self, plan)
        step.forward_bar = self._open_bar(sum(len(s.grid) for s in plan.segments), "forward")
        try:
            h: torch.Tensor | None = None if lazy else x
            for k, seg in enumerate(plan.segments):
                sink = grad_sink if k == 0 else None
                if training and seg.keep:
                    # NOTE [ Kept segments ]: a segment the plan keeps runs as plain autograd (one tile, the whole
                    # map): its graph lives from here to its own backward, and nothing is recomputed.
                    h = seg.chain(h if h is not None else read_whole())
                    if step.forward_bar is not None:
                        step.forward_bar.update(1)
                elif training:
                    h = _SegmentFunction.run(seg, step, reader, h, sink)
                else:
                    h = _run_forward(seg, reader, None, step.forward_bar)
                reader = _Reader(h, h.device, h.dtype)
        finally:
            if step.forward_bar is not None:
                step.forward_bar.close()
        assert h is not None
        return h

    def extra_repr(self) -> str:
        budget = f", memory_budget={self.memory_budget}" if self.memory_budget else ""
        return f"tile_size={self._tile_request!r}{budget}, mode={self.mode!r}"
