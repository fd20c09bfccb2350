"""Activation checkpointing for a sequential part of a network: keep only segment boundaries, recompute the rest.

See docs/reversible.md for when to pick checkpointing and when reversible blocks.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import TilegradError

__all__ = ["CheckpointedSequential", "checkpoint_sequential"]


class CheckpointedSequential(nn.Module):
    """The layers of an ``nn.Sequential`` run in ``segments`` checkpointed segments (see :func:`checkpoint_sequential`).

    The layers are registered under their original names, so ``state_dict`` keys are the Sequential's own.
    """

    def __init__(self, module: nn.Sequential, segments: int) -> None:
        super().__init__()
        if not isinstance(module, nn.Sequential):
            raise TypeError(
                f"checkpoint_sequential takes an nn.Sequential, received {type(module).__name__}; wrap the layers "
                "you want to checkpoint in nn.Sequential(...)"
            )
        n = len(module)
        if not isinstance(segments, int) or not 1 <= segments <= max(n, 1):
            raise TilegradError(
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
        for start, stop in itertools.pairwise(bounds[:-1]):  # every segment but the last is recomputed
            x = checkpoint(self._run, start, stop, x, use_reentrant=False)
        return self._run(bounds[-2], bounds[-1], x)  # the last segment's activations are needed right away

    def extra_repr(self) -> str:
        return f"segments={self.segments}"


def checkpoint_sequential(module: nn.Sequential, segments: int) -> CheckpointedSequential:
    """Wrap ``module`` so training keeps only the inputs of ``segments`` segments and recomputes each in backward.

    Uses ``torch.utils.checkpoint`` with ``use_reentrant=False`` (gradients for parameters and inputs as with plain
    backprop, works with ``torch.autograd.grad``, nesting and autocast; dropout masks are replayed). BatchNorm in
    training mode still updates its running statistics twice per step (forward and recomputation) -- as with
    ``torch.utils.checkpoint`` itself; use :class:`tilegrad.ReversibleSequential` or freeze BatchNorm when that
    matters. Activation memory: about the segment inputs plus the activations of the largest segment
    (``segments ~ sqrt(len(module))`` minimises it). The layers are shared, not copied.

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
