"""Geometry rules of torch.nn layers: convolutions, pooling, resampling, padding, normalisation, activations.

Layers that mix positions (global pooling, Linear over space, attention, train-mode statistics) get a rule that
refuses them with the reason (NOTE [ Translation equivariance ] in tilegrad/geometry/core.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import torch.fx
from torch import nn

from ..core import Geometry
from ..toolkit import (
    Context,
    elementwise,
    merge,
    node_arg,
    pixel_shuffle,
    refusing,
    register_geometry_rule,
    window,
)

__all__ = ["ACTIVATIONS", "argmax", "pad_geometry", "softmax", "upsample_geometry"]


def _conv(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    if m.weight.dim() - 2 != ctx.ndim:
        ctx.refuse(f"it is a {m.weight.dim() - 2}D convolution but the input has {ctx.ndim} spatial dims")
    if m.padding_mode == "circular":
        ctx.refuse("circular padding wraps around the image border; use zeros, reflect or replicate")
    return window(ctx, inputs, m.kernel_size, m.stride, m.padding, m.dilation)


def _conv_transpose(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    if m.weight.dim() - 2 != ctx.ndim:
        ctx.refuse(f"it is a {m.weight.dim() - 2}D convolution but the input has {ctx.ndim} spatial dims")
    k, s, p, d = (
        ctx.tup(v, n) for v, n in ((m.kernel_size, "k"), (m.stride, "s"), (m.padding, "p"), (m.dilation, "d"))
    )
    # output o receives input i when o = i*s - p + d*m, 0 <= m < k: i in [(o + p - d(k-1))/s, (o + p)/s]
    return ctx.op(
        g,
        [Fraction(1, si) for si in s],
        [Fraction(pi - di * (ki - 1), si) for ki, si, pi, di in zip(k, s, p, d)],
        [Fraction(pi, si) for si, pi in zip(s, p)],
    )


def _pool(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    dilation = getattr(m, "dilation", 1)
    return window(ctx, inputs, m.kernel_size, m.stride, getattr(m, "padding", 0), dilation)


def upsample_geometry(ctx: Context, g: Geometry, scale: Any, mode: str, align_corners: Any) -> Geometry:
    if scale is None:
        ctx.refuse("it resizes to a fixed size; use scale_factor so tiles and the whole image agree")
    scales = ctx.tup(scale if not isinstance(scale, float) else (scale,), "scale_factor")
    if any(float(sc) != int(sc) or sc < 1 for sc in scales):
        ctx.refuse(
            f"scale_factor {scale} is not a positive integer, so tiles would not map onto whole pixels"
        )
    scales = tuple(int(sc) for sc in scales)
    if align_corners:
        ctx.refuse(
            "align_corners=True samples positions that depend on the image size; use align_corners=False"
        )
    if mode in ("nearest", "nearest-exact"):
        # nearest: o <- floor(o/s); nearest-exact: o <- floor((o+0.5)/s)
        lo = [Fraction(-(sc - 1), sc) if mode == "nearest" else Fraction(-sc, sc) for sc in scales]
        hi = [Fraction(0) if mode == "nearest" else Fraction(1, 2) for sc in scales]
    elif mode in ("linear", "bilinear", "trilinear", "bicubic"):
        reach = 2 if mode == "bicubic" else 1
        # source position (o + 0.5)/s - 0.5; taps floor(src) - reach + 1 ... floor(src) + reach (clamped at borders)
        lo = [Fraction(1, 2 * sc) - Fraction(1, 2) - reach for sc in scales]
        hi = [Fraction(1, 2 * sc) - Fraction(1, 2) + reach for sc in scales]
    else:
        ctx.refuse(f"interpolation mode {mode!r} is not supported for streaming")
    return ctx.op(g, [Fraction(1, sc) for sc in scales], lo, hi)


def _upsample(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    return upsample_geometry(ctx, g, m.scale_factor, m.mode, getattr(m, "align_corners", None))


def _pixel_unshuffle(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    r = m.downscale_factor
    return ctx.op(g, [r] * ctx.ndim, [0] * ctx.ndim, [r - 1] * ctx.ndim)


def pad_geometry(ctx: Context, g: Geometry, pad: Sequence[int], mode: str) -> Geometry:
    if mode == "circular":
        ctx.refuse("circular padding wraps around the image border")
    pad = list(pad)
    if len(pad) > 2 * ctx.ndim:
        ctx.refuse(f"it pads {len(pad) // 2} dims but only the {ctx.ndim} spatial dims may be padded")
    pad += [0] * (2 * ctx.ndim - len(pad))
    # torch lists pads from the last dim backwards: (left_W, right_W, left_H, right_H, ...)
    lefts = [pad[2 * (ctx.ndim - 1 - i)] for i in range(ctx.ndim)]
    rights = [pad[2 * (ctx.ndim - 1 - i) + 1] for i in range(ctx.ndim)]
    # padded index o reads input o - left; reflect/replicate near the border read up to max(pad) px further in.
    reach = [max(a, b) if mode != "constant" else 0 for a, b in zip(lefts, rights)]
    return ctx.op(
        g,
        [1] * ctx.ndim,
        [-left - r for left, r in zip(lefts, reach)],
        [-left + r for left, r in zip(lefts, reach)],
    )


def _pad_module(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    mode = {
        nn.modules.padding._ReflectionPadNd: "reflect",
        nn.modules.padding._ReplicationPadNd: "replicate",
    }
    kind = "constant"
    for base, name in mode.items():
        if isinstance(m, base):
            kind = name
    if isinstance(m, getattr(nn.modules.padding, "_CircularPadNd", ())):
        kind = "circular"
    return pad_geometry(ctx, g, m.padding, kind)


def _norm(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    kind = type(m).__name__
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.training:
            ctx.refuse(
                f"{kind} in training mode normalises with statistics of the whole image, which a tile does not "
                "see; call .eval() on it (freeze the statistics) or replace it"
            )
        if not m.track_running_stats:
            ctx.refuse(f"{kind} without running statistics normalises with whole-image statistics")
        return merge(ctx, inputs)
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        if m.training or not m.track_running_stats:
            ctx.refuse(f"{kind} normalises with per-image statistics over space, which a tile does not see")
        return merge(ctx, inputs)
    ctx.refuse(f"{kind} normalises over space with per-image statistics, which a tile does not see")
    raise AssertionError("unreachable")


def _dropout(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    if m.training and m.p > 0:
        ctx.refuse(
            f"{type(m).__name__} in training mode draws a different mask on overlapping tiles; "
            "put it in eval mode or move it to the head"
        )
    return merge(ctx, inputs)


def softmax(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    dim = m.dim if isinstance(m, nn.Module) else node_arg(node, 1, "dim")
    if dim not in (1, -(ctx.ndim + 1)):
        ctx.refuse(f"it normalises over dim {dim}, which is not the channel dim 1")
    return merge(ctx, inputs)


def argmax(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    """Labels from class scores: an argmax over the channel dim is local (keepdim=True keeps the layout)."""
    dim = node_arg(node, 1, "dim")
    if dim not in (1, -(ctx.ndim + 1)):
        ctx.refuse(f"it takes the argmax over dim {dim}, not over the channel dim 1")
    return merge(ctx, inputs)


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_geometry_rule(_t, _conv)
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_geometry_rule(_t, _conv_transpose)
for _t in (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.LPPool1d,
    nn.LPPool2d,
):
    register_geometry_rule(_t, _pool)
register_geometry_rule(nn.Upsample, _upsample)
register_geometry_rule(nn.PixelShuffle, pixel_shuffle)
register_geometry_rule(nn.PixelUnshuffle, _pixel_unshuffle)
for _t in (
    nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd,
):
    register_geometry_rule(_t, _pad_module)
if hasattr(nn.modules.padding, "_CircularPadNd"):
    register_geometry_rule(nn.modules.padding._CircularPadNd, _pad_module)
for _t in (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
):
    register_geometry_rule(_t, _norm)
if hasattr(nn, "RMSNorm"):
    register_geometry_rule(nn.RMSNorm, _norm)
for _t in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
    register_geometry_rule(_t, _dropout)
register_geometry_rule(nn.Softmax, softmax)
register_geometry_rule(nn.LogSoftmax, softmax)
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
)
"""Point-wise activation layers (one value in, one out; local by construction)."""
for _t in (
    nn.Identity,
    *ACTIVATIONS,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Threshold,
    nn.LogSigmoid,
    nn.GLU,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
):
    register_geometry_rule(_t, elementwise)
for _t in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):  # fmt: skip
    register_geometry_rule(
        _t, refusing("adaptive/global pooling mixes the whole image; it belongs in the head")
    )
register_geometry_rule(
    nn.Linear,
    refusing("Linear acts on the last (spatial) axis, mixing positions; it belongs in the head"),
)
register_geometry_rule(nn.Bilinear, refusing("Bilinear mixes positions; it belongs in the head"))
register_geometry_rule(nn.Flatten, refusing("Flatten merges spatial positions; it belongs in the head"))
register_geometry_rule(nn.Unflatten, refusing("Unflatten reshapes spatial positions"))
register_geometry_rule(nn.MultiheadAttention, refusing("attention mixes all positions"))
register_geometry_rule(nn.Transformer, refusing("attention mixes all positions"))
register_geometry_rule(nn.TransformerEncoderLayer, refusing("attention mixes all positions"))
register_geometry_rule(nn.TransformerDecoderLayer, refusing("attention mixes all positions"))
