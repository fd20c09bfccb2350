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
from ..layout import describe, dim_label, flatten_layout, is_spatial
from ..toolkit import (
    Context,
    elementwise,
    layout_aware,
    merge,
    node_arg,
    pixel_shuffle,
    refusing,
    register_geometry_rule,
    window,
)

__all__ = [
    "ACTIVATIONS",
    "along_channels",
    "argmax",
    "dropout_geometry",
    "glu_geometry",
    "layer_norm_geometry",
    "linear_geometry",
    "pad_geometry",
    "softmax",
    "upsample_geometry",
]


def along_channels(ctx: Context, dim: Any, what: str) -> None:
    """Refuse unless ``dim`` of the (first) input is a batch or channel dim (NOTE [ Layouts and tile extents ])."""
    layout = ctx.input_layout()
    label = dim_label(layout, dim)
    if label is None:
        ctx.refuse(
            f"{what} dim {dim!r}, which tilegrad cannot match to a dim of {describe(layout, ctx.ndim)}"
        )
    if is_spatial(label):
        ctx.refuse(
            f"{what} dim {dim} of {describe(layout, ctx.ndim)}, a spatial dim; only batch and channel dims are local"
        )
    ctx.mixes_batch(label, f"{what} the batch dim")


def layer_norm_geometry(ctx: Context, inputs: list[Geometry], count: int, kind: str) -> Geometry:
    """LayerNorm over the last ``count`` dims: local when they are channel dims (ConvNeXt's channels-last blocks,
    LayerNorm2d), a statistic over positions when one of them is spatial."""
    layout = ctx.input_layout()
    normalised = layout[-count:] if count else ()
    if any(is_spatial(label) for label in normalised):
        ctx.refuse(
            f"{kind} normalises over space: its last {count} dim(s) of {describe(layout, ctx.ndim)} include spatial "
            "dims, so it needs statistics over positions a tile does not see. A LayerNorm over channels "
            "(normalized_shape=(C,) on a channels-last tensor, as ConvNeXt's LayerNorm2d does) is local"
        )
    if any("N" in str(label) for label in normalised):
        ctx.refuse(f"{kind} normalises over the batch dim of {describe(layout, ctx.ndim)}")
    return merge(ctx, inputs)


def linear_geometry(ctx: Context, inputs: list[Geometry]) -> Geometry:
    """Linear acts on the last dim: local when that is a channel dim (a channels-last MLP), else refused."""
    layout = ctx.input_layout()
    if is_spatial(layout[-1]) or "N" in str(layout[-1]):
        ctx.refuse(
            f"Linear acts on the last axis of {describe(layout, ctx.ndim)}, a spatial axis, mixing positions; it "
            "belongs in the head (on a channels-last tensor it acts on channels and is local)"
        )
    return merge(ctx, inputs)


def glu_geometry(ctx: Context, inputs: list[Geometry], dim: Any) -> Geometry:
    """GLU halves ``dim`` into value and gate: local along channels, refused along a spatial dim."""
    layout = ctx.input_layout()
    label = dim_label(layout, dim)
    if label is None or is_spatial(label):
        ctx.refuse(
            f"GLU splits dim {dim} of {describe(layout, ctx.ndim)} into halves"
            + (
                ", a spatial dim: a tile's halves are not the image's; use dim=1 (the channels)"
                if label is not None
                else "; tilegrad cannot match that dim"
            )
        )
    return merge(ctx, inputs)


def dropout_geometry(ctx: Context, inputs: list[Geometry], kind: str, p: Any, training: Any) -> Geometry:
    """Dropout is the identity in eval mode (or with p=0); in training mode tiles would draw different masks."""
    if training and p:
        ctx.refuse(
            f"{kind} in training mode draws a different mask on overlapping tiles; "
            "put it in eval mode or move it to the head"
        )
    return merge(ctx, inputs)


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


@layout_aware
def _dropout(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    return dropout_geometry(ctx, inputs, type(m).__name__, m.p, m.training)


@layout_aware
def _layer_norm(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    return layer_norm_geometry(ctx, inputs, len(m.normalized_shape), type(m).__name__)


@layout_aware
def _linear(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    return linear_geometry(ctx, inputs)


@layout_aware
def _glu(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    return glu_geometry(ctx, inputs, m.dim)


@layout_aware
def _flatten(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    new = flatten_layout(ctx.input_layout(), m.start_dim, m.end_dim)
    if new is None:
        ctx.refuse("Flatten merges spatial positions; it belongs in the head")
    ctx.layout = new
    return merge(ctx, inputs)


@layout_aware
def softmax(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    dim = m.dim if isinstance(m, nn.Module) else node_arg(node, 1, "dim")
    along_channels(ctx, dim, "it normalises over")
    return merge(ctx, inputs)


@layout_aware
def argmax(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    """Labels from class scores: an argmax over the channel dim is local (keepdim=True keeps the layout)."""
    dim = node_arg(node, 1, "dim")
    along_channels(ctx, dim, "it takes the argmax over")
    if not node_arg(node, 2, "keepdim", False):
        label = dim_label(ctx.input_layout(), dim)
        ctx.layout = tuple(
            lab for i, lab in enumerate(ctx.input_layout()) if i != dim % len(ctx.input_layout())
        )
        assert label is not None
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
):
    register_geometry_rule(_t, _norm)
register_geometry_rule(nn.LayerNorm, _layer_norm)
if hasattr(nn, "RMSNorm"):
    register_geometry_rule(nn.RMSNorm, _layer_norm)
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
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
):
    register_geometry_rule(_t, elementwise)
for _t in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):  # fmt: skip
    register_geometry_rule(
        _t,
        refusing(
            "adaptive/global pooling mixes the whole image: in a classifier it belongs in the head "
            "(tilegrad.split_model cuts there); inside the trunk (an image-level branch such as DeepLabV3's ASPP "
            "pooling, squeeze-and-excitation) it is a statistic over all positions: stream the part before it"
        ),
    )
register_geometry_rule(nn.GLU, _glu)
register_geometry_rule(nn.Linear, _linear)
register_geometry_rule(nn.Bilinear, refusing("Bilinear mixes positions; it belongs in the head"))
register_geometry_rule(nn.Flatten, _flatten)
register_geometry_rule(nn.Unflatten, refusing("Unflatten reshapes spatial positions"))
register_geometry_rule(nn.MultiheadAttention, refusing("attention over all positions is global"))
register_geometry_rule(nn.Transformer, refusing("attention over all positions is global"))
register_geometry_rule(nn.TransformerEncoderLayer, refusing("attention over all positions is global"))
register_geometry_rule(nn.TransformerDecoderLayer, refusing("attention over all positions is global"))
# MONAI's self-attention block (ViT, UNETR, ViTAutoEnc, ...), by name: MONAI is not imported here. Traced through,
# it failed inside einops with "KeyError: Proxy(getattr_1)"
register_geometry_rule(
    "monai.networks.blocks.selfattention.SABlock", refusing("attention over all positions is global")
)
# timm's 'same' padding computed from each input's size (pad_same): a subclass of nn.Conv2d / nn.MaxPool2d /
# nn.AvgPool2d with padding 0 whose forward pads first, so the base class's rule would miss the padding (timm's NASNet
# and PNASNet planned with it and produced empty tiles). By name: timm is not imported here
for _name in (
    "timm.layers.conv2d_same.Conv2dSame",
    "timm.layers.pool2d_same.MaxPool2dSame",
    "timm.layers.pool2d_same.AvgPool2dSame",
    "timm.layers.std_conv.StdConv2dSame",
    "timm.layers.std_conv.ScaledStdConv2dSame",
):
    register_geometry_rule(
        _name,
        refusing(
            "its 'same' padding is computed from the size of each input, so a tile would be padded differently "
            "from the image (timm pads this way where a model asks for pad_type='same'); a model built with "
            "static padding streams"
        ),
    )
