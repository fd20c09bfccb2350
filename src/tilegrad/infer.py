"""Exact tiled inference: run a fully convolutional model over an image or volume that does not fit in memory.

Tiles are read from the source on demand, run through the model with the halo its receptive field needs (origins
aligned to its stride, see NOTE [ Translation equivariance ] in geometry.py), cropped to their cores and written into
the sink. Cores are disjoint and cover the output (NOTE [ Disjoint cores ] in tiling.py), so there is no blending:
``out`` equals ``model(source)`` up to float rounding, which sliding-window inference with overlap blending does not.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ShapeError
from .plan import plan_streaming
from .stream import _Reader
from .typing import ArrayLike, Bytes
from .units import parse_bytes

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
) -> Any:
    """Run ``model`` over ``source`` tile by tile and return (or fill) the exact whole-image output.

    Args:
        model: a fully convolutional model of local layers (put it in eval mode; train-mode BatchNorm is refused).
        source: a tensor, numpy array or memmap, zarr array, or a :mod:`tilegrad.io` image, shaped
            (N, C, *spatial) or (C, *spatial).
        tile_size: input tile extent in pixels (halo included), an int or a tuple; or None with ``memory_budget``
            to take the largest tile whose predicted forward peak fits.
        out: None to return a tensor, or any writable array of the output's shape (numpy memmap, zarr array, a
            :func:`tilegrad.io.create_writer` sink), filled tile by tile; the same layout as ``source``.
        progress: show a progress bar over tiles.

    Returns ``out`` (or the new tensor). If interrupted, tiles already written stay written.

    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1)).eval()
    >>> image = torch.randn(1, 1, 300, 200)
    >>> with torch.no_grad():
    ...     torch.allclose(infer(net, image, tile_size=64, progress=False), net(image), atol=1e-6)
    True
    """
    if tile_size is None and memory_budget is None:
        raise ShapeError("infer needs tile_size= or memory_budget= (e.g. memory_budget='2GiB')")
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
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    plan = plan_streaming(
        model,
        full_shape,
        tile_size=tile_size if tile_size is not None else "auto",
        memory_budget=budget,
        dtype=dtype,
        mode="lean",
        input_in_memory=isinstance(source, torch.Tensor),
        training=False,
        output_in_memory=out is None,
    )
    (segment,) = plan.segments
    out_shape = segment.out_shape if batched else segment.out_shape[1:]
    if out is not None and tuple(out.shape) != tuple(out_shape):
        raise ShapeError(
            f"out has shape {tuple(out.shape)} but the model's output for a source of shape {shape} is "
            f"{tuple(out_shape)}: create the sink with that shape"
        )
    result = out
    reader = _Reader(reader_source, device, dtype)
    chain = segment.chain
    bar = None
    if progress and len(segment.grid) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(segment.grid), desc="tilegrad infer", unit="tile")
    try:
        with torch.no_grad():
            for tile in segment.grid:
                y = chain(reader.read(tile.inputs))
                core = y[(slice(None), slice(None), *tile.crop)]
                if result is None:
                    result = torch.empty(out_shape, dtype=y.dtype, device=y.device)
                if batched:
                    key = (slice(None), slice(None), *tile.outputs)
                else:
                    key, core = (slice(None), *tile.outputs), core[0]
                if isinstance(result, torch.Tensor):
                    result[key] = core.to(result.device)
                else:
                    block = core.detach().cpu().numpy()
                    dtype_out = getattr(result, "dtype", None)
                    result[key] = block.astype(dtype_out, copy=False) if dtype_out is not None else block
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return result
