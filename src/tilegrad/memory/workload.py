"""The workload that :func:`tilegrad.estimate_memory` simulates and that the accuracy checks measure: one code path.

A *training step* is: make the input batch, forward, ``loss_fn(output)``, ``loss.backward()``, ``optimizer.step()``,
``optimizer.zero_grad(set_to_none=True)``, drop the batch and the output. :func:`run_steps` runs it ``steps`` times
(the second step is the steady state: optimizer state from the first is alive). An *inference pass* is one forward
under ``torch.no_grad()``. The estimator calls :func:`run_steps` on meta tensors; :func:`measure_workload` calls it
on real tensors and measures the peak; :func:`measure_workload_subprocess` does so in a fresh Python process.

Measurement protocol (``measure_workload``): the whole workload (build the model, ``steps`` steps) runs once to warm
up lazy one-time state (oneDNN kernels and primitive caches, thread pools: tens of MB that a training loop pays
once, not per step), then runs again from scratch inside :func:`tilegrad.measure_peak_memory`. The measured peak
therefore includes parameters, buffers, input, gradients and optimizer state, like ``MemoryReport.peak_bytes``.

NOTE [ Allocator policy for CPU measurements ]
On CPU the measurement reads the process's resident high-water mark. With glibc's default *dynamic* mmap threshold,
big blocks freed during forward stay resident in the heap and are reused imperfectly, so the high-water mark adds
fragmentation on top of live tensors (typically +10-25% here). ``measure_workload_subprocess`` therefore sets
``MALLOC_MMAP_THRESHOLD_`` (64 KiB by default), which fixes the threshold: every block above it is its own mapping and
is returned to the kernel when freed, so the resident set follows live tensor bytes, the CPU analogue of CUDA's
``max_memory_allocated``. Pass ``mmap_threshold=None`` to measure under the default policy instead.

NOTE [ Resident pages of a measurement ]
The resident high-water mark counts what the kernel keeps resident, not what the workload allocates. Once in CI the
measured peak of ResNet-34 at 2x3x128^2 came out at 114 MB, where this machine measures 275.3-275.9 MB with 1, 2 or
3 threads and the estimate is 275.5 MB: less than the 175 MB its parameters and their gradients hold at once after
the backward, so the measurement itself had lost memory. What can lose it: pages of the measuring process in swap
(CI runners have swap; this machine has none, so it was not reproduced), or memory freed by the warm-up run kept by
the allocator and reused unseen (a caching allocator preloaded in place of glibc's, on which
``MALLOC_MMAP_THRESHOLD_`` has no effect). So the child reports its swap (VmSwap before and after the measured run)
and a floor no real run can go under (the bytes of the parameters, and in training of their gradients too), and a
measurement below its floor or during which pages of the process went to swap (VmSwap grew; pages in swap all along
do not hide the measured run's peak) is taken again, and refused with that reason if it
happens twice: a comparison with the estimate is only made on a measurement that saw the workload.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..dtypes import parse_dtype
from ..errors import ConfigError, TilegradError
from ..optim import OPTIMIZERS, make_optimizer

__all__ = [
    "OptimizerSpec",
    "disturbed",
    "measure_workload",
    "measure_workload_subprocess",
    "optimizer_factory",
    "run_steps",
]

OptimizerSpec = str | Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None
"""None (gradients only), a name from tilegrad.optim.OPTIMIZERS, or a callable ``params -> Optimizer``."""


def optimizer_factory(spec: OptimizerSpec) -> tuple[Callable[[list[torch.Tensor]], Any] | None, str | None]:
    """``(params -> optimizer, its name)`` for an optimizer spec; ``(None, None)`` for None.

    Named optimizers loop over parameters (``foreach=False``), as PyTorch does on CPU. On CUDA it defaults to
    foreach, whose temporaries span all parameters at once; pass a callable such as
    ``lambda p: torch.optim.Adam(p, foreach=True)`` for that.
    """
    if spec is None:
        return None, None
    if isinstance(spec, str):
        key = spec.lower()
        if key not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {spec!r}: expected None, one of {', '.join(sorted(OPTIMIZERS))}, or a "
                "callable taking a list of parameters and returning a torch.optim.Optimizer"
            )
        return (lambda params: make_optimizer(key, params, foreach=False)), key
    if callable(spec):
        return spec, getattr(spec, "__name__", type(spec).__name__)
    raise ConfigError(f"expected optimizer None, a name or a callable, received {spec!r}")


def run_steps(
    forward: Callable[[torch.Tensor], Any],
    make_input: Callable[[], torch.Tensor],
    *,
    train: bool,
    optimizer: torch.optim.Optimizer | None,
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[Any], torch.Tensor],
    steps: int,
    on_phase: Callable[[str, int], None] = lambda phase, step: None,
) -> dict[str, Any]:
    """Run the workload ``steps`` times; ``on_phase(name, step)`` is called as each phase starts.

    Returns shapes and sizes seen on the last step: ``input_bytes`` and ``output`` (a list of output tensors' byte
    sizes).
    """
    seen: dict[str, Any] = {}
    for step in range(steps):
        on_phase("input", step)
        x = make_input()
        on_phase("forward", step)
        with torch.enable_grad() if train else torch.no_grad():
            output = forward(x)
        on_phase("after forward", step)
        seen["input_bytes"] = x.numel() * x.element_size()
        seen["output"] = output
        if train:
            on_phase("loss", step)
            loss = loss_fn(output)
            on_phase("backward", step)
            loss.backward()
            del loss
            if optimizer is not None:
                on_phase("optimizer step", step)
                optimizer.step()
                on_phase("zero_grad", step)
                optimizer.zero_grad(set_to_none=True)
            else:
                for p in params:
                    p.grad = None
        on_phase("end of step", step)
        del output, x
        seen.pop("output")
    return seen


def default_loss(output: Any) -> torch.Tensor:
    """Sum of every floating output that requires grad (what ``estimate_memory`` uses unless told otherwise)."""
    from torch.utils._pytree import tree_flatten

    parts = [
        t.sum()
        for t in tree_flatten(output)[0]
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad
    ]
    if not parts:
        raise TilegradError(
            "mode='train' needs a model output that requires grad; the model's floating outputs do not "
            "(are all parameters frozen?). Use mode='infer' for a forward pass only."
        )
    loss = parts[0]
    for part in parts[1:]:
        loss = loss + part
    return loss


def _workload_once(
    factory: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    mode: str,
    dtype: torch.dtype,
    optimizer: str | None,
    steps: int,
) -> None:
    make, _ = optimizer_factory(optimizer)
    model = factory().to(dtype)
    train = mode == "train"
    if not train:
        model.eval()
    params = [p for p in model.parameters() if p.requires_grad] if train else []
    opt = make(params) if (train and make is not None and params) else None
    run_steps(
        model,
        lambda: torch.randn(input_shape, dtype=dtype),
        train=train,
        optimizer=opt,
        params=params,
        loss_fn=default_loss,
        steps=steps if train else 1,
    )


def measure_workload(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    *,
    mode: str = "train",
    dtype: torch.dtype = torch.float32,
    optimizer: str | None = None,
    steps: int = 2,
    warmup: bool = True,
) -> int:
    """Measure the real peak bytes of the workload in this process (see the module docstring for the protocol).

    The model comes from ``factory()`` inside the measurement, so parameters count towards the peak. ``mode="infer"``
    puts it in eval mode; in ``"train"`` its flags stay as the factory made them (like ``estimate_memory``).
    """
    from .measure import measure_peak_memory

    shape = tuple(int(s) for s in input_shape)
    if warmup:
        _workload_once(factory, shape, mode, dtype, optimizer, steps)
    return measure_peak_memory(_workload_once, factory, shape, mode, dtype, optimizer, steps)


def measure_workload_subprocess(
    model: str,
    input_shape: Sequence[int],
    *,
    mode: str = "train",
    dtype: str = "float32",
    optimizer: str | None = None,
    steps: int = 2,
    threads: int | None = None,
    mmap_threshold: int | None = 65536,
    warmup: bool = True,
    timeout: float | None = None,
) -> int:
    """Run :func:`measure_workload` in a fresh Python process and return its peak bytes.

    ``model`` is a model spec as the ``tilegrad memory`` command takes it (see :func:`tilegrad.models.resolve.
    resolve_model`). The child imports this same tilegrad (its ``src`` directory goes first on ``PYTHONPATH``), uses
    ``threads`` CPU threads (default: this process's ``torch.get_num_threads()``, which also steers the CPU
    convolution kernel choice that ``estimate_memory`` follows) and the allocator policy of
    NOTE [ Allocator policy for CPU measurements ]. ``warmup=False`` skips the warm-up run, for workloads so large
    that the one-time tens of MB do not matter and a second run is costly.
    """
    threads = torch.get_num_threads() if threads is None else int(threads)
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the directory holding this tilegrad package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = str(threads)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    request = {
        "model": model,
        "input_shape": list(input_shape),
        "mode": mode,
        "dtype": dtype,
        "optimizer": optimizer,
        "steps": steps,
        "threads": threads,
        "warmup": warmup,
    }
    why = ""
    for _ in range(2):  # NOTE [ Resident pages of a measurement ]: once more when the first was disturbed
        proc = subprocess.run(
            [sys.executable, "-m", "tilegrad.memory.workload", json.dumps(request)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise TilegradError(
                f"measuring {model} at {tuple(input_shape)} in a subprocess failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        why = disturbed(result)
        if not why:
            return int(result["peak_bytes"])
    raise TilegradError(
        f"measuring {model} at {tuple(input_shape)} in a subprocess was disturbed twice: {why}; its resident "
        "high-water mark is not the workload's peak. Measure again with more free memory (or without swap)"
    )


def disturbed(result: dict[str, Any]) -> str:
    """Why a child's measurement does not show the workload's peak (NOTE [ Resident pages of a measurement ]), or
    "" when nothing disturbed it."""
    # pages that sat in swap before the measured run (a machine with swap, CI's) do not hide its peak; pages moved
    # out during it do
    swapped = int(result.get("swap_after", 0)) - int(result.get("swap_before", 0))
    if swapped > 0:
        return f"{swapped / 2**20:.1f} MiB of the measuring process went to swap while it was measured"
    peak, floor = int(result["peak_bytes"]), int(result.get("floor_bytes", 0))
    if peak < floor:
        return (
            f"the measured peak, {peak / 2**20:.1f} MiB, is below the {floor / 2**20:.1f} MiB that the parameters "
            "(and in training their gradients) hold at once: memory was reused unseen (freed before the measured "
            "run and kept by the allocator) or moved out by the kernel"
        )
    return ""


def _swap_bytes() -> int:
    """This process's pages in swap (VmSwap), 0 where it cannot be read."""
    try:
        found = re.search(r"^VmSwap:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return 0
    return int(found.group(1)) * 1024 if found else 0


def _floor_bytes(factory: Callable[[], nn.Module], mode: str, dtype: torch.dtype) -> int:
    """Bytes the workload surely holds at once: its parameters, and in training their gradients (after backward)."""
    with torch.device("meta"):
        model = factory().to(dtype)
    # lazy layers (nn.LazyConv2d) have no size until their first call: left out of the floor, which stays a floor
    params = [p for p in model.parameters() if not isinstance(p, nn.parameter.UninitializedParameter)]
    total = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad) if mode == "train" else 0
    return total + grads


def _child(request: dict[str, Any]) -> dict[str, Any]:
    from ..models.resolve import resolve_model

    torch.set_num_threads(int(request.get("threads", 1)))
    factory, _ = resolve_model(request["model"])
    shape = [int(s) for s in request["input_shape"]]
    mode, dtype = request["mode"], parse_dtype(request["dtype"])
    optimizer, steps = request["optimizer"], int(request["steps"])
    if bool(request.get("warmup", True)):
        _workload_once(factory, tuple(shape), mode, dtype, optimizer, steps)
    before = _swap_bytes()  # NOTE [ Resident pages of a measurement ]
    peak = measure_workload(
        factory, shape, mode=mode, dtype=dtype, optimizer=optimizer, steps=steps, warmup=False
    )
    return {
        "peak_bytes": peak,
        "floor_bytes": _floor_bytes(factory, mode, dtype),
        "swap_before": before,
        "swap_after": _swap_bytes(),
    }


if __name__ == "__main__":  # pragma: no cover - exercised through measure_workload_subprocess
    print(json.dumps(_child(json.loads(sys.argv[1]))))
