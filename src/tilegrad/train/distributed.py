"""Data-parallel training over slides with torchrun: process group, sharding and one all-reduce per step.

``torchrun --nproc_per_node=N -m tilegrad train ...`` (or multi-node torchrun) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them and joins the process group
(gloo on CPU, nccl on GPU). Without them it returns a single-process context and nothing changes.

NOTE [ One all-reduce per optimizer step ]: every optimizer step consumes ``accumulate x world_size`` slides of one
global, seeded order. Rank r takes every world_size-th of them, runs forward/backward slide by slide (the
StreamingModule accumulates parameter gradients tile by tile locally, with no communication), and each slide's loss
is divided by the number of slides in the global step. Only after the last slide of the step are the accumulated
``.grad`` tensors summed across processes, in one flattened all-reduce. The result equals a single process running
the same slides with ``accumulate x world_size`` accumulation, up to the order of floating-point additions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["DistContext", "init_distributed", "step_shard"]


@dataclass
class DistContext:
    """Where this process sits in the run: rank, world size, device, and a count of gradient all-reduces."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    allreduce_calls: int = field(default=0, compare=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Sum ``.grad`` of ``parameters`` over all processes, in one flat all-reduce (missing grads count as 0)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        params = [p for p in parameters if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
        self.allreduce_calls += 1

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every process (identical starting points)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor, src=0)

    def gather(self, items: list[Any]) -> list[Any]:
        """Concatenate a list from every process, in rank order."""
        if not self.distributed:
            return list(items)
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group described by the environment, or return a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={world} but {', '.join(missing)} is not set: launch with torchrun "
                f"(torchrun --nproc_per_node={world} -m tilegrad train ...)"
            )
        dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def step_shard(step_indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The slides of one global optimizer step that process ``rank`` handles (every world_size-th one).

    >>> step_shard([7, 3, 5, 1, 0], rank=1, world_size=2)
    [3, 1]
    """
    return list(step_indices[rank::world_size])
