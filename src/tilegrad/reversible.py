"""Reversible blocks: activation memory that does not grow with depth.

A stack of :class:`AdditiveCoupling` blocks (Gomez et al., "The reversible residual network", NIPS 2017) can
recompute each block's input from its output, so :class:`ReversibleSequential` keeps only the stack's final output
for the backward pass instead of one activation per block.

NOTE [ One Function over the whole stack ]
The whole stack runs inside a single ``torch.autograd.Function``. Its forward runs the blocks without building a
graph and saves only the final output. Its backward walks the blocks in reverse: reconstruct the block input from
the block output under ``torch.no_grad()``, recompute the block forward with grad from that reconstruction, and
backpropagate the incoming gradient with ``torch.autograd.grad`` to the block input and the block's parameters.
Parameters are inputs of the Function, so their gradients come back the ordinary way (hooks, optimisers, DDP) and
the Function can run inside another Function's backward (a ``StreamingModule`` trunk) under ``torch.enable_grad()``.

NOTE [ Statistics and randomness ]
BatchNorm in training mode updates its running statistics in the forward pass; the reconstruction and the
recomputation in backward would update them twice more, so the running buffers (and ``num_batches_tracked``) are
saved and restored around them: exactly one update per training step, as with plain backprop. Random layers
(dropout) must draw the same numbers in the reconstruction and recomputation as in the forward pass: the CPU RNG
state (and the CUDA one of the input's device when CUDA is initialised) is recorded before each call of ``f`` and
``g`` in forward and replayed later inside ``torch.random.fork_rng``, so the global random stream is not disturbed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .errors import ShapeError

__all__ = ["AdditiveCoupling", "ReversibleSequential"]


class _RngTape:
    """RNG states recorded before each ``f`` and ``g`` call of a stack (see NOTE [ Statistics and randomness ]).

    The CPU states live in one buffer allocated before the blocks run: thousands of small long-lived tensors
    interleaved with the blocks' large temporaries fragment the heap and raise the peak resident memory.
    """

    def __init__(self, slots: int, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.empty((slots, torch.get_rng_state().numel()), dtype=torch.uint8)
        self.use_cuda = device.type == "cuda" and torch.cuda.is_initialized()
        self.cuda: list[torch.Tensor | None] = [None] * slots

    def save(self, slot: int) -> None:
        self.cpu[slot].copy_(torch.get_rng_state())
        if self.use_cuda:
            self.cuda[slot] = torch.cuda.get_rng_state(self.device)

    def load(self, slot: int) -> None:
        torch.set_rng_state(self.cpu[slot].clone())  # a row view crashes set_rng_state in torch 2.14
        state = self.cuda[slot]
        if state is not None:
            torch.cuda.set_rng_state(state, self.device)


class AdditiveCoupling(nn.Module):
    """Additive coupling block: split ``x`` into halves ``x1, x2`` along ``split_dim`` and compute

    ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``, output ``cat(y1, y2)``; exactly invertible by
    ``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``.

    ``f`` and ``g`` map a tensor of half the channels to a tensor of the same shape (e.g. conv-BN-ReLU-conv with
    ``padding`` keeping the spatial size). Use it inside :class:`ReversibleSequential` to save memory; on its own it
    is an ordinary module (plain backprop).

    >>> import torch
    >>> from torch import nn
    >>> block = AdditiveCoupling(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    >>> x = torch.randn(1, 4, 8, 8)
    >>> torch.allclose(block.inverse(block(x)), x, atol=1e-5)
    True
    """

    def __init__(self, f: nn.Module, g: nn.Module, split_dim: int = 1) -> None:
        super().__init__()
        self.f = f
        self.g = g
        self.split_dim = split_dim

    def _split(self, x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.split_dim
        if not -x.dim() <= dim < x.dim():
            raise ShapeError(
                f"AdditiveCoupling splits dim {dim}, but its {what} has only {x.dim()} dims (shape "
                f"{tuple(x.shape)}); pass split_dim between {-x.dim()} and {x.dim() - 1}"
            )
        size = x.shape[dim]
        if size % 2:
            raise ShapeError(
                f"AdditiveCoupling splits dim {dim} of its {what} into two equal halves, but it has {size} "
                f"entries (shape {tuple(x.shape)}), an odd number; use an even number of channels, e.g. "
                f"{size + 1} via a 1x1 convolution before the reversible stack"
            )
        x1, x2 = torch.chunk(x, 2, dim=dim)
        return x1, x2

    def _check(self, name: str, out: torch.Tensor, like: torch.Tensor) -> None:
        if out.shape != like.shape:
            raise ShapeError(
                f"AdditiveCoupling.{name} must return a tensor shaped like its input half {tuple(like.shape)}, "
                f"but returned {tuple(out.shape)}; keep channels and spatial size (e.g. padding=kernel_size//2)"
            )

    def _run(self, fn: nn.Module, name: str, x: torch.Tensor, tape: _RngTape | None, slot: int, record: bool):
        if tape is not None:
            if record:
                tape.save(slot)
            else:
                tape.load(slot)
        out = fn(x)
        self._check(name, out, x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)

    def _forward(
        self, x: torch.Tensor, tape: _RngTape | None = None, slot: int = 0, record: bool = False
    ) -> torch.Tensor:
        """Forward; with a tape, record (``record=True``) or replay the RNG states in slots 2*slot, 2*slot + 1."""
        x1, x2 = self._split(x, "input")
        y1 = x1 + self._run(self.f, "f", x2, tape, 2 * slot, record)
        y2 = x2 + self._run(self.g, "g", y1, tape, 2 * slot + 1, record)
        return torch.cat((y1, y2), dim=self.split_dim)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The input ``x`` with ``self(x) == y`` (up to rounding)."""
        return self._inverse(y)

    def _inverse(self, y: torch.Tensor, tape: _RngTape | None = None, slot: int = 0) -> torch.Tensor:
        y1, y2 = self._split(y, "output")
        x2 = y2 - self._run(self.g, "g", y1, tape, 2 * slot + 1, False)
        x1 = y1 - self._run(self.f, "f", x2, tape, 2 * slot, False)
        return torch.cat((x1, x2), dim=self.split_dim)

    def extra_repr(self) -> str:
        return f"split_dim={self.split_dim}"


@contextmanager
def _frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Restore BatchNorm running statistics after the block (see NOTE [ Statistics and randomness ])."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    if device_type not in ("cpu", "cuda"):
        return False, None
    enabled = torch.is_autocast_enabled(device_type)
    return enabled, torch.get_autocast_dtype(device_type) if enabled else None


class _ReversibleFunction(torch.autograd.Function):
    """See NOTE [ One Function over the whole stack ]."""

    @staticmethod
    def forward(
        ctx: Any, owner: ReversibleSequential, x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.owner = owner
        ctx.params = params
        ctx.device = x.device
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = _RngTape(2 * len(owner.blocks), x.device) if owner.preserve_rng_state else None
        ctx.dtypes = []
        ctx.x_dtype = x.dtype
        y = x.detach()  # views of x made here would otherwise claim requires_grad without a grad_fn
        for k, block in enumerate(owner.blocks):
            ctx.dtypes.append(y.dtype)
            y = block._forward(y, ctx.rng, k, record=True)
        if owner.check_reconstruction is not None:
            ctx.save_for_backward(y, x)
        else:
            ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        owner: ReversibleSequential = ctx.owner
        saved = ctx.saved_tensors
        y = saved[0].detach()
        params = ctx.params
        index = {id(p): i for i, p in enumerate(params)}
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        enabled, dtype = ctx.autocast
        device = ctx.device
        devices = [device] if device.type == "cuda" and torch.cuda.is_initialized() else []
        grad = grad_out
        blocks = list(owner.blocks)
        with torch.random.fork_rng(devices=devices, enabled=ctx.rng is not None):
            for k in range(len(blocks) - 1, -1, -1):
                block = blocks[k]
                # running statistics are restored only after autograd.grad: the recomputed graph saved them
                with _frozen_running_stats(block):
                    # nullcontext when autocast is off: torch.autocast("meta") raises, and estimate_memory runs
                    # this backward on meta tensors.
                    with torch.autocast(device.type, dtype=dtype) if enabled else nullcontext():
                        with torch.no_grad():
                            x = block._inverse(y, ctx.rng, k).to(ctx.dtypes[k])
                        x = x.detach().requires_grad_(True)
                        with torch.enable_grad():
                            out = block._forward(x, ctx.rng, k)
                    block_params = [p for p in block.parameters() if p.requires_grad and id(p) in index]
                    grads = torch.autograd.grad(
                        out, [x, *block_params], grad.to(out.dtype), allow_unused=True
                    )
                    del out
                grad = grads[0]
                for p, gp in zip(block_params, grads[1:]):
                    if gp is None:
                        continue
                    i = index[id(p)]
                    param_grads[i] = gp if param_grads[i] is None else param_grads[i] + gp
                del grads
                y = x.detach()
        if owner.check_reconstruction is not None:
            owner._report_reconstruction(y, saved[1])
        if grad is not None:
            grad = grad.to(ctx.x_dtype)
        return (None, grad, *param_grads)


class ReversibleSequential(nn.Module):
    """A stack of reversible blocks trained without storing per-block activations.

    ``ReversibleSequential(*blocks)`` computes ``blocks[-1](...blocks[0](x))``. With autograd on, only the final
    output is kept; the backward pass reconstructs each block's input from its output (``block.inverse``) and
    recomputes the block, so memory is flat in the number of blocks while gradients equal plain backprop up to
    rounding. Costs: roughly one extra forward (reconstruction) plus one recomputation per block in backward. Works
    for 1D, 2D and 3D inputs, any batch size, under ``torch.autocast``, nested in other modules and inside a
    :class:`tilegrad.StreamingModule` trunk. BatchNorm running statistics are updated once per step and dropout
    replays the same masks (see NOTE [ Statistics and randomness ] in this module).

    Reconstruction drift: the reconstructed input differs from the true one by rounding, amplified through the
    stack. It stays tiny in float64/float32 for normalised blocks but can grow in deep stacks without normalisation,
    with large activations (``f``/``g`` outputs much larger than the residual stream), or in low precision
    (float16/bfloat16 autocast). Pass ``check_reconstruction=tol`` to keep the stack's input (costing one activation
    of memory), compare it with the reconstruction in every backward pass (max abs error relative to max abs of the
    input, stored in ``last_reconstruction_error``) and warn with the number when it exceeds ``tol``.

    >>> import torch
    >>> from torch import nn
    >>> def block():
    ...     return AdditiveCoupling(nn.Conv3d(4, 4, 3, padding=1), nn.Conv3d(4, 4, 3, padding=1))
    >>> stack = ReversibleSequential(block(), block(), block())
    >>> x = torch.randn(2, 8, 6, 6, 6, requires_grad=True)
    >>> stack(x).square().sum().backward()
    >>> x.grad.shape
    torch.Size([2, 8, 6, 6, 6])
    """

    def __init__(
        self,
        *blocks: AdditiveCoupling,
        check_reconstruction: float | None = None,
        preserve_rng_state: bool = True,
    ) -> None:
        super().__init__()
        for i, block in enumerate(blocks):
            if not isinstance(block, AdditiveCoupling):
                raise TypeError(
                    f"ReversibleSequential takes AdditiveCoupling blocks; block {i} is {type(block).__name__}. "
                    "Wrap a residual function as AdditiveCoupling(f, g)"
                )
        self.blocks = nn.ModuleList(blocks)
        self.check_reconstruction = check_reconstruction
        self.preserve_rng_state = preserve_rng_state
        self.last_reconstruction_error: float | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not (x.requires_grad or params):
            for block in self.blocks:
                x = block(x)
            return x
        return _ReversibleFunction.apply(self, x, *params)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The input ``x`` with ``self(x) == y`` (up to rounding); runs the blocks' inverses in reverse order."""
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y

    def _report_reconstruction(self, reconstructed: torch.Tensor, true: torch.Tensor) -> None:
        true = true.detach()
        err = (reconstructed.to(true.dtype) - true).abs().max().item()
        scale = true.abs().max().item()
        rel = err / scale if scale > 0 else err
        self.last_reconstruction_error = rel
        if self.check_reconstruction is not None and not rel <= self.check_reconstruction:  # NaN warns too
            warnings.warn(
                f"ReversibleSequential: the input reconstructed in backward differs from the true input by "
                f"{rel:.3g} (max abs error {err:.3g} relative to max abs input {scale:.3g}), above the threshold "
                f"{self.check_reconstruction:g}; gradients are inexact. Add normalisation to the blocks, use fewer "
                "blocks per stack, train in float32, or use tilegrad.checkpoint_sequential instead",
                RuntimeWarning,
                stacklevel=2,
            )

    def extra_repr(self) -> str:
        return (
            f"check_reconstruction={self.check_reconstruction}"
            if self.check_reconstruction is not None
            else ""
        )


def _reversible_geometry(ctx: Any, module: ReversibleSequential, node: Any, inputs: list) -> Any:
    """Geometry of a reversible stack: y1 depends on x1 and f(x2); y2 on x2 and g(y1)."""
    from .geometry import Geometry, _merge, compose, module_geometry

    out = _merge(ctx, inputs)
    ndim = ctx.ndim
    identity = Geometry.identity(ndim)
    for i, block in enumerate(module.blocks):
        if block.split_dim not in (1, -(ndim + 1)):
            ctx.refuse(
                f"block {i} splits dim {block.split_dim}; only the channel dim (1) can be split when streaming"
            )
        gf = module_geometry(block.f, ndim, f"{ctx.where} block {i} f")
        y1 = _merge(ctx, [identity, gf])
        gg = module_geometry(block.g, ndim, f"{ctx.where} block {i} g")
        y2 = _merge(ctx, [identity, compose(y1, gg)])
        out = compose(out, _merge(ctx, [y1, y2]))
    return out


def _register() -> None:
    from .geometry import register_geometry_rule

    register_geometry_rule(ReversibleSequential, _reversible_geometry)


_register()
