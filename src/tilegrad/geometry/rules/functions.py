"""Geometry rules of functions and tensor methods as they appear in a ``torch.fx`` trace (F.conv2d, torch.cat,
x.chunk(...), x[:, :4], x.view(...), x.permute(...), ...); reducing over positions is refused with the reason.
Operations along a dim and reshapes follow NOTE [ Layouts and tile extents ] in tilegrad/geometry/layout.py."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..core import Geometry
from ..layout import (
    Extent,
    ExtentTuple,
    TileDependent,
    describe,
    dim_label,
    flatten_layout,
    is_spatial,
    regroup,
    standard,
)
from ..toolkit import (
    Context,
    Rule,
    elementwise,
    layout_aware,
    merge,
    node_arg,
    refusing,
    register_geometry_rule,
    shuffle,
    window,
)
from .modules import (
    along_channels,
    argmax,
    dropout_geometry,
    glu_geometry,
    layer_norm_geometry,
    linear_geometry,
    pad_geometry,
    softmax,
    upsample_geometry,
)

__all__: list[str] = []


def _f_conv(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    weight = node_arg(node, 1, "weight")
    meta = weight.meta.get("tensor_meta") if isinstance(weight, torch.fx.Node) else None
    meta = meta if meta is not None else ctx.meta(weight)
    kernel = tuple(meta.shape[2:]) if meta is not None else None
    if kernel is None:
        ctx.refuse("the kernel size of a functional convolution could not be read; use an nn.Conv module")
    if len(inputs) != 1:
        ctx.refuse("its weight depends on the image")
    return window(
        ctx,
        inputs[:1],
        kernel,
        node_arg(node, 3, "stride", 1),
        node_arg(node, 4, "padding", 0),
        node_arg(node, 5, "dilation", 1),
    )


def _f_pool(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    kernel = node_arg(node, 1, "kernel_size")
    stride = node_arg(node, 2, "stride", None)
    padding = node_arg(node, 3, "padding", 0)
    dilation = node_arg(node, 4, "dilation", 1) if "max" in getattr(node.target, "__name__", "") else 1
    return window(ctx, inputs, kernel, stride, padding, dilation)


def _f_interpolate(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    size = node_arg(node, 1, "size")
    if size is not None:
        read = isinstance(ctx.value(size), (Extent, ExtentTuple))
        ctx.refuse(
            "F.interpolate(size=...) fixes the output size"
            + (" (here a size read from a tensor's .shape)" if read else "")
            + ", and a tile's output would be resized to that size as a whole image is. Use scale_factor=, or "
            "stream only the part before it and run the rest on its output (for a torchvision segmentation "
            "model such as FCN or DeepLabV3: stream nn.Sequential(*model.backbone.values()), then apply "
            "model.classifier and the resize to its output)"
        )
    if any(isinstance(ctx.value(a), (Extent, ExtentTuple)) for a in node.all_input_nodes[1:]):
        ctx.refuse(
            "its scale_factor is computed from the tile's extent, which differs between a tile and the image"
        )
    return upsample_geometry(
        ctx,
        g,
        node_arg(node, 2, "scale_factor"),
        node_arg(node, 3, "mode", "nearest"),
        node_arg(node, 4, "align_corners"),
    )


_f_interpolate.tilegrad_reads_sizes = True  # type: ignore[attr-defined]


def _f_pad(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    return pad_geometry(ctx, g, node_arg(node, 1, "pad"), node_arg(node, 2, "mode", "constant"))


def _f_pixel_shuffle(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    return shuffle(ctx, g, node_arg(node, 1, "upscale_factor"))


def _channel_dim_op(index: int, name: str, default: Any) -> Rule:
    """Ops that act along a dim given as an argument (cat, chunk, split): allowed on batch/channel dims only."""

    @layout_aware
    def rule(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
        along_channels(ctx, node_arg(node, index, name, default), "it acts along")
        return merge(ctx, inputs)

    return rule


@layout_aware
def _getitem(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    source = node.args[0]
    if isinstance(source, torch.fx.Node) and source.meta.get("tilegrad_tuple"):
        return merge(ctx, inputs)  # picking one tensor out of chunk()/split()
    layout = ctx.input_layout()
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(ctx.value(i), torch.fx.Node) or isinstance(i, torch.fx.Node) for i in index):
        ctx.refuse(f"indexing with {index} selects positions with a tensor or a computed value")
    if index.count(Ellipsis) > 1:
        ctx.refuse(f"indexing with {index} has more than one Ellipsis")
    consuming = [i for i in index if i is not None and i is not Ellipsis]
    if Ellipsis in index:
        k = index.index(Ellipsis)
        fill = (slice(None),) * (len(layout) - len(consuming))
        index = index[:k] + fill + index[k + 1 :]
    out: list[Any] = []
    dim = 0
    for i in index:
        if i is None:
            out.append("C")  # a new dim of extent 1
            continue
        label = layout[dim] if dim < len(layout) else None
        dim += 1
        if label is None:
            ctx.refuse(f"indexing with {node.args[1]} has more entries than the tensor has dims")
        if is_spatial(label) and not (isinstance(i, slice) and i == slice(None)):
            ctx.refuse(
                f"indexing with {node.args[1]} selects spatial positions by absolute coordinates, which differ "
                "between a tile and the image"
            )
        if not (isinstance(i, slice) and i == slice(None)):
            ctx.mixes_batch(label, f"indexing with {node.args[1]} selects samples of the batch")
        if not isinstance(i, int):
            out.append(label)
    ctx.layout = tuple(out) + layout[dim:]
    return merge(ctx, inputs)


def _shape_entries(ctx: Context, node: torch.fx.Node, first: int, name: str) -> list[Any]:
    """The target shape of view/reshape/repeat/expand: ``x.view(a, b)``, ``x.view((a, b))``, ``shape=``."""
    entries: Any = list(node.args[first:]) or node.kwargs.get(name) or node.kwargs.get("size") or []
    if len(entries) == 1 and isinstance(entries[0], (tuple, list, torch.fx.Node)):
        value = ctx.value(entries[0])
        if isinstance(value, ExtentTuple):
            return [Extent(lab) if is_spatial(lab) else None for lab in value.labels]
        if isinstance(entries[0], (tuple, list)):
            entries = list(entries[0])
    out = []
    for e in entries:
        value = ctx.value(e)
        if isinstance(value, ExtentTuple):
            out.extend(Extent(lab) if is_spatial(lab) else None for lab in value.labels)
        else:
            out.append(value if isinstance(value, Extent) else e)
    return out


@layout_aware
def _view(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    layout = ctx.input_layout()
    entries = _shape_entries(ctx, node, 1, "shape")
    if any(
        isinstance(ctx.value(e), torch.fx.Node) for e in entries
    ):  # pragma: no cover - values are not nodes
        ctx.refuse("its shape is computed from a tensor")
    tiled = [e for e in node.all_input_nodes[1:] if isinstance(ctx.value(e), TileDependent)]
    if tiled:
        ctx.refuse(
            f"its shape is computed from the tile's extent (node '{tiled[0].name}'), which differs between a tile "
            "and the image; only batch and channel dims may be regrouped"
        )
    out_spatial = [e.label if isinstance(e, Extent) else None for e in entries]
    in_meta, out_meta = ctx.meta(node.args[0]), ctx.meta(node)
    new = None
    if [lab for lab in layout if is_spatial(lab)] == [lab for lab in out_spatial if lab is not None]:
        if in_meta is None or out_meta is None or not hasattr(out_meta, "shape"):
            ctx.refuse("tilegrad could not work out the shapes it reshapes between")
        if len(out_spatial) != len(out_meta.shape):
            ctx.refuse("tilegrad could not match its target shape to the result")
        new = regroup(layout, tuple(in_meta.shape), tuple(out_meta.shape), out_spatial)
    if new is None:
        ctx.refuse(
            f"it reshapes {describe(layout, ctx.ndim)} to {len(out_spatial)} dims with spatial dims merged, split, "
            "or given as numbers; only batch and channel dims may be regrouped (spatial sizes must be passed on "
            "as read from .shape/.size())"
        )
    ctx.layout = new
    return merge(ctx, inputs)


_view.tilegrad_reads_sizes = True  # type: ignore[attr-defined]


@layout_aware
def _flatten(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    start = node_arg(node, 1, "start_dim", 0)
    end = node_arg(node, 2, "end_dim", -1)
    new = flatten_layout(ctx.input_layout(), start, end)
    if new is None:
        ctx.refuse("flatten merges spatial positions; it belongs in the head")
    ctx.layout = new
    return merge(ctx, inputs)


@layout_aware
def _permute(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    layout = ctx.input_layout()
    dims = list(node.args[1:]) or list(node.kwargs.get("dims", ()))
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = list(dims[0])
    if sorted(d % len(layout) for d in dims if isinstance(d, int)) != list(range(len(layout))):
        ctx.refuse(f"tilegrad could not read its dims {dims}")
    ctx.layout = tuple(layout[d] for d in dims)
    return merge(ctx, inputs)


@layout_aware
def _transpose(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    layout = list(ctx.input_layout())
    a, b = node_arg(node, 1, "dim0"), node_arg(node, 2, "dim1")
    if dim_label(tuple(layout), a) is None or dim_label(tuple(layout), b) is None:
        ctx.refuse(f"tilegrad could not read its dims ({a}, {b})")
    layout[a], layout[b] = layout[b], layout[a]
    ctx.layout = tuple(layout)
    return merge(ctx, inputs)


@layout_aware
def _unsqueeze(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    layout = list(ctx.input_layout())
    dim = node_arg(node, 1, "dim")
    if not isinstance(dim, int) or not -len(layout) - 1 <= dim <= len(layout):
        ctx.refuse(f"tilegrad could not read its dim {dim}")
    layout.insert(dim if dim >= 0 else dim + len(layout) + 1, "C")
    ctx.layout = tuple(layout)
    return merge(ctx, inputs)


@layout_aware
def _squeeze(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    layout = ctx.input_layout()
    dim = node_arg(node, 1, "dim")
    if dim is None:
        ctx.refuse(
            "squeeze() without a dim would drop a spatial dim wherever a tile is 1 pixel wide; give the dim"
        )
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    labels = [dim_label(layout, d) for d in dims]
    if any(label is None or is_spatial(label) for label in labels):
        ctx.refuse(f"it squeezes dim {dim}, a spatial dim")
    meta = ctx.meta(node.args[0])
    if meta is None:
        ctx.refuse("tilegrad could not work out the shape it squeezes")
    drop = {d % len(layout) for d in dims if meta.shape[d] == 1}
    ctx.layout = tuple(label for i, label in enumerate(layout) if i not in drop)
    return merge(ctx, inputs)


@layout_aware
def _repeat(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    layout = ctx.input_layout()
    sizes = _shape_entries(ctx, node, 1, "repeats")
    if len(sizes) != len(layout) or not all(isinstance(s, int) for s in sizes):
        ctx.refuse(
            f"repeat{tuple(sizes)} does not give one whole number per dim of {describe(layout, ctx.ndim)}"
        )
    for label, s in zip(layout, sizes):
        if s != 1:
            ctx.mixes_batch(label, "it repeats the batch dim")
    if any(is_spatial(label) and s != 1 for label, s in zip(layout, sizes)):
        ctx.refuse(
            f"repeat{tuple(sizes)} repeats a spatial dim of {describe(layout, ctx.ndim)}: the copies would sit at "
            "positions that differ between a tile and the image"
        )
    return merge(ctx, inputs)


@layout_aware
def _stack(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    """torch.stack: the tensors side by side along a new dim (timm's SelectiveKernel stacks its branches on dim 1),
    local whatever the dim: each position of the result is the same position of one input."""
    layouts = ctx.layouts or [ctx.input_layout()]
    if any(layout != layouts[0] for layout in layouts):
        ctx.refuse(f"it stacks tensors of different layouts {[describe(lay, ctx.ndim) for lay in layouts]}")
    layout = list(layouts[0])
    dim = node_arg(node, 1, "dim", 0)
    if not isinstance(dim, int) or not -len(layout) - 1 <= dim <= len(layout):
        ctx.refuse(f"tilegrad could not read its dim {dim}")
    layout.insert(dim if dim >= 0 else dim + len(layout) + 1, "C")  # the new dim: which input, not where
    ctx.layout = tuple(layout)
    return merge(ctx, inputs)


def _flip(fixed: tuple[int, ...] | None = None) -> Rule:
    """``x.flip(dims)`` / ``torch.flip(x, dims)`` (``fixed``: torch.fliplr and flipud, which flip dim 1 or 0): a
    flip over batch or channel dims is local (it reorders channels at each position); a flip over a spatial dim
    mirrors positions about the middle of the tensor, which is a tile's middle, not the image's."""

    @layout_aware
    def rule(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
        layout = ctx.input_layout()
        if fixed is not None:
            dims: Any = fixed
        else:
            dims = list(node.args[1:]) or node.kwargs.get("dims")
            if isinstance(dims, list) and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        labels = [dim_label(layout, d) for d in dims]
        if any(label is None for label in labels):
            ctx.refuse(f"tilegrad could not read its dims {dims}")
        if any(is_spatial(label) for label in labels):
            ctx.refuse(
                f"it flips dims {dims} of {describe(layout, ctx.ndim)}, a spatial dim: a tile's positions would be "
                "mirrored about the tile's middle, not the image's; only batch and channel dims may be flipped"
            )
        for label in labels:
            ctx.mixes_batch(label, "it flips the batch dim")
        return merge(ctx, inputs)

    return rule


@layout_aware
def _f_layer_norm(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    shape = node_arg(node, 1, "normalized_shape")
    value = ctx.value(shape)
    if isinstance(value, ExtentTuple):  # F.layer_norm(x, x.shape[-2:])
        count = len(value.labels)
    elif isinstance(shape, (tuple, list)):
        count = len(shape)
    else:
        count = 1
    return layer_norm_geometry(ctx, inputs, count, "layer_norm")


_f_layer_norm.tilegrad_reads_sizes = True  # type: ignore[attr-defined]


@layout_aware
def _f_linear(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    if len(inputs) != 1:
        ctx.refuse("its weight depends on the image")
    return linear_geometry(ctx, inputs)


@layout_aware
def _f_glu(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    return glu_geometry(ctx, inputs, node_arg(node, 1, "dim", -1))


@layout_aware
def _f_dropout(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    name = getattr(node.target, "__name__", "dropout")
    return dropout_geometry(
        ctx, inputs, name, node_arg(node, 1, "p", 0.5), node_arg(node, 2, "training", True)
    )


def _reduction(kind: str) -> Rule:
    """mean/sum/amax/amin: local over batch or channel dims (``x.mean(1, keepdim=True)``), a statistic over the
    whole image when a spatial dim is reduced."""

    @layout_aware
    def rule(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
        layout = ctx.input_layout()
        dims = node_arg(node, 1, "dim")
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        labels = [dim_label(layout, d) for d in dims] if dims != (None,) else [None]
        if any(label is None or is_spatial(label) for label in labels):
            ctx.refuse(
                f"{kind} over positions is a statistic over the whole image: in a classifier it belongs in the "
                "head (tilegrad.split_model cuts there); inside the trunk (squeeze-and-excitation, a global "
                "context branch) stream the part before it"
            )
        for label in labels:
            ctx.mixes_batch(label, f"{kind} over the batch dim")
        if not node_arg(node, 2, "keepdim", False):
            dropped = {d % len(layout) for d in dims}
            ctx.layout = tuple(label for i, label in enumerate(layout) if i not in dropped)
        return merge(ctx, inputs)

    return rule


@layout_aware
def _stochastic_depth(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    """torchvision.ops.stochastic_depth: the identity in eval mode (EfficientNetV2, ConvNeXt)."""
    p, training = node_arg(node, 1, "p"), node_arg(node, 3, "training", True)
    if training and p:
        ctx.refuse(
            f"stochastic depth in training mode (p={p}) drops whole samples at random on every call, so "
            "overlapping tiles would drop different ones; put the model in eval mode or set p=0"
        )
    return merge(ctx, inputs)


@layout_aware
def _f_batch_norm(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    """F.batch_norm with running statistics and training=False (timm's BatchNormAct2d in eval mode, traced through:
    NOTE [ Subclasses that change what a layer computes ]) is an affine map per channel; with batch statistics it
    normalises over all positions."""
    running = (node_arg(node, 1, "running_mean"), node_arg(node, 2, "running_var"))
    if node_arg(node, 5, "training", False) or any(r is None for r in running):
        ctx.refuse(
            "batch_norm with batch statistics (training=True or no running statistics) normalises with statistics "
            "of the whole image, which a tile does not see; use nn.BatchNorm (streamed with its statistics) or put "
            "the layer in eval mode"
        )
    if len(inputs) != 1 or ctx.value(node_arg(node, 0, "input")) is None:
        ctx.refuse("its statistics or affine parameters depend on the image")
    if ctx.input_layout() != standard(ctx.ndim):
        ctx.refuse(
            f"it normalises dim 1 of {describe(ctx.input_layout(), ctx.ndim)}, which is not the channel dim"
        )
    return merge(ctx, inputs)


_ELEMENTWISE_FUNCTIONS: list[Any] = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    operator.gt, operator.lt, operator.ge, operator.le, operator.eq, operator.ne,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.square, torch.clamp, torch.maximum, torch.minimum,
    torch.where, torch.pow, operator.pow, torch.round,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh, F.hardsigmoid,
    F.sigmoid, F.tanh, F.softplus, F.prelu,
]  # fmt: skip
for _fn in _ELEMENTWISE_FUNCTIONS:
    register_geometry_rule(_fn, elementwise)
for _name in (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "exp", "abs", "sqrt", "rsqrt", "square", "square_", "clamp", "clamp_", "pow", "contiguous",
    "clone", "float", "double", "half", "bfloat16", "to", "type_as", "detach", "round", "gt", "lt", "ge", "le", "eq",
    "ne",
):  # fmt: skip
    register_geometry_rule(_name, elementwise)
for _fn in (F.conv1d, F.conv2d, F.conv3d):
    register_geometry_rule(_fn, _f_conv)
for _fn in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
    register_geometry_rule(_fn, _f_pool)
register_geometry_rule(F.interpolate, _f_interpolate)
register_geometry_rule(F.pad, _f_pad)
register_geometry_rule(F.pixel_shuffle, _f_pixel_shuffle)
register_geometry_rule(torch.pixel_shuffle, _f_pixel_shuffle)
register_geometry_rule(torch.cat, _channel_dim_op(1, "dim", 0))
register_geometry_rule(torch.concat, _channel_dim_op(1, "dim", 0))
register_geometry_rule(torch.chunk, _channel_dim_op(2, "dim", 0))
register_geometry_rule(torch.split, _channel_dim_op(2, "dim", 0))
register_geometry_rule("chunk", _channel_dim_op(2, "dim", 0))
register_geometry_rule("split", _channel_dim_op(2, "dim", 0))
register_geometry_rule(F.softmax, softmax)
register_geometry_rule(torch.argmax, argmax)
register_geometry_rule("argmax", argmax)
register_geometry_rule(F.log_softmax, softmax)
register_geometry_rule("softmax", softmax)
register_geometry_rule(operator.getitem, _getitem)
for _fn in ("view", "reshape", torch.reshape):
    register_geometry_rule(_fn, _view)
for _fn in ("flatten", torch.flatten):
    register_geometry_rule(_fn, _flatten)
for _fn in ("permute", torch.permute):
    register_geometry_rule(_fn, _permute)
for _fn in ("transpose", torch.transpose, "swapaxes", "swapdims"):
    register_geometry_rule(_fn, _transpose)
for _fn in ("unsqueeze", torch.unsqueeze):
    register_geometry_rule(_fn, _unsqueeze)
for _fn in ("squeeze", torch.squeeze):
    register_geometry_rule(_fn, _squeeze)
register_geometry_rule("repeat", _repeat)
register_geometry_rule(torch.stack, _stack)
for _fn in ("flip", torch.flip):
    register_geometry_rule(_fn, _flip())
register_geometry_rule(torch.fliplr, _flip((1,)))
register_geometry_rule(torch.flipud, _flip((0,)))
for _fn, _kind in (
    (torch.mean, "mean"), ("mean", "mean"), (torch.sum, "sum"), ("sum", "sum"),
    (torch.amax, "max"), ("amax", "max"), (torch.amin, "min"), ("amin", "min"),
):  # fmt: skip
    register_geometry_rule(_fn, _reduction(_kind))
register_geometry_rule(F.layer_norm, _f_layer_norm)
if hasattr(F, "rms_norm"):
    register_geometry_rule(F.rms_norm, _f_layer_norm)
register_geometry_rule(F.linear, _f_linear)
register_geometry_rule(F.batch_norm, _f_batch_norm)
register_geometry_rule(F.glu, _f_glu)
for _fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
    register_geometry_rule(_fn, _f_dropout)
register_geometry_rule("torchvision.ops.stochastic_depth.stochastic_depth", _stochastic_depth)
for _fn, _why in (
    (
        getattr,
        "it reads a tensor attribute tilegrad does not follow (it follows .shape, .ndim, .dtype, .device)",
    ),
    ("max", "max over positions is global; it belongs in the head"),
    (torch.max, "max over positions is global; it belongs in the head"),
    (F.adaptive_avg_pool1d, "adaptive pooling mixes the whole image; it belongs in the head"),
    (F.adaptive_avg_pool2d, "adaptive pooling mixes the whole image; it belongs in the head"),
    (F.adaptive_avg_pool3d, "adaptive pooling mixes the whole image; it belongs in the head"),
    (F.adaptive_max_pool2d, "adaptive pooling mixes the whole image; it belongs in the head"),
    (F.scaled_dot_product_attention, "attention over all positions is global"),
    (F.group_norm, "group_norm normalises over space with per-image statistics"),
    (F.instance_norm, "instance_norm normalises over space with per-image statistics"),
):
    register_geometry_rule(_fn, refusing(_why))
