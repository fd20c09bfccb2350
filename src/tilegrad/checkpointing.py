"""Activation checkpointing for a sequential part of a network: keep only segment boundaries, recompute the rest.

See docs/reversible.md for when to pick checkpointing and when reversible blocks.
"""

from __future__ import annotations

import contextlib
import functools
import itertools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError
from .reversible import frozen_buffers

__all__ = ["CheckpointedSequential", "checkpoint_sequential"]


class CheckpointedSequential(nn.Module):
    """The layers of an ``nn.Sequential`` cut into ``segments`` segments, checkpointed as :func:`checkpoint_sequential`
    describes (all but the last of several; a single one).

    The layers are registered under their original names, so ``state_dict`` keys are the Sequential's own.
    """

    def __init__(self, module: nn.Sequential, segments: int) -> None:
        super().__init__()
        if not isinstance(module, nn.Sequential):
            raise ConfigError(
                f"checkpoint_sequential takes an nn.Sequential, received {type(module).__name__}; wrap the layers "
                "you want to checkpoint in nn.Sequential(...)"
            )
        n = len(module)
        if not isinstance(segments, int) or not 1 <= segments <= max(n, 1):
            raise ConfigError(
                f"segments must be an integer between 1 and the number of layers ({n}), received {segments!r}"
            )
        for name, child in module.named_children():
            self.add_module(name, child)
        self.segments = segments
        # contiguous, near-equal segments: boundaries[i] .. boundaries[i+1]
        self._bounds = [round(i * n / segments) for i in range(segments + 1)]

    def _run(self, start: int, stop: int, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.children())
        for layer in layers[start:stop]:
            x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._run(0, self._bounds[-1], x)
        bounds = self._bounds
        layers = list(self.children())
        # NOTE [ Which segments are checkpointed ]: of several segments, all but the last; backward needs the
        # last one's activations first, so recomputing it would cost a forward and save nothing. A single
        # segment is checkpointed: the module's activations are then not held while the layers after it run.
        plain_from = len(bounds) - 2 if self.segments > 1 else len(bounds) - 1
        for start, stop in itertools.pairwise(bounds[: plain_from + 1]):
            context = functools.partial(_recompute_context, nn.ModuleList(layers[start:stop]))
            x = checkpoint(self._run, start, stop, x, use_reentrant=False, context_fn=context)
        return self._run(bounds[plain_from], bounds[-1], x)

    def extra_repr(self) -> str:
        return f"segments={self.segments}"


def _recompute_context(
    layers: nn.Module,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """Forward as usual; the recomputation in backward leaves the layers' buffers as it found them.

    NOTE [ Running statistics are updated once ]: a training-mode BatchNorm updates its running statistics (and
    ``num_batches_tracked``) whenever it runs, so plain ``torch.utils.checkpoint`` updates them twice per step. The
    recomputation uses batch statistics, so restoring the buffers after it changes no value.
    """
    return contextlib.nullcontext(), frozen_buffers(layers)


def checkpoint_sequential(module: nn.Sequential, segments: int) -> CheckpointedSequential:
    """Wrap ``module`` so training keeps only segment inputs and recomputes the segments in backward.

    The layers are cut into ``segments`` contiguous segments of near-equal length. With ``segments >= 2`` every
    segment but the last is checkpointed: backward needs the last one's activations first, so recomputing it would
    cost a forward pass and save nothing (as in ``torch.utils.checkpoint.checkpoint_sequential``).
    ``segments=1`` checkpoints the whole module, keeping only its input: this saves memory when other layers run
    after it (e.g. a head), whose forward and backward then run without this module's activations.

    Uses ``torch.utils.checkpoint`` with ``use_reentrant=False`` (gradients for parameters and inputs as with plain
    backprop, works with ``torch.autograd.grad``, nesting and autocast; dropout masks are replayed). BatchNorm in
    training mode updates its running statistics once per step, as without checkpointing (plain
    ``torch.utils.checkpoint`` updates them twice: forward and recomputation). Activation memory: about the
    segment inputs plus the activations of the largest segment (``segments ~ sqrt(len(module))`` minimises it).
    The layers are shared, not copied.

    >>> import torch
    >>> from torch import nn
    >>> body = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(6)])
    >>> ckpt = checkpoint_sequential(body, segments=3)
    >>> x = torch.randn(4, 8, requires_grad=True)
    >>> torch.allclose(ckpt(x), body(x))
    True
    >>> sorted(ckpt.state_dict()) == sorted(body.state_dict())
    True
    """
    return CheckpointedSequential(module, segments)
