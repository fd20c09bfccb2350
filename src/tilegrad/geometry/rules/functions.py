"""Geometry rules of functions and tensor methods as they appear in a ``torch.fx`` trace (F.conv2d, torch.cat,
x.chunk(...), x[:, :4], ...); reading sizes or reducing over positions is refused with the reason."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from ..core import Geometry
from ..toolkit import (
    Context,
    Rule,
    elementwise,
    merge,
    node_arg,
    refusing,
    register_geometry_rule,
    shuffle,
    window,
)
from .modules import argmax, pad_geometry, softmax, upsample_geometry

__all__: list[str] = []


def _f_conv(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    weight = node_arg(node, 1, "weight")
    meta = weight.meta.get("tensor_meta") if isinstance(weight, torch.fx.Node) else None
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
    if node_arg(node, 1, "size") is not None:
        ctx.refuse("interpolate(size=...) resizes to a fixed size; use scale_factor")
    return upsample_geometry(
        ctx,
        g,
        node_arg(node, 2, "scale_factor"),
        node_arg(node, 3, "mode", "nearest"),
        node_arg(node, 4, "align_corners"),
    )


def _f_pad(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    return pad_geometry(ctx, g, node_arg(node, 1, "pad"), node_arg(node, 2, "mode", "constant"))


def _f_pixel_shuffle(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    return shuffle(ctx, g, node_arg(node, 1, "upscale_factor"))


def _channel_dim_op(index: int, name: str, default: Any) -> Rule:
    """Ops that act along a dim given as an argument (cat, chunk, split, softmax): allowed on batch/channel only."""

    def rule(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
        dim = node_arg(node, index, name, default)
        if dim not in (0, 1, -(ctx.ndim + 1), -(ctx.ndim + 2)):
            ctx.refuse(f"it acts along dim {dim}, a spatial dim; only batch (0) and channel (1) are allowed")
        return merge(ctx, inputs)

    return rule


def _getitem(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    source = node.args[0]
    if isinstance(source, torch.fx.Node) and source.meta.get("tilegrad_tuple"):
        return merge(ctx, inputs)  # picking one tensor out of chunk()/split()
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    spatial = index[2:] if Ellipsis not in index else ()
    if Ellipsis in index or any(not (isinstance(i, slice) and i == slice(None)) for i in spatial):
        ctx.refuse(f"indexing with {index} may select spatial positions by absolute coordinates")
    return merge(ctx, inputs)


_ELEMENTWISE_FUNCTIONS: list[Any] = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.exp, torch.abs, torch.sqrt, torch.clamp, torch.maximum, torch.minimum, torch.where, torch.pow, torch.round,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh, F.hardsigmoid,
    F.sigmoid, F.tanh, F.softplus, F.prelu, F.glu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
]  # fmt: skip
for _fn in _ELEMENTWISE_FUNCTIONS:
    register_geometry_rule(_fn, elementwise)
for _name in (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "exp", "abs", "sqrt", "clamp", "clamp_", "pow", "contiguous", "clone", "float", "double",
    "half", "bfloat16", "to", "type_as", "detach", "round",
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
for _fn, _why in (
    (torch.flatten, "flatten merges spatial positions; it belongs in the head"),
    ("flatten", "flatten merges spatial positions; it belongs in the head"),
    ("view", "view reshapes across spatial positions"),
    ("reshape", "reshape reshapes across spatial positions"),
    (torch.reshape, "reshape reshapes across spatial positions"),
    ("permute", "permute moves spatial axes"),
    ("transpose", "transpose moves spatial axes"),
    ("size", "it reads the tensor size, so the result depends on the tile's extent"),
    ("dim", "it reads the tensor rank"),
    (getattr, "it reads a tensor attribute such as .shape, which differs between a tile and the image"),
    (torch.mean, "mean over positions is global; it belongs in the head"),
    ("mean", "mean over positions is global; it belongs in the head"),
    (torch.sum, "sum over positions is global; it belongs in the head"),
    ("sum", "sum over positions is global; it belongs in the head"),
    ("max", "max over positions is global; it belongs in the head"),
    (torch.max, "max over positions is global; it belongs in the head"),
    (F.adaptive_avg_pool1d, "adaptive pooling mixes the whole image; it belongs in the head"),
    (F.adaptive_avg_pool2d, "adaptive pooling mixes the whole image; it belongs in the head"),
    (F.adaptive_avg_pool3d, "adaptive pooling mixes the whole image; it belongs in the head"),
    (F.adaptive_max_pool2d, "adaptive pooling mixes the whole image; it belongs in the head"),
    (F.linear, "linear acts on the last (spatial) axis"),
    (F.scaled_dot_product_attention, "attention mixes all positions"),
    (
        F.batch_norm,
        "functional batch_norm cannot be checked for fixed statistics; use nn.BatchNorm in eval mode",
    ),
    (F.group_norm, "group_norm normalises over space with per-image statistics"),
    (F.instance_norm, "instance_norm normalises over space with per-image statistics"),
    (F.layer_norm, "layer_norm normalises over space with per-image statistics"),
):
    register_geometry_rule(_fn, refusing(_why))
