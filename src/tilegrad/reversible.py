"""Reversible blocks: activation memory that does not grow with depth.

A stack of :class:`AdditiveCoupling` blocks (Gomez et al., "The reversible residual network", NIPS 2017) can
recompute each block's input from its output, so :class:`ReversibleSequential` keeps only the stack's final output
for the backward pass instead of one activation per block.

NOTE [ One Function over the whole stack ]
The whole stack runs inside a single ``torch.autograd.Function``. Its forward runs the blocks without building a
graph and saves only the final output. Its backward walks the blocks in reverse and, per coupling block, evaluates
each branch once (not twice: reconstruction and recomputation share the evaluation):

1. ``hg = g(y1)`` with grad; ``x2 = y2 - hg`` without grad; backpropagate ``dy2`` through ``hg``: the parameter
   gradients of ``g`` and ``dy1 += dg/dy1``.
2. ``hf = f(x2)`` with grad; ``x1 = y1 - hf`` without grad; backpropagate ``dy1`` through ``hf``: the parameter
   gradients of ``f`` and ``dx2 = dy2 + df/dx2``; ``dx1 = dy1``.

Only one branch's graph exists at a time. Parameters are inputs of the Function, so their gradients come back the
ordinary way (hooks, optimisers, DDP, ``torch.autograd.grad``) and the Function can run inside another Function's
backward (a ``StreamingModule`` trunk) under ``torch.enable_grad()``, several times per step.

NOTE [ Reconstruct in place ]
The first block walked in backward writes its input and input gradient into two new buffers (the stack's output and
incoming gradient belong to the caller); every later block overwrites those buffers with its own input and input
gradient, half by half, instead of concatenating fresh tensors while the old ones are alive. A half is overwritten
only after the ``autograd.grad`` call whose graph saved a view of the buffer has run, and parameter gradients are
accumulated before any write, because autograd may return the incoming gradient itself as one (``x + p``).
Measured (peak of a step): ESPCN-RN4 57 -> 52 MiB (glibc mmap threshold fixed), the test stack of 16 blocks 15.1 ->
12.6 MiB.

NOTE [ Never free a tensor someone else may hold ]
memcnn's ``keep_input=False`` frees the storage of a block's input; when a neighbouring layer saved the same tensor
for its own backward, that layer later reads freed memory and crashes. Here nothing the caller can see is freed or
written in place (the only in-place writes go to the backward pass's own buffers, NOTE [ Reconstruct in place ]):
the saving comes from never keeping references to intermediate activations. The returned output is a fresh tensor
saved with ``save_for_backward``; if the caller modifies it in place afterwards, autograd raises its usual
"modified by an inplace operation" error instead of computing wrong gradients.

NOTE [ Statistics and randomness ]
BatchNorm in training mode updates its running statistics in the forward pass; the re-evaluation of the branches
in backward would update them again, so the buffers of every training-mode submodule of the branch (running mean
and variance, ``num_batches_tracked``, and any other buffer a layer updates in forward, e.g. InstanceNorm with
``track_running_stats``) are copied before and restored after it: exactly one update per training step, as with
plain backprop. The restore waits until ``autograd.grad`` has run, because BatchNorm's backward saved the buffers. Random layers
(dropout) must draw the same numbers in the reconstruction and recomputation as in the forward pass: the CPU RNG
state (and the CUDA one of the input's device when CUDA is initialised) is recorded before each call of ``f`` and
``g`` in forward and replayed later inside ``torch.random.fork_rng``, so the global random stream is not disturbed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ._autocast import autocast_state, replay_autocast
from .errors import ConfigError, NotInvertibleError, ShapeError, TilegradWarning
from .geometry import Context, Geometry, compose, merge, module_geometry, register_geometry_rule

__all__ = ["AdditiveCoupling", "ReconstructionWarning", "ReversibleSequential", "frozen_buffers"]


class ReconstructionWarning(TilegradWarning, RuntimeWarning):
    """A reversible stack reconstructed its input with a relative error above ``check_reconstruction``."""


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
        """The input ``x`` with ``self(x) == y`` (up to rounding), in eval and in training mode.

        NOTE [ Inverse in training mode ]: ``g`` sees the same ``y1`` and ``f`` the same ``x2`` as in the forward
        pass, so training-mode normalisation (BatchNorm with batch statistics) gives the same outputs and the
        inverse is exact; the running statistics and every other buffer are left as they were (an inverse is not
        a training step). A random layer would draw new numbers instead of the forward's: a training-mode
        dropout (p > 0) or RReLU in ``f`` or ``g`` raises :class:`tilegrad.NotInvertibleError` before anything
        runs; any other branch that draws from the global random generator raises it once it has run. Call
        ``.eval()`` first; the backward pass of :class:`ReversibleSequential` needs no inverse call, it replays the
        forward's random state itself.
        """
        _refuse_random_layers(self, "AdditiveCoupling")
        y1, y2 = self._split(y, "output")
        with frozen_buffers(self), _no_random_draws():
            x2 = y2 - self._run(self.g, "g", y1, None, 0, False)
            x1 = y1 - self._run(self.f, "f", x2, None, 0, False)
        return torch.cat((x1, x2), dim=self.split_dim)

    def _reverse(
        self,
        y: torch.Tensor,
        dy: torch.Tensor,
        tape: _RngTape | None,
        slot: int,
        dtype: torch.dtype,
        owned: bool,
        accumulate: Callable[[list[torch.Tensor], tuple[torch.Tensor | None, ...]], None],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From output ``y`` and its gradient: the input and its gradient; parameter gradients go to ``accumulate``.

        See NOTE [ One Function over the whole stack ]: each branch is evaluated once, with grad. ``owned``: ``y``
        and ``dy`` are this backward pass's own buffers, which may be overwritten (NOTE [ Reconstruct in place ]).
        """
        dim = self.split_dim
        y1, y2 = self._split(y, "output")
        dy1, dy2 = torch.chunk(dy, 2, dim=dim)
        if owned and y.dtype == dy.dtype == dtype:
            x, dx = y, dy
        else:
            x, dx = torch.empty_like(y, dtype=dtype), torch.empty_like(dy, dtype=dtype)
        x1, x2 = torch.chunk(x, 2, dim=dim)
        dx1, dx2 = torch.chunk(dx, 2, dim=dim)

        z1 = y1.detach().requires_grad_(True)
        g_params = [p for p in self.g.parameters() if p.requires_grad]
        with frozen_buffers(self.g):  # restored after autograd.grad: BatchNorm's backward saved them
            hg = self._run(self.g, "g", z1, tape, 2 * slot + 1, False)
            grads = torch.autograd.grad(hg, (z1, *g_params), dy2.to(hg.dtype), allow_unused=True)
        accumulate(g_params, grads[1:])  # before any write: a parameter gradient may alias dy2
        with torch.no_grad():  # writes after autograd.grad, whose graph saved z1, a view of y
            torch.sub(y2, hg, out=x2)
            _add_into(dx1, dy1, grads[0])
        del hg, grads, z1

        x2_in = x2.detach().requires_grad_(True)
        f_params = [p for p in self.f.parameters() if p.requires_grad]
        with frozen_buffers(self.f):
            hf = self._run(self.f, "f", x2_in, tape, 2 * slot, False)
            grads = torch.autograd.grad(hf, (x2_in, *f_params), dx1.to(hf.dtype), allow_unused=True)
        accumulate(f_params, grads[1:])
        with torch.no_grad():
            torch.sub(y1, hf, out=x1)
            _add_into(dx2, dy2, grads[0])
        return x, dx

    def extra_repr(self) -> str:
        return f"split_dim={self.split_dim}"


def _add_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> None:
    """``out = a + b`` (``b`` None: zero), where ``out`` may be ``a`` itself."""
    if b is not None:
        torch.add(a, b, out=out)
    elif out is not a:
        out.copy_(a)


@contextmanager
def frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Restore, on exit, the buffers of ``module``'s training-mode submodules (NOTE [ Statistics and randomness ]).

    >>> bn = nn.BatchNorm1d(2)
    >>> with frozen_buffers(bn):
    ...     _ = bn(torch.randn(4, 2))
    >>> int(bn.num_batches_tracked), bool(bn.running_mean.eq(0).all())
    (0, True)
    """
    saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in module.modules():
        if m.training:
            for buf in m.buffers(recurse=False):
                saved.setdefault(id(buf), (buf, buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved.values():
                buf.copy_(copy)


def _refuse_random_layers(module: nn.Module, what: str) -> None:
    """Raise NotInvertibleError naming every training-mode dropout (p > 0) or RReLU inside ``module``."""
    active = [
        f"{name} ({type(m).__name__})"
        for name, m in module.named_modules()
        if m.training
        and (isinstance(m, nn.RReLU) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0))
    ]
    if active:
        raise NotInvertibleError(
            f"{what}.inverse: random layers in training mode would draw new random numbers, not the forward "
            f"pass's, so the result would not be the input: {', '.join(active)}. Call .eval() on the model (or "
            "on these layers) before inverse()"
        )


@contextmanager
def _no_random_draws() -> Iterator[None]:
    """Raise NotInvertibleError when the body draws from the global CPU or CUDA random generator
    (NOTE [ Inverse in training mode ]): a random layer tilegrad does not know by type."""
    cuda = torch.cuda.is_initialized()
    before = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else [])
    yield
    after = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else [])
    if not (torch.equal(before[0], after[0]) and all(map(torch.equal, before[1], after[1]))):
        raise NotInvertibleError(
            "AdditiveCoupling.inverse: f or g drew random numbers, so they do not repeat the forward pass and the "
            "result is not the input; put the random layer in eval mode (or remove it) before inverse()"
        )


def _grad_buffers(params: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Zero gradient tensors shaped like ``params``: views into one buffer per (dtype, device)."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.dtype, p.device), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(params)
    for (dtype, device), members in groups.items():
        flat = torch.zeros(sum(params[i].numel() for i in members), dtype=dtype, device=device)
        offset = 0
        for i in members:
            n = params[i].numel()
            out[i] = flat[offset : offset + n].view_as(params[i])
            offset += n
    return out


class _ReversibleFunction(torch.autograd.Function):
    """See NOTE [ One Function over the whole stack ]."""

    @staticmethod
    def forward(
        ctx: Any, owner: ReversibleSequential, x: torch.Tensor, *params: torch.Tensor
    ) -> torch.Tensor:
        ctx.owner = owner
        ctx.params = params
        ctx.device = x.device
        ctx.autocast = autocast_state(x.device.type)
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
        # NOTE [ Gradient buffers first ]: one buffer per dtype/device for all parameter gradients, allocated
        # before the blocks' large temporaries: small long-lived tensors made in between fragment the heap and
        # raise the peak resident memory (measured: +20-40 MiB for ESPCN-RN8 on glibc).
        param_grads = _grad_buffers(params)
        touched = [False] * len(params)

        def accumulate(ps: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...]) -> None:
            for p, gp in zip(ps, grads):
                i = index.get(id(p))
                if gp is None or i is None:  # i None: trainable only since the forward pass, a constant there
                    continue
                param_grads[i].add_(gp)
                touched[i] = True

        device = ctx.device
        devices = [device] if device.type == "cuda" and torch.cuda.is_initialized() else []
        grad = grad_out
        blocks = list(owner.blocks)
        with (
            torch.random.fork_rng(devices=devices, enabled=ctx.rng is not None),
            torch.enable_grad(),
            replay_autocast(device.type, ctx.autocast),
        ):
            for k in range(len(blocks) - 1, -1, -1):
                # the stack's output and incoming gradient belong to the caller; later blocks reuse our buffers
                owned = k < len(blocks) - 1
                y, grad = blocks[k]._reverse(y, grad, ctx.rng, k, ctx.dtypes[k], owned, accumulate)
        if owner.check_reconstruction is not None:
            owner._report_reconstruction(y, saved[1])
        if grad is not None:
            grad = grad.to(ctx.x_dtype)
        return (None, grad, *(g if t else None for g, t in zip(param_grads, touched)))


class ReversibleSequential(nn.Module):
    """A stack of reversible blocks trained without storing per-block activations.

    ``ReversibleSequential(*blocks)`` computes ``blocks[-1](...blocks[0](x))``. With autograd on, only the final
    output is kept; the backward pass reconstructs each block's input from its output while it computes the
    gradients, so memory is flat in the number of blocks while gradients equal plain backprop up to rounding.
    Cost: one extra forward evaluation of every branch in backward (the reconstruction and the recomputation share
    it; see NOTE [ One Function over the whole stack ]). Works for 1D, 2D and 3D inputs, any batch size, under
    ``torch.autocast``, nested in other modules, called several times per step and inside a
    :class:`tilegrad.StreamingModule` trunk. BatchNorm running statistics are updated once per step and dropout
    replays the same masks (see NOTE [ Statistics and randomness ] in this module).

    ``memory_saving=False`` runs the same blocks with plain backprop (every activation stored): the "naive" variant
    of Blumberg et al. 2018, with the same parameters and ``state_dict`` keys, to compare memory or to debug.

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
        memory_saving: bool = True,
    ) -> None:
        super().__init__()
        for i, block in enumerate(blocks):
            if not isinstance(block, AdditiveCoupling):
                raise NotInvertibleError(
                    f"ReversibleSequential takes AdditiveCoupling blocks; block {i} is {type(block).__name__}. "
                    "Wrap a residual function as AdditiveCoupling(f, g); put layers without an inverse outside "
                    "the stack, or use tilegrad.checkpoint_sequential for them"
                )
        if check_reconstruction is not None and not check_reconstruction > 0:
            raise ConfigError(
                f"check_reconstruction is a relative-error threshold > 0 such as 1e-3, received "
                f"{check_reconstruction!r}"
            )
        self.blocks = nn.ModuleList(blocks)
        self.memory_saving = memory_saving
        self.check_reconstruction = check_reconstruction
        self.preserve_rng_state = preserve_rng_state
        self.last_reconstruction_error: float | None = None

    def __len__(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for p in self.parameters() if p.requires_grad]
        if not self.memory_saving or not torch.is_grad_enabled() or not (x.requires_grad or params):
            for block in self.blocks:
                x = block(x)
            return x
        return _ReversibleFunction.apply(self, x, *params)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The input ``x`` with ``self(x) == y`` (up to rounding); runs the blocks' inverses in reverse order.

        Training mode: as :meth:`AdditiveCoupling.inverse` (buffers untouched; random layers refused).
        """
        _refuse_random_layers(self, "ReversibleSequential")
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
                ReconstructionWarning,
                stacklevel=2,
            )

    def extra_repr(self) -> str:
        parts = [] if self.memory_saving else ["memory_saving=False"]
        if self.check_reconstruction is not None:
            parts.append(f"check_reconstruction={self.check_reconstruction}")
        return ", ".join(parts)


def _reversible_geometry(
    ctx: Context, module: ReversibleSequential, node: Any, inputs: list[Geometry]
) -> Geometry:
    """Geometry of a reversible stack: y1 depends on x1 and f(x2); y2 on x2 and g(y1)."""
    out = merge(ctx, inputs)
    ndim = ctx.ndim
    identity = Geometry.identity(ndim)
    for i, block in enumerate(module.blocks):
        if block.split_dim not in (1, -(ndim + 1)):
            ctx.refuse(
                f"block {i} splits dim {block.split_dim}; only the channel dim (1) can be split when streaming"
            )
        gf = module_geometry(block.f, ndim, f"{ctx.where} block {i} f")
        y1 = merge(ctx, [identity, gf])
        gg = module_geometry(block.g, ndim, f"{ctx.where} block {i} g")
        y2 = merge(ctx, [identity, compose(y1, gg)])
        out = compose(out, merge(ctx, [y1, y2]))
    return out


register_geometry_rule(ReversibleSequential, _reversible_geometry)
