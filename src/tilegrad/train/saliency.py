"""Saliency: where on the slide the prediction comes from (as in the figures of Pinckaers et al., TPAMI 2020).

The saliency of a pixel is the magnitude of the gradient of the predicted class score (the logit of the target
class) with respect to that pixel of the model input, ``x.grad``. With a streamed model the gradient is computed by
the StreamingModule tile by tile, so it equals the whole-image gradient while the activations never exist for the
whole slide at once. The full-resolution map (maximum over channels of ``|x.grad|``) is reduced to a low-resolution
map by averaging blocks of pixels; that map is saved as ``.npy`` and drawn over a thumbnail of the slide as a PNG.

On a lazy slide the full-resolution gradient is never held either: the StreamingModule hands each tile's input
gradient to a :class:`SaliencyAccumulator` (a ``grad_sink``), which sums the overlapping tiles of one band of rows,
reduces every finished band to the low-resolution map and drops it. Memory: one band (about one tile high, the
slide's width, all channels) instead of the whole slide's gradient.

Attention maps (``tilegrad saliency --attention``): a model trained with ``--head attention``
(:class:`tilegrad.heads.AttentionMIL`) weighs every position of the trunk's output map; those weights (softmax over
the slide, summing to 1) are how pathologists read such models. :func:`attention_saliency` writes them at the trunk
output's resolution (one value per ``stride x stride`` slide pixels) as ``.npy`` and as a float32 ``.tiff``
(QuPath, ImageJ, napari open it; its pixel size is the slide's times the stride), and draws them over a thumbnail.
With a streamed model the trunk runs by exact tiled inference (:func:`tilegrad.infer`) into a sink that turns each
core of the trunk output into attention logits and the head's partial (NOTE [ Streamed heads ] in
tilegrad/heads.py), so the trunk's output map is never whole: memory holds one tile and the logits (one value per
position: 16 MiB for a 65536^2 slide under ResNet-34's stride 32).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DataError, GeometryError
from ..heads import AttentionMIL, normalise_attention
from .dataset import SlideInput, open_slide
from .model import SlideClassifier

__all__ = [
    "AttentionResult",
    "SaliencyAccumulator",
    "SaliencyResult",
    "attention_map",
    "attention_saliency",
    "block_mean",
    "input_gradient",
    "render_saliency",
    "saliency",
    "saliency_map",
]


def input_gradient(
    model: SlideClassifier, x: torch.Tensor | SlideInput, target: int | None = None
) -> tuple[torch.Tensor, np.ndarray, int]:
    """Gradient of the target class's logit w.r.t. the (1, C, H, W) input; returns (x.grad, probabilities, target).

    ``target`` defaults to the predicted class. The model's parameters receive no gradient. This holds the whole
    input and its gradient in memory; :func:`saliency_map` does not.

    >>> from tilegrad.train.model import build_model
    >>> m = build_model("small_cnn", 2, model_kwargs={"width": 4})
    >>> g, p, t = input_gradient(m, torch.rand(1, 3, 32, 32))
    >>> g.shape, p.shape
    (torch.Size([1, 3, 32, 32]), (2,))
    """
    if isinstance(x, SlideInput):
        x = x.materialize()
    param = next(model.parameters())
    x = x.detach().to(device=param.device, dtype=param.dtype).requires_grad_(True)
    probs, target = _backward_from_score(model, lambda: model(x), target)
    assert x.grad is not None  # backward reached the leaf input
    return x.grad, probs, target


def saliency_map(
    model: SlideClassifier, x: torch.Tensor | SlideInput, factor: int, target: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Low-resolution saliency: ``block_mean(max over channels |d score / d x|, factor)``; (map, probs, target).

    With a streamed model and a lazy slide the gradient goes tile by tile into a :class:`SaliencyAccumulator`, so
    neither the slide nor its gradient is ever whole in memory; otherwise it is :func:`input_gradient` reduced.
    """
    streamed = getattr(model, "streamed", None)
    if isinstance(x, SlideInput) and streamed is not None:
        accumulator = SaliencyAccumulator(tuple(x.shape[2:]), factor)
        probs, target = _backward_from_score(model, lambda: model(x, grad_sink=accumulator), target)
        return accumulator.finish(), probs, target
    grad, probs, target = input_gradient(model, x, target)
    return block_mean(grad[0].abs().amax(dim=0).cpu().numpy(), factor), probs, target


def _backward_from_score(model: nn.Module, run: Any, target: int | None) -> tuple[np.ndarray, int]:
    """Run ``run()`` (the logits) in eval mode with frozen parameters and backpropagate the target's logit."""
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            logits = run()
            probs = torch.softmax(logits.detach().double(), dim=1)[0].cpu().numpy()
            if target is None:
                target = int(np.argmax(probs))
            if not 0 <= target < logits.shape[1]:
                raise ConfigError(
                    f"target class {target} out of range: the model has {logits.shape[1]} classes"
                )
            logits[0, target].backward()
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    return probs, target


class SaliencyAccumulator:
    """A ``grad_sink`` (:class:`tilegrad.stream.GradientSink`) that builds the low-resolution saliency map band
    by band: ``block_mean(max over channels |grad|, factor)`` of a (1, C, H, W) input, without the full gradient.

    Tiles arrive in raster order and their row starts never decrease, so when a tile starting at row r arrives,
    every row above r has received all of its contributions: those rows (in whole blocks of ``factor``) are
    reduced and dropped.

    >>> acc = SaliencyAccumulator((4, 4), 2)
    >>> g = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> top, bottom = g[:, :, :3].clone(), g[:, :, 2:].clone()
    >>> top[:, :, 2] /= 2; bottom[:, :, 0] /= 2                 # the boxes overlap on row 2: halves add up
    >>> acc.add((slice(0, 3), slice(0, 4)), top)
    >>> acc.add((slice(2, 4), slice(0, 4)), bottom)
    >>> acc.finish()
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """

    def __init__(self, spatial: tuple[int, ...], factor: int) -> None:
        if len(spatial) != 2:
            raise ConfigError(f"saliency maps are 2D: expected (H, W), received spatial shape {spatial}")
        self.height, self.width = (int(n) for n in spatial)
        self.factor = max(1, int(factor))
        f = self.factor
        self.sums = np.zeros((-(-self.height // f), -(-self.width // f)), dtype=np.float64)
        self._band: torch.Tensor | None = None  # (C, rows, W): gradient of image rows [start, start + rows)
        self._start = 0
        self.max_band_rows = 0  # the memory actually used, in rows of the slide

    def add(self, box: tuple[slice, ...], grad: torch.Tensor) -> None:
        if grad.shape[0] != 1:
            raise ConfigError(
                f"saliency needs a batch of one image, received a gradient of shape {tuple(grad.shape)}"
            )
        rows, cols = box
        g = grad.detach()[0]
        if self._band is None:
            self._band = g.new_zeros((g.shape[0], 0, self.width))
            self._start = 0
        if rows.start < self._start:
            raise ConfigError(
                f"gradient tiles must arrive in raster order: a tile starts at row {rows.start}, above row "
                f"{self._start} which is already final"
            )
        self._flush(rows.start)
        need = rows.stop - self._start
        if need > self._band.shape[1]:
            grow = self._band.new_zeros((self._band.shape[0], need - self._band.shape[1], self.width))
            self._band = torch.cat([self._band, grow], dim=1)
        self.max_band_rows = max(self.max_band_rows, self._band.shape[1])
        self._band[:, rows.start - self._start : rows.stop - self._start, cols] += g

    def _flush(self, upto: int) -> None:
        """Reduce the final rows [start, upto) in whole blocks (all remaining rows at the bottom edge)."""
        assert self._band is not None
        f = self.factor
        if upto < self.height:
            upto = (upto // f) * f
        n = min(upto, self._start + self._band.shape[1]) - self._start
        if n <= 0:
            return
        values = self._band[:, :n].abs().amax(dim=0).double().cpu().numpy()  # (n, W)
        blocks = -(-n // f)
        padded = np.zeros((blocks * f, self.sums.shape[1] * f))
        padded[:n, : self.width] = values
        first = self._start // f
        self.sums[first : first + blocks] += padded.reshape(blocks, f, self.sums.shape[1], f).sum(axis=(1, 3))
        self._band = self._band[:, n:].clone()
        self._start += n

    def finish(self) -> np.ndarray:
        """The (ceil(H / f), ceil(W / f)) map: block means (edge blocks average the pixels they contain)."""
        if self._band is not None:
            self._flush(self.height)
        f = self.factor
        rows = np.minimum(f, self.height - np.arange(self.sums.shape[0]) * f)
        cols = np.minimum(f, self.width - np.arange(self.sums.shape[1]) * f)
        return self.sums / np.outer(rows, cols)


def block_mean(values: np.ndarray, factor: int) -> np.ndarray:
    """Average (H, W) ``values`` over ``factor x factor`` blocks (edge blocks average what they contain).

    >>> block_mean(np.arange(16.0).reshape(4, 4), 2)
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """
    if factor <= 1:
        return values.astype(np.float64)
    h, w = values.shape
    H, W = -(-h // factor), -(-w // factor)
    padded = np.zeros((H * factor, W * factor), dtype=np.float64)
    counts = np.zeros_like(padded)
    padded[:h, :w] = values
    counts[:h, :w] = 1
    s = padded.reshape(H, factor, W, factor).sum(axis=(1, 3))
    c = counts.reshape(H, factor, W, factor).sum(axis=(1, 3))
    return s / c


@dataclass
class SaliencyResult:
    png: Path
    npy: Path
    map: np.ndarray
    probabilities: np.ndarray
    target: int
    factor: int


def saliency(
    checkpoint: str | Path,
    image: str | Path,
    out_png: str | Path,
    *,
    target: int | None = None,
    level: int | None = None,
    mpp: float | None = None,
    max_side: int = 1024,
    device: str = "auto",
    tile_size: int | None = None,
    budget: str | None = None,
    overwrite: bool = False,
    trust_model_code: bool = False,
) -> SaliencyResult:
    """Compute the saliency of ``image`` under a trained checkpoint; write OUT.png and OUT.npy (low resolution).

    ``level``/``mpp`` default to the resolution the model was trained at; ``max_side`` bounds the longer side of
    the low-resolution map and thumbnail. Existing outputs are replaced only with ``overwrite``; each appears under
    its final name only when complete (written to a temporary name first). ``trust_model_code``: NOTE [ A checkpoint
    never runs code ] in models/resolve.py.
    """
    from .._atomic import atomic_write
    from .._lock import FileLock
    from .config import normalisation
    from .dataset import nonfinite_message
    from .evaluate import check_channels, check_output, check_smallest, load_trained_model

    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ConfigError(f"--max-side (max_side) must be a positive number of pixels, received {max_side!r}")
    out_png = Path(out_png)
    npy = out_png.with_suffix(".npy")
    for path in (out_png, npy):
        check_output(path, overwrite, "--overwrite (overwrite=True)")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out_png, what="saliency map"):
        model, config = load_trained_model(
            checkpoint, device=device, tile_size=tile_size, budget=budget, trust_model_code=trust_model_code
        )
        level = config.level if level is None and mpp is None else level
        mpp = config.mpp if mpp is None else mpp
        array = open_slide(image, level=level, mpp=mpp)
        check_channels(Path(image), int(model.in_channels), config)
        check_smallest(model, [], config, image=image)
        mean, std = normalisation(config)
        dtype = next(model.parameters()).dtype
        slide = SlideInput(array, mean=mean, std=std, dtype=dtype)
        factor = max(1, -(-max(slide.shape[2:]) // max_side))
        low, probs, target = saliency_map(model, slide, factor, target)
        if not (np.isfinite(probs).all() and np.isfinite(low).all()):
            what = "class scores" if not np.isfinite(probs).all() else "input gradients"
            raise DataError(nonfinite_message("", image, array, what))
        low = low.astype(np.float32)
        thumb = np.asarray(array[:, ::factor, ::factor])
        buffer = io.BytesIO()
        np.save(buffer, low)
        atomic_write(npy, buffer.getvalue())
        title = f"{Path(image).name}: P(class {target}) = {probs[target]:.3f}"
        buffer = io.BytesIO()
        render_saliency(thumb, low, buffer, title=title)
        atomic_write(out_png, buffer.getvalue())
    return SaliencyResult(out_png, npy, low, probs, target, factor)


def render_saliency(
    thumbnail: np.ndarray,
    heat: np.ndarray,
    path: Any,
    *,
    title: str = "",
    label: str = "saliency |d score / d pixel|",
    cell: tuple[float, float] = (1.0, 1.0),
    vmin: float = 0.0,
) -> Any:
    """Draw a (C, h, w) thumbnail beside the same thumbnail overlaid with the heat map (and its colour bar); save
    as PNG (``path`` is a file name or a binary file object). One heat-map value covers ``cell`` (rows, columns)
    thumbnail pixels; the colour scale runs from ``vmin`` to the 99.5th percentile."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rgb = _as_rgb(thumbnail)
    vmax = float(np.percentile(heat, 99.5)) or float(heat.max()) or 1.0
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4), constrained_layout=True)
    axes[0].imshow(rgb)
    axes[0].set_title("slide")
    axes[1].imshow(rgb)
    if cell == (1.0, 1.0):
        heat = heat[: rgb.shape[0], : rgb.shape[1]]
    extent = (-0.5, heat.shape[1] * cell[1] - 0.5, heat.shape[0] * cell[0] - 0.5, -0.5)
    shown = axes[1].imshow(heat, cmap="inferno", alpha=0.6, vmin=min(vmin, vmax), vmax=vmax, extent=extent)
    axes[1].set_xlim(-0.5, rgb.shape[1] - 0.5)
    axes[1].set_ylim(rgb.shape[0] - 0.5, -0.5)
    axes[1].set_title(label)
    fig.colorbar(shown, ax=axes[1], shrink=0.8)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path if hasattr(path, "write") else Path(path)


def attention_map(model: SlideClassifier, x: torch.Tensor | SlideInput) -> tuple[np.ndarray, np.ndarray]:
    """The attention weights of an attention-MIL model over one slide, (h, w) at the trunk output's resolution
    (they sum to 1), and the class probabilities.

    >>> from tilegrad.train.model import build_model
    >>> m = build_model("small_cnn", 2, model_kwargs={"width": 4}, head="attention")
    >>> weights, probs = attention_map(m, torch.rand(1, 3, 64, 48))
    >>> weights.shape, round(float(weights.sum()), 6), probs.shape
    ((4, 3), 1.0, (2,))
    """
    head = model.head
    if not isinstance(head, AttentionMIL):
        raise ConfigError(
            f"an attention map needs a model with an attention head (tilegrad train --head attention); this "
            f"model's head is {type(head).__name__}. Use tilegrad saliency without --attention for a gradient map"
        )
    if isinstance(x, torch.Tensor) and x.shape[0] != 1:
        raise ConfigError(
            f"attention maps are drawn for one slide at a time, received a batch of {x.shape[0]}"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if model.streamed is not None:
                logits, partials = _streamed_attention(model, head, x)
                merged = head.merge(partials)
                scores, weights = head.finish(merged), normalise_attention(logits, merged)[0, 0]
            else:  # the whole image: the head on the trunk's output map
                features = model.features(x)
                scores, weights = head(features), head.attention(features)[0, 0]
    finally:
        model.train(was_training)
    probs = torch.softmax(scores.double(), dim=1)[0].cpu().numpy()
    return weights.double().cpu().numpy(), probs


def _streamed_attention(
    model: SlideClassifier, head: AttentionMIL, x: torch.Tensor | SlideInput
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """The attention logits (1, 1, h, w) and the head's partials of every tile, with the trunk's output map never
    whole: exact tiled inference of the trunk (tilegrad.infer) hands each tile's core to :class:`_AttentionSink`,
    which keeps the core's logits and its partial (NOTE [ Streamed heads ] in tilegrad/heads.py)."""
    import copy

    from ..infer import infer

    shape = tuple(int(n) for n in x.shape)
    meta = copy.deepcopy(model.trunk).to("meta")  # the output shape, without computing anything
    dtype = next(head.parameters()).dtype
    out_shape = tuple(meta(torch.empty(shape, device="meta", dtype=dtype)).shape)
    sink = _AttentionSink(out_shape, head)
    budget = model.memory_budget
    tile = None if budget is not None else model.tile_size
    try:
        infer(model.trunk, x, tile_size=tile, memory_budget=budget, out=sink, progress=False)
    except GeometryError as err:
        raise ConfigError(
            f"the attention map runs the trunk by exact tiled inference (one segment with the whole network's "
            f"halo), for which the training tile {tile} is too small: {err}. Pass --tile or --budget to tilegrad "
            f"saliency (tile_size= or budget=)"
        ) from None
    return sink.logits, sink.partials


class _AttentionSink:
    """An ``out=`` array for tilegrad.infer of the trunk: each written core of the trunk output becomes attention
    logits (kept: 1 value per position) and a partial of the head (kept: a few numbers per tile); the features
    themselves are dropped."""

    def __init__(self, shape: tuple[int, ...], head: AttentionMIL) -> None:
        self.shape = shape
        self.dtype = None  # infer writes numpy blocks as they come
        self.head = head
        param = next(head.parameters())
        self.device, self.param_dtype = param.device, param.dtype
        self.logits = torch.zeros((shape[0], 1, *shape[2:]), dtype=self.param_dtype, device=self.device)
        self.partials: list[tuple[torch.Tensor, ...]] = []

    def __setitem__(self, key: tuple[slice, ...], block: Any) -> None:
        core = torch.as_tensor(np.ascontiguousarray(block)).to(self.device, self.param_dtype)
        if core.shape[1] != self.shape[1]:
            raise ConfigError(
                f"the attention sink takes whole channel blocks, received a block of {core.shape}"
            )
        self.logits[(key[0], slice(None), *key[2:])] = self.head.logits(core)
        self.partials.append(self.head.partial(core))


@dataclass
class AttentionResult:
    png: Path
    npy: Path
    tiff: Path
    map: np.ndarray
    probabilities: np.ndarray
    stride: tuple[float, float]  # slide pixels per attention-map value, per axis


def attention_saliency(
    checkpoint: str | Path,
    image: str | Path,
    out_png: str | Path,
    *,
    level: int | None = None,
    mpp: float | None = None,
    max_side: int = 1024,
    device: str = "auto",
    tile_size: int | None = None,
    budget: str | None = None,
    overwrite: bool = False,
    trust_model_code: bool = False,
) -> AttentionResult:
    """The attention map of an attention-MIL checkpoint over ``image``: OUT.npy and OUT.tiff (float32, one value
    per trunk-output position, summing to 1) and OUT.png (the map over a thumbnail whose longer side is at most
    ``max_side``, with a colour bar). ``level``/``mpp`` default to the training resolution; outputs as in
    :func:`saliency` (``overwrite``, each complete under its final name, ``trust_model_code``)."""
    from .._atomic import atomic_write
    from .._lock import FileLock
    from ..io import create_writer
    from ..io.tissue import thumbnail
    from .config import normalisation
    from .dataset import nonfinite_message
    from .evaluate import check_channels, check_output, load_trained_model

    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1:
        raise ConfigError(f"--max-side (max_side) must be a positive number of pixels, received {max_side!r}")
    out_png = Path(out_png)
    npy, tiff = out_png.with_suffix(".npy"), out_png.with_suffix(".tiff")
    for path in (out_png, npy, tiff):
        check_output(path, overwrite, "--overwrite (overwrite=True)")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out_png, what="attention map"):
        model, config = load_trained_model(
            checkpoint, device=device, tile_size=tile_size, budget=budget, trust_model_code=trust_model_code
        )
        if not isinstance(model.head, AttentionMIL):
            raise ConfigError(
                f"{Path(checkpoint).name} was trained with --head {config.head}: --attention needs a model trained "
                f"with --head attention (use tilegrad saliency without --attention for a gradient map)"
            )
        level = config.level if level is None and mpp is None else level
        mpp = config.mpp if mpp is None else mpp
        array = open_slide(image, level=level, mpp=mpp)
        check_channels(Path(image), int(model.in_channels), config)
        mean, std = normalisation(config)
        dtype = next(model.parameters()).dtype
        weights, probs = attention_map(model, SlideInput(array, mean=mean, std=std, dtype=dtype))
        if not (np.isfinite(probs).all() and np.isfinite(weights).all()):
            what = "class scores" if not np.isfinite(probs).all() else "attention weights"
            raise DataError(nonfinite_message("", image, array, what))
        stride = (array.shape[1] / weights.shape[0], array.shape[2] / weights.shape[1])
        values = weights.astype(np.float32)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, values)
        atomic_write(npy, buffer.getvalue())
        slide_mpp = getattr(array, "mpp", None)
        with create_writer(  # complete under its final name only at close (NOTE in io/writer.py)
            tiff,
            (1, *values.shape),
            np.float32,
            levels=1,
            overwrite=True,
            mpp=None if slide_mpp is None else float(slide_mpp) * float(np.mean(stride)),
        ) as writer:
            writer[...] = values[None]
        thumb = thumbnail(array, max_side)
        cell = (stride[0] / thumb.scale[0], stride[1] / thumb.scale[1])
        predicted = int(np.argmax(probs))
        title = f"{Path(image).name}: P(class {predicted}) = {probs[predicted]:.3f}"
        buffer = io.BytesIO()
        render_saliency(
            thumb.array,
            values,
            buffer,
            title=title,
            label="attention (softmax over the slide)",
            cell=cell,
            vmin=float(np.percentile(values, 1)),  # the weights vary around 1 / positions: show the variation
        )
        atomic_write(out_png, buffer.getvalue())
    return AttentionResult(out_png, npy, tiff, values, probs, stride)


def _as_rgb(thumbnail: np.ndarray) -> Any:
    img = np.moveaxis(np.asarray(thumbnail), 0, -1)
    if img.shape[-1] == 1:
        img = img[..., 0]
    elif img.shape[-1] > 3:
        img = img[..., :3]
    if img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = ((img - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
    return img
