"""Exact tiled inference: run a fully convolutional model over an image or volume that does not fit in memory.

Tiles are read from the source on demand, run through the model with the halo its receptive field needs (origins
aligned to its stride, see NOTE [ Translation equivariance ] in geometry/core.py), cropped to their cores and written into
the sink. Cores are disjoint and cover the output (NOTE [ Disjoint cores ] in tiling.py), so there is no blending:
``out`` equals ``model(source)`` up to float rounding, which sliding-window inference with overlap blending does not.

NOTE [ Tile batches ]
``batch_tiles=K`` runs up to K tiles of the same input shape in one forward call, stacked along the batch axis.
Tiles of one shape are collected in grid order and a group is run as soon as it holds K tiles; the few groups of
edge tiles left at the end run as they are. Each sample of a batch is computed independently (the model is in
eval mode; train-mode BatchNorm is refused), so the output does not change, only the speed, and the planner counts
K tiles' activations at once. A model with a layer that mixes the samples of a batch (a flip, a reduction,
indexing, cat or repeat over the batch dim: local for the image, since the batch is not tiled) is refused for K > 1
by name (the trace walker marks such nodes, Context.mixes_batch in geometry/toolkit.py).

NOTE [ Resumable inference ]
With ``journal=path`` infer records, after each group of tiles has been written to ``out``, which tiles are done:
a small JSON file, replaced atomically (tilegrad/_atomic.py), at most once a second and when the run ends for any
reason (including Ctrl-C). Tiles listed there are skipped by the next call with the same journal, so an
interrupted run continues where it stopped; a tile written but not yet recorded is simply computed again. The
journal also records what the run was (model weights, source and output shapes, output dtype, the tile grid), and a
journal of a different run is refused. It survives an interrupted or killed process, not a power failure (nothing
is fsynced). A tilegrad writer opened with ``resume=True`` continues the partial files of the interrupted run and
is told (``mark_written``) which regions they already hold.

NOTE [ What a budget covers ]
``memory_budget`` bounds what the call holds at once: the parameters, the source and the output when they are
tensors in memory (a lazy source and a sink such as a tilegrad.io writer are read and written a tile's box at a
time), the tiles' working set with the convolutions' scratch (NOTE [ Inference tile memory ] in plan.py) and the
boundary stores the plan keeps on the device. The planner plans for 80% of it (``BUDGET_SAFETY``); when even the
leanest plan does not fit, it refuses before running with a MemoryBudgetError naming the smallest budget that
works. What a budget cannot cover is what PyTorch keeps once it has run a kernel in a process: the code of the
kernels, mapped from libtorch_cpu.so on first use, and oneDNN's buffers. On this machine (MONAI UNet 16-32-64, 64^3
to 128^3) the first call in a fresh process adds 29 MiB of such file pages and about 11 MiB of anonymous memory,
about 40 MiB over the warm call's peak, and later calls nothing (benchmarks/infer_memory.py); the same is paid by
any first forward of the model, tiled or not. The 20% slack covers it at budgets from about 200 MiB; below that the
first call in a process can exceed the budget by that much. So can a call after the model ran once whole in the same
process (e.g. checked on a sample): glibc keeps the heap that forward grew, measured 3-6 MiB over a clean process's
warm call at 48^3.

With a memory budget the CPU allocator is set as in NOTE [ Heap growth under a budget ] (tilegrad/_allocator.py).
It costs time on allocation-heavy models (MONAI UNet 16-32-64, 192^3 in 136^3 tiles: about 2.5 s -> 4.0 s), but
glibc's default policy makes the peak unpredictable: 310 to 448 MiB resident for 241 MiB predicted in repeated
runs of that case, and 541 to 572 MiB on a cold start, over a 512 MiB budget. Pinning only when the budget left room was tried and
broke the budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._allocator import pin_mmap_threshold
from ._atomic import atomic_write
from ._lock import FileLock
from .errors import ConfigError, DataError, NotStreamableError, ShapeError
from .execute import Reader as _Reader
from .execute import segment_runner
from .options import batch_tiles_option, budget_option, mode_option, source_option
from .plan import plan_streaming
from .tiling import Tile
from .typing import ArrayLike, Bytes

__all__ = ["infer"]


def _spatial_ndim(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(
            m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
        ):
            return m.weight.dim() - 2
    raise ShapeError(
        f"cannot tell whether {type(model).__name__} is 2D or 3D (it has no convolution); pass ndim= explicitly"
    )


class _Batched:
    """Adds a leading batch axis of 1 to a (C, *spatial) lazy array."""

    def __init__(self, source: Any):
        self.source = source
        self.shape = (1, *tuple(source.shape))

    def __getitem__(self, key: tuple) -> Any:
        return np.asarray(self.source[key[1:]])[None]


def infer(
    model: nn.Module,
    source: ArrayLike,
    *,
    tile_size: int | tuple[int, ...] | None = None,
    memory_budget: Bytes | None = None,
    out: Any = None,
    progress: bool = True,
    ndim: int | None = None,
    batch_tiles: int = 1,
    rounding: bool = False,
    journal: str | os.PathLike | None = None,
    mode: str = "lean",
    scratch_dir: str | os.PathLike | None = None,
) -> Any:
    """Run ``model`` over ``source`` tile by tile and return (or fill) the exact whole-image output.

    Args:
        model: a fully convolutional model of local layers (put it in eval mode; train-mode BatchNorm is refused).
        source: a tensor, numpy array or memmap, zarr array, or a :mod:`tilegrad.io` image, shaped
            (N, C, *spatial) or (C, *spatial).
        tile_size: input tile extent in pixels (halo included), an int or a tuple; or None with ``memory_budget``
            to take the largest tile whose predicted peak fits (NOTE [ Heap growth under a budget ]).
        memory_budget: bytes or a string such as ``"2GiB"``: what the call may hold at once, the source and output
            included when they are tensors in memory (NOTE [ What a budget covers ]). A budget no plan fits raises
            :class:`tilegrad.MemoryBudgetError` with the smallest one that does, before anything runs.
        out: None to return a tensor, or any writable array of the output's shape (numpy memmap, zarr array, a
            :func:`tilegrad.io.create_writer` sink), filled tile by tile; the same layout as ``source``.
        progress: show a progress bar over tiles.
        batch_tiles: run up to this many tiles of equal shape in one forward call (NOTE [ Tile batches ]).
        rounding: for an integer ``out``, round floating-point outputs to the nearest integer and clip them (and
            integer outputs) to the dtype's range. Without it such values are refused, never wrapped.
        journal: a file recording which tiles have been written, to resume an interrupted run
            (NOTE [ Resumable inference ]).
        mode: "lean" (default) runs one segment (the whole model's halo per tile); with ``memory_budget``,
            "auto" or "stages" let the planner cut the model into segments over its graph, as training does
            (NOTE [ Segmented inference ]).
        scratch_dir: where boundary tensors go when the plan puts them on disk.

    Returns ``out`` (or the new tensor). If interrupted, tiles already written stay written.

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1)).eval()
    >>> image = torch.randn(1, 1, 300, 200)
    >>> with torch.no_grad():
    ...     torch.allclose(infer(net, image, tile_size=64, progress=False), net(image), atol=1e-6)
    True
    """
    if tile_size is None and memory_budget is None:
        raise ConfigError("infer needs tile_size= or memory_budget= (e.g. memory_budget='2GiB')")
    batch_tiles = batch_tiles_option(batch_tiles)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise NotStreamableError(
                f"layer '{name}' ({type(m).__name__}) is in training mode: in inference it would normalise with this "
                "image's statistics and update its running statistics; call model.eval() first"
            )
    source = source_option(source, "infer")
    ndim = ndim or _spatial_ndim(model)
    shape = tuple(int(s) for s in source.shape)
    if len(shape) == ndim + 1:
        batched, reader_source = (
            False,
            (source.unsqueeze(0) if isinstance(source, torch.Tensor) else _Batched(source)),
        )
    elif len(shape) == ndim + 2:
        batched, reader_source = True, source
    else:
        raise ShapeError(
            f"expected a source of shape (C, *spatial) or (N, C, *spatial) with {ndim} spatial dims for this "
            f"{ndim}D model, received shape {shape}"
        )
    full_shape = tuple(int(s) for s in reader_source.shape)
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    dtype = params[0].dtype if params else torch.float32
    budget = budget_option(memory_budget)
    # NOTE [ Segmented inference ]: with a budget, inference takes the same segmentation as training (segments
    # over the graph, boundaries in their tiers: graph.py, plan.py), which cuts the recomputed halo of deep
    # networks; resumable journals and tile batches work on one-segment plans, so they ask for one.
    mode = mode_option(mode)
    if journal is not None or batch_tiles > 1 or budget is None:
        mode = "lean"
    plan = plan_streaming(
        model,
        full_shape,
        tile_size=tile_size if tile_size is not None else "auto",
        memory_budget=budget,
        dtype=dtype,
        mode=mode,
        input_in_memory=isinstance(source, torch.Tensor),
        training=False,
        output_in_memory=out is None,
        batch_tiles=batch_tiles,
    )
    if budget is not None:  # NOTE [ Heap growth under a budget ]: a budget is a promise; it costs time
        pin_mmap_threshold(device)
    model_out = plan.segments[-1].out_shape
    if len(model_out) != ndim + 2:
        raise ShapeError(
            f"the model returns shape {model_out} for an input of shape {full_shape}; infer needs an output "
            f"(N, C, *spatial) with {ndim} spatial dims. Keep the channel dim (e.g. x.argmax(1, keepdim=True))"
        )
    out_shape = model_out if batched else model_out[1:]
    if out is not None and tuple(out.shape) != tuple(out_shape):
        raise ShapeError(
            f"out has shape {tuple(out.shape)} but the model's output for a source of shape {shape} is "
            f"{tuple(out_shape)}: create the sink with that shape"
        )
    sink = _Sink(out, out_shape, batched, rounding)
    if len(plan.segments) > 1:
        return _infer_segments(plan, reader_source, device, dtype, sink, progress, scratch_dir)
    (segment,) = plan.segments
    tiles = list(segment.grid)
    done: _Journal | None = None
    if journal is not None:
        fingerprint = _fingerprint(model, source, out_shape, out, segment)
        done = _Journal.open(Path(journal), fingerprint, len(tiles))
        if done.count and getattr(out, "mark_written", None) is not None:
            for i in done.indices():
                out.mark_written(sink.key(tiles[i]))
    skip = done.done if done is not None else None
    reader = _Reader(reader_source, device, dtype)
    chain = segment_runner(segment)  # as the planner priced it: small-tile convolutions on oneDNN
    bar = None
    if progress and len(tiles) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tiles), initial=done.count if done else 0, desc="tilegrad infer", unit="tile")
    # one writer per journal (NOTE [ One writer per output ] in _lock.py), held until the journal's last save
    lock = FileLock(journal, what="inference journal").acquire() if journal is not None else None
    try:
        with torch.no_grad():
            for group in _groups(tiles, batch_tiles, skip):
                reads = [reader.read(tiles[i].inputs) for i in group]
                x = reads[0] if len(reads) == 1 else torch.cat(reads)
                del reads
                y = chain(x)
                del x
                n = y.shape[0] // len(group)
                for j, i in enumerate(group):
                    sink.write(tiles[i], y[j * n : (j + 1) * n])
                del y  # before the next forward: NOTE [ Tile batches ] counts one group's tiles at a time
                if done is not None:
                    done.mark(group)
                if bar is not None:
                    bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
        with lock or contextlib.nullcontext():
            if done is not None:
                done.save()
    return sink.result


def _groups(tiles: Sequence[Tile], k: int, skip: np.ndarray | None) -> Iterator[list[int]]:
    """Indices of tiles to run together: up to ``k`` of one input shape (NOTE [ Tile batches ])."""
    pending: dict[tuple[int, ...], list[int]] = {}
    for i, tile in enumerate(tiles):
        if skip is not None and skip[i]:
            continue
        group = pending.setdefault(tile.in_shape, [])
        group.append(i)
        if len(group) == k:
            yield pending.pop(tile.in_shape)
    yield from pending.values()


class _Sink:
    """Writes tile cores into ``out`` (or a new tensor), converting values to the sink's dtype without wrapping."""

    def __init__(self, out: Any, out_shape: Sequence[int], batched: bool, rounding: bool):
        self.result = out
        self.out_shape = tuple(out_shape)
        self.batched = batched
        self.rounding = rounding
        self.target: np.dtype | None = None
        if isinstance(out, torch.Tensor):
            if not out.dtype.is_floating_point and not out.dtype.is_complex:
                self.target = torch.empty((), dtype=out.dtype).numpy().dtype
        elif out is not None and getattr(out, "dtype", None) is not None:
            self.target = np.dtype(out.dtype)
        self.where = str(getattr(out, "path", None) or "out")

    def key(self, tile: Tile) -> tuple[slice, ...]:
        return (slice(None), slice(None), *tile.outputs) if self.batched else (slice(None), *tile.outputs)

    def write(self, tile: Tile, y: torch.Tensor) -> None:
        core = y[(slice(None), slice(None), *tile.crop)]
        if not self.batched:
            core = core[0]
        if self.result is None:
            self.result = torch.empty(self.out_shape, dtype=y.dtype, device=y.device)
        core = self._fit(core)
        if isinstance(self.result, torch.Tensor):
            self.result[self.key(tile)] = core.to(self.result.device)
            return
        block = core.detach().cpu()
        if block.dtype == torch.bfloat16:  # numpy has no bfloat16
            block = block.float()
        block = block.numpy()
        if self.target is not None:
            block = block.astype(self.target, copy=False)  # safe: _fit rounded/clipped integers
        self.result[self.key(tile)] = block

    def _fit(self, core: torch.Tensor) -> torch.Tensor:
        """Values for an integer (or bool) sink: never silently wrapped or truncated."""
        target = self.target
        if target is None or target.kind not in "biu" or core.dtype == torch.bool:
            return core
        lo, hi = (0, 1) if target.kind == "b" else (int(np.iinfo(target).min), int(np.iinfo(target).max))
        if core.dtype.is_floating_point:
            if not self.rounding:
                raise DataError(
                    f"{self.where} stores {target}; the model's output is {core.dtype} and casting would wrap or "
                    f"truncate values (-7.84 becomes 249 in uint8). Pass rounding=True (command line: --round) "
                    f"to round to the nearest integer and clip to [{lo}, {hi}], write a floating-point output "
                    "(--dtype float32), or end the model with the post-processing that makes integers (e.g. "
                    "labels with x.argmax(1, keepdim=True))"
                )
            return core.round().clamp(lo, hi)
        if self.rounding:
            return core.clamp(lo, hi)
        if core.numel() and (int(core.min()) < lo or int(core.max()) > hi):
            raise DataError(
                f"{self.where} stores {target} ([{lo}, {hi}]); the model returned integers from {int(core.min())} "
                f"to {int(core.max())}, which would wrap. Pass rounding=True (command line: --round) to clip "
                "them, or write a wider dtype"
            )
        return core


_JOURNAL_FAMILY = "tilegrad.infer-journal/"
_JOURNAL_FORMAT = _JOURNAL_FAMILY + "2"  # /2: greedy cores (NOTE [ Greedy cores ]) changed the grid


def _fingerprint(model: nn.Module, source: Any, out_shape: Sequence[int], out: Any, segment: Any) -> dict:
    """What must not change between an interrupted run and its resumption (NOTE [ Resumable inference ])."""
    weights = hashlib.sha256()
    for name, t in model.state_dict().items():
        weights.update(name.encode())
        weights.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    grid = hashlib.sha256(repr(segment.grid.spans).encode()).hexdigest()[:16]
    out_dtype = getattr(out, "dtype", None)
    return {
        "weights": weights.hexdigest()[:16],
        "source_shape": [int(s) for s in source.shape],
        "source": str(getattr(source, "path", "") or ""),
        "out_shape": [int(s) for s in out_shape],
        "out_dtype": None if out_dtype is None else str(out_dtype),
        "tile": [int(t) for t in segment.tile],
        "grid": grid,
    }


class _Journal:
    """Which tiles have been written (NOTE [ Resumable inference ])."""

    def __init__(self, path: Path, fingerprint: dict, n: int):
        self.path = path
        self.fingerprint = fingerprint
        self.done = np.zeros(n, dtype=bool)
        self._saved = 0.0

    @classmethod
    def open(cls, path: Path, fingerprint: dict, n: int) -> _Journal:
        journal = cls(path, fingerprint, n)
        if not path.exists():
            return journal
        unreadable = (
            f"{path} is not a readable tilegrad infer journal ({{}}); delete it (and the partial output it belongs "
            "to) to start over"
        )
        try:
            data = json.loads(path.read_text())
            fmt = data.get("format")
            if fmt == _JOURNAL_FORMAT:
                done = np.unpackbits(np.frombuffer(bytes.fromhex(data["done"]), np.uint8))[:n].astype(bool)
                theirs = data["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(unreadable.format(f"{type(err).__name__}: {err}")) from None
        if not str(fmt).startswith(_JOURNAL_FAMILY):
            raise DataError(unreadable.format(f"format {fmt!r}"))
        if fmt != _JOURNAL_FORMAT:
            raise ConfigError(
                f"{path} was written by another tilegrad version (format {fmt!r}, this one writes "
                f"{_JOURNAL_FORMAT!r}), whose tile grid differs; its tiles cannot be matched. Delete it and the "
                "partial output it belongs to and run again"
            )
        differ = [k for k in fingerprint if theirs.get(k) != fingerprint[k]]
        if differ or len(done) != n:
            hint = (
                f" (the journal's tiles are {theirs.get('tile')} px: pass that tile size)"
                if "tile" in differ
                else ""
            )
            raise ConfigError(
                f"{path} records a different run: it differs in {', '.join(differ) or 'tile count'}{hint}. Resume "
                "with the same model, weights, input, tile size and output, or delete the journal and the partial "
                "output to start over"
            )
        journal.done = done
        return journal

    @property
    def count(self) -> int:
        return int(self.done.sum())

    def indices(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.done)]

    def mark(self, indices: Sequence[int]) -> None:
        self.done[list(indices)] = True
        if time.monotonic() - self._saved >= 1.0:
            self.save()

    def save(self) -> None:
        data = {
            "format": _JOURNAL_FORMAT,
            "fingerprint": self.fingerprint,
            "tiles": int(self.done.size),
            "written": self.count,
            "done": np.packbits(self.done).tobytes().hex(),
        }
        atomic_write(self.path, json.dumps(data))
        self._saved = time.monotonic()


def journal_progress(path: str | os.PathLike) -> tuple[int, int] | None:
    """(tiles written, tiles in the run) recorded in an infer journal, or None if there is none."""
    try:
        data = json.loads(Path(path).read_text())
        return int(data["written"]), int(data["tiles"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _infer_segments(
    plan: Any,
    source: Any,
    device: torch.device,
    dtype: torch.dtype,
    sink: _Sink,
    progress: bool,
    scratch_dir: Any,
) -> Any:
    """A segmented inference plan (NOTE [ Segmented inference ]): the engine's forward, the last segment's tiles
    written into the sink."""
    from .execute import Execution

    ex = Execution(
        plan, _Reader(source, device, dtype), scratch_dir=scratch_dir, progress=progress, writer=sink.write
    )
    try:
        with torch.no_grad():
            ex.forward(training=False)
    finally:
        ex.close()
    return sink.result
