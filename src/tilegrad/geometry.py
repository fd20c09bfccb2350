"""Receptive-field geometry of a convolutional trunk: total output stride, halo, and tile-origin alignment.

The geometry of every tensor in a trunk is described per spatial dimension by three numbers, all in *input* pixels:

* ``stride`` S (a Fraction: 2 after a stride-2 conv, 1/2 after a 2x upsampling): output index i sits at input i*S;
* ``lo`` and ``hi``: output index i depends only on input pixels i*S + lo ... i*S + hi (inclusive).

NOTE [ Translation equivariance ]
Every operation accepted here is translation equivariant on the grid it lives on: if a tile starts at input pixel
``a`` and ``a / S_n`` is an integer for every tensor n of the graph, then local index i of tensor n on the tile is
global index ``i + a / S_n`` of tensor n on the whole image. ``align`` is the smallest positive integer with that
property (the lcm of the numerators of all S_n); tile origins are multiples of it, so strided layers sample the same
grid on a tile as on the whole image. Operations that depend on absolute position or size (adaptive or global
pooling, ``interpolate(size=...)``, ``align_corners=True``, circular padding, reading ``x.shape``) are refused.

NOTE [ Valid region ]
A tile's output index i equals the whole-image output at that index when the input interval i*S + lo ... i*S + hi
lies inside the tile's input, except where it reaches past the image border and the tile touches that border: there
the padding is real (it is the same padding the whole-image computation uses). Everything else a tile computes
near its inner edges comes from fake padding and is cropped before it reaches an output or a gradient.

The rules are applied to a ``torch.fx`` trace of the module, so graphs are handled, not only chains: residual
additions, concatenations, U-Net skips.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import GeometryError, NotStreamableError

__all__ = [
    "DimGeometry",
    "Geometry",
    "ReceptiveField",
    "compose",
    "module_geometry",
    "receptive_field",
    "register_geometry_rule",
]


@dataclass(frozen=True)
class DimGeometry:
    """Geometry of one tensor along one spatial dimension, in input pixels (see module docstring)."""

    stride: Fraction
    lo: Fraction
    hi: Fraction

    @staticmethod
    def identity() -> DimGeometry:
        return DimGeometry(Fraction(1), Fraction(0), Fraction(0))

    def then(self, stride: Fraction, lo: Fraction, hi: Fraction) -> DimGeometry:
        """Apply a local op whose output j depends on its input j*stride + lo ... j*stride + hi (op units)."""
        return DimGeometry(self.stride * stride, self.lo + lo * self.stride, self.hi + hi * self.stride)

    def union(self, other: DimGeometry) -> DimGeometry:
        return DimGeometry(self.stride, min(self.lo, other.lo), max(self.hi, other.hi))


@dataclass(frozen=True)
class Geometry:
    """Geometry of a tensor: one DimGeometry per spatial dim plus the alignment tile origins need."""

    dims: tuple[DimGeometry, ...]
    align: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.dims)

    @staticmethod
    def identity(ndim: int) -> Geometry:
        return Geometry(tuple(DimGeometry.identity() for _ in range(ndim)), (1,) * ndim)


def compose(first: Geometry, second: Geometry) -> Geometry:
    """Geometry of ``second(first(x))`` (``second`` measured in units of ``first``'s output)."""
    dims = []
    align = []
    for d1, d2, a1, a2 in zip(first.dims, second.dims, first.align, second.align):
        dims.append(d1.then(d2.stride, d2.lo, d2.hi))
        scaled = Fraction(a2) * d1.stride
        align.append(math.lcm(a1, scaled.numerator, d1.stride.numerator))
    return Geometry(tuple(dims), tuple(align))


@dataclass(frozen=True)
class ReceptiveField:
    """What :func:`receptive_field` reports, per spatial dimension.

    ``stride``: input pixels per output pixel (a Fraction below 1 for upsampling trunks).
    ``halo``: (left, right) input pixels beyond an output pixel's own stride cell that it depends on.
    ``size``: receptive field of one output pixel, in input pixels.
    ``align``: tile origins must be multiples of this many input pixels.
    """

    stride: tuple[Fraction, ...]
    halo: tuple[tuple[int, int], ...]
    size: tuple[int, ...]
    align: tuple[int, ...]

    @staticmethod
    def from_geometry(geometry: Geometry) -> ReceptiveField:
        halo = []
        size = []
        for d in geometry.dims:
            cell = max(d.stride, Fraction(1))
            halo.append((max(0, math.ceil(-d.lo)), max(0, math.ceil(d.hi - (cell - 1)))))
            size.append(math.ceil(d.hi) - math.floor(d.lo) + 1)
        return ReceptiveField(
            stride=tuple(d.stride for d in geometry.dims),
            halo=tuple(halo),
            size=tuple(size),
            align=geometry.align,
        )

    def __str__(self) -> str:
        def fmt(s: Fraction) -> str:
            return str(s.numerator) if s.denominator == 1 else f"{s.numerator}/{s.denominator}"

        return (
            f"stride {' x '.join(fmt(s) for s in self.stride)}, "
            f"halo {' x '.join(f'{lo}+{hi}' for lo, hi in self.halo)} px, "
            f"receptive field {' x '.join(str(s) for s in self.size)} px"
        )


# --------------------------------------------------------------------------------------------------------------
# Rules. A rule takes (context, module-or-None, node, spatial input geometries) and returns the output geometry.
# --------------------------------------------------------------------------------------------------------------

Rule = Callable[["_Context", Any, torch.fx.Node, list[Geometry]], Geometry]
_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}


def register_geometry_rule(target: type | Callable[..., Any] | str, rule: Rule) -> None:
    """Teach tilegrad the geometry of a custom module type, function or tensor method name.

    ``rule(ctx, module, node, inputs)`` receives the geometries of the spatial inputs and returns the output's;
    ``ctx.op(geometry, stride, lo, hi)`` applies a local op (units of its input), ``ctx.refuse(why)`` raises
    NotStreamableError naming the layer. Subclasses of a registered module type use its rule.
    """
    if isinstance(target, type):
        _MODULE_RULES[target] = rule
    else:
        _FUNCTION_RULES[target] = rule


class _Context:
    def __init__(self, ndim: int, where: str):
        self.ndim = ndim
        self.where = where

    def refuse(self, why: str) -> None:
        raise NotStreamableError(f"{self.where} cannot be streamed: {why}")

    def op(
        self,
        geometry: Geometry,
        stride: Sequence[Fraction | int],
        lo: Sequence[Fraction | int],
        hi: Sequence[Fraction | int],
    ) -> Geometry:
        dims = tuple(
            d.then(Fraction(s), Fraction(a), Fraction(b)) for d, s, a, b in zip(geometry.dims, stride, lo, hi)
        )
        align = tuple(math.lcm(a, d.stride.numerator) for a, d in zip(geometry.align, dims))
        return Geometry(dims, align)

    def tup(self, value: Any, name: str) -> tuple[int, ...]:
        if isinstance(value, int):
            return (value,) * self.ndim
        value = tuple(value)
        if len(value) == 1:
            return value * self.ndim
        if len(value) != self.ndim:
            self.refuse(f"{name}={value} has {len(value)} entries but the input has {self.ndim} spatial dims")
        return value


def _merge(ctx: _Context, inputs: list[Geometry]) -> Geometry:
    """Element-wise combination of several spatial tensors: same stride, union of dependencies."""
    if not inputs:
        ctx.refuse("it has no spatial input")
    out = inputs[0]
    for other in inputs[1:]:
        if any(a.stride != b.stride for a, b in zip(out.dims, other.dims)):
            strides = [tuple(str(d.stride) for d in g.dims) for g in (out, other)]
            ctx.refuse(f"it combines tensors on different grids (strides {strides[0]} and {strides[1]})")
        out = Geometry(
            tuple(a.union(b) for a, b in zip(out.dims, other.dims)),
            tuple(math.lcm(x, y) for x, y in zip(out.align, other.align)),
        )
    return out


def _elementwise(ctx: _Context, module: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    return _merge(ctx, inputs)


def _window(
    ctx: _Context, inputs: list[Geometry], kernel: Any, stride: Any, padding: Any, dilation: Any = 1
) -> Geometry:
    (g,) = inputs
    k = ctx.tup(kernel, "kernel_size")
    s = ctx.tup(stride if stride not in (None, ()) else kernel, "stride")
    d = ctx.tup(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            p = (0,) * ctx.ndim
        else:  # "same": torch pads total d*(k-1), the smaller half on the left
            p = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    else:
        p = ctx.tup(padding, "padding")
    return ctx.op(
        g,
        s,
        [-pi for pi in p],
        [-pi + di * (ki - 1) for ki, di, pi in zip(k, d, p)],
    )


def _conv(ctx: _Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    if m.weight.dim() - 2 != ctx.ndim:
        ctx.refuse(f"it is a {m.weight.dim() - 2}D convolution but the input has {ctx.ndim} spatial dims")
    if m.padding_mode == "circular":
        ctx.refuse("circular padding wraps around the image border; use zeros, reflect or replicate")
    return _window(ctx, inputs, m.kernel_size, m.stride, m.padding, m.dilation)


def _conv_transpose(ctx: _Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
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


def _pool(ctx: _Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    dilation = getattr(m, "dilation", 1)
    return _window(ctx, inputs, m.kernel_size, m.stride, getattr(m, "padding", 0), dilation)


def _upsample_geometry(ctx: _Context, g: Geometry, scale: Any, mode: str, align_corners: Any) -> Geometry:
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


def _upsample(ctx: _Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    return _upsample_geometry(ctx, g, m.scale_factor, m.mode, getattr(m, "align_corners", None))


def _pixel_shuffle(ctx: _Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    r = m.upscale_factor
    return ctx.op(g, [Fraction(1, r)] * ctx.ndim, [Fraction(-(r - 1), r)] * ctx.ndim, [0] * ctx.ndim)


def _pixel_unshuffle(ctx: _Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    r = m.downscale_factor
    return ctx.op(g, [r] * ctx.ndim, [0] * ctx.ndim, [r - 1] * ctx.ndim)


def _pad_geometry(ctx: _Context, g: Geometry, pad: Sequence[int], mode: str) -> Geometry:
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


def _pad_module(ctx: _Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
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
    return _pad_geometry(ctx, g, m.padding, kind)


def _norm(ctx: _Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    kind = type(m).__name__
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.training:
            ctx.refuse(
                f"{kind} in training mode normalises with statistics of the whole image, which a tile does not "
                "see; call .eval() on it (freeze the statistics) or replace it"
            )
        if not m.track_running_stats:
            ctx.refuse(f"{kind} without running statistics normalises with whole-image statistics")
        return _merge(ctx, inputs)
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        if m.training or not m.track_running_stats:
            ctx.refuse(f"{kind} normalises with per-image statistics over space, which a tile does not see")
        return _merge(ctx, inputs)
    ctx.refuse(f"{kind} normalises over space with per-image statistics, which a tile does not see")
    raise AssertionError("unreachable")


def _dropout(ctx: _Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    if m.training and m.p > 0:
        ctx.refuse(
            f"{type(m).__name__} in training mode draws a different mask on overlapping tiles; "
            "put it in eval mode or move it to the head"
        )
    return _merge(ctx, inputs)


def _refuse_module(why: str) -> Rule:
    def rule(ctx: _Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
        ctx.refuse(why)
        raise AssertionError("unreachable")

    return rule


def _softmax(ctx: _Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    dim = m.dim if isinstance(m, nn.Module) else _arg(node, 1, "dim")
    if dim not in (1, -(ctx.ndim + 1)):
        ctx.refuse(f"it normalises over dim {dim}, which is not the channel dim 1")
    return _merge(ctx, inputs)


def _argmax(ctx: _Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    """Labels from class scores: an argmax over the channel dim is local (keepdim=True keeps the layout)."""
    dim = _arg(node, 1, "dim")
    if dim not in (1, -(ctx.ndim + 1)):
        ctx.refuse(f"it takes the argmax over dim {dim}, not over the channel dim 1")
    return _merge(ctx, inputs)


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
register_geometry_rule(nn.PixelShuffle, _pixel_shuffle)
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
register_geometry_rule(nn.Softmax, _softmax)
register_geometry_rule(nn.LogSoftmax, _softmax)
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
    register_geometry_rule(_t, _elementwise)
for _t in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
           nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d):  # fmt: skip
    register_geometry_rule(
        _t, _refuse_module("adaptive/global pooling mixes the whole image; it belongs in the head")
    )
register_geometry_rule(
    nn.Linear,
    _refuse_module("Linear acts on the last (spatial) axis, mixing positions; it belongs in the head"),
)
register_geometry_rule(nn.Bilinear, _refuse_module("Bilinear mixes positions; it belongs in the head"))
register_geometry_rule(nn.Flatten, _refuse_module("Flatten merges spatial positions; it belongs in the head"))
register_geometry_rule(nn.Unflatten, _refuse_module("Unflatten reshapes spatial positions"))
register_geometry_rule(nn.MultiheadAttention, _refuse_module("attention mixes all positions"))
register_geometry_rule(nn.Transformer, _refuse_module("attention mixes all positions"))
register_geometry_rule(nn.TransformerEncoderLayer, _refuse_module("attention mixes all positions"))
register_geometry_rule(nn.TransformerDecoderLayer, _refuse_module("attention mixes all positions"))


# ------------------------------------------------------------------------- functions and tensor methods ------


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _f_conv(ctx: _Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    weight = _arg(node, 1, "weight")
    meta = weight.meta.get("tensor_meta") if isinstance(weight, torch.fx.Node) else None
    kernel = tuple(meta.shape[2:]) if meta is not None else None
    if kernel is None:
        ctx.refuse("the kernel size of a functional convolution could not be read; use an nn.Conv module")
    if len(inputs) != 1:
        ctx.refuse("its weight depends on the image")
    return _window(
        ctx,
        inputs[:1],
        kernel,
        _arg(node, 3, "stride", 1),
        _arg(node, 4, "padding", 0),
        _arg(node, 5, "dilation", 1),
    )


def _f_pool(ctx: _Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    kernel = _arg(node, 1, "kernel_size")
    stride = _arg(node, 2, "stride", None)
    padding = _arg(node, 3, "padding", 0)
    dilation = _arg(node, 4, "dilation", 1) if "max" in getattr(node.target, "__name__", "") else 1
    return _window(ctx, inputs, kernel, stride, padding, dilation)


def _f_interpolate(ctx: _Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    if _arg(node, 1, "size") is not None:
        ctx.refuse("interpolate(size=...) resizes to a fixed size; use scale_factor")
    return _upsample_geometry(
        ctx,
        g,
        _arg(node, 2, "scale_factor"),
        _arg(node, 3, "mode", "nearest"),
        _arg(node, 4, "align_corners"),
    )


def _f_pad(ctx: _Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    return _pad_geometry(ctx, g, _arg(node, 1, "pad"), _arg(node, 2, "mode", "constant"))


def _f_pixel_shuffle(ctx: _Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    (g,) = inputs
    r = _arg(node, 1, "upscale_factor")
    return ctx.op(g, [Fraction(1, r)] * ctx.ndim, [Fraction(-(r - 1), r)] * ctx.ndim, [0] * ctx.ndim)


def _channel_dim_op(index: int, name: str, default: Any) -> Rule:
    """Ops that act along a dim given as an argument (cat, chunk, split, softmax): allowed on batch/channel only."""

    def rule(ctx: _Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
        dim = _arg(node, index, name, default)
        if dim not in (0, 1, -(ctx.ndim + 1), -(ctx.ndim + 2)):
            ctx.refuse(f"it acts along dim {dim}, a spatial dim; only batch (0) and channel (1) are allowed")
        return _merge(ctx, inputs)

    return rule


def _getitem(ctx: _Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    source = node.args[0]
    if isinstance(source, torch.fx.Node) and source.meta.get("tilegrad_tuple"):
        return _merge(ctx, inputs)  # picking one tensor out of chunk()/split()
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    spatial = index[2:] if Ellipsis not in index else ()
    if Ellipsis in index or any(not (isinstance(i, slice) and i == slice(None)) for i in spatial):
        ctx.refuse(f"indexing with {index} may select spatial positions by absolute coordinates")
    return _merge(ctx, inputs)


def _refuse_function(why: str) -> Rule:
    def rule(ctx: _Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
        ctx.refuse(why)
        raise AssertionError("unreachable")

    return rule


_ELEMENTWISE_FUNCTIONS: list[Any] = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
    torch.exp, torch.abs, torch.sqrt, torch.clamp, torch.maximum, torch.minimum, torch.where, torch.pow, torch.round,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh, F.hardsigmoid,
    F.sigmoid, F.tanh, F.softplus, F.prelu, F.glu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
]  # fmt: skip
for _fn in _ELEMENTWISE_FUNCTIONS:
    register_geometry_rule(_fn, _elementwise)
for _name in (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "relu", "relu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "exp", "abs", "sqrt", "clamp", "clamp_", "pow", "contiguous", "clone", "float", "double",
    "half", "bfloat16", "to", "type_as", "detach", "round",
):  # fmt: skip
    register_geometry_rule(_name, _elementwise)
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
register_geometry_rule(F.softmax, _softmax)
register_geometry_rule(torch.argmax, _argmax)
register_geometry_rule("argmax", _argmax)
register_geometry_rule(F.log_softmax, _softmax)
register_geometry_rule("softmax", _softmax)
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
    register_geometry_rule(_fn, _refuse_function(_why))


# ------------------------------------------------------------------------------------------------ tracing ----


class _Tracer(torch.fx.Tracer):
    """fx tracer whose leaves are every module with a registered rule (torch.nn layers and custom ones)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _module_rule(m) is not None or super().is_leaf_module(m, module_qualified_name)


def _module_rule(m: nn.Module) -> Rule | None:
    for klass in type(m).__mro__:
        rule = _MODULE_RULES.get(klass)
        if rule is not None:
            return rule
    return None


def _trace(module: nn.Module) -> torch.fx.Graph:
    try:
        return _Tracer().trace(module)
    except Exception as err:  # fx raises many types; re-raise with the layer context
        raise NotStreamableError(
            f"tilegrad could not trace {type(module).__name__} to work out its receptive field: "
            f"{type(err).__name__}: {err}. Streaming needs a forward pass without data-dependent control flow "
            "or size arithmetic; wrap the offending part as a module and register its geometry with "
            "tilegrad.geometry.register_geometry_rule"
        ) from err


def _node_where(node: torch.fx.Node, module: nn.Module | None, prefix: str = "") -> str:
    if node.op == "call_module":
        qualified = f"{prefix}.{node.target}" if prefix else node.target
        return f"layer '{qualified}' ({type(module).__name__})"
    stack = node.meta.get("nn_module_stack")
    inside = f" inside '{next(reversed(stack))}'" if stack else (f" inside '{prefix}'" if prefix else "")
    if node.op == "call_method":
        return f"tensor method .{node.target}() (node '{node.name}'){inside}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"function {name} (node '{node.name}'){inside}"


_GRAPH_CACHE: dict[int, tuple[Any, torch.fx.Graph]] = {}


def module_geometry(module: nn.Module, ndim: int, name: str = "") -> Geometry:
    """Geometry of ``module``'s output relative to its input, for inputs with ``ndim`` spatial dims.

    Raises NotStreamableError naming the first layer that is not local (in the module's current train/eval mode);
    ``name`` is the module's qualified name in a bigger model, used in those messages.
    """
    if ndim not in (1, 2, 3):
        raise GeometryError(f"expected 1, 2 or 3 spatial dims, received ndim={ndim}")
    rule = _module_rule(module)
    if rule is not None:  # the whole module is a single known layer (or has a registered rule)
        placeholder = torch.fx.Graph().placeholder("x")
        return rule(
            _Context(ndim, _node_where_module(module, name)), module, placeholder, [Geometry.identity(ndim)]
        )
    cached = _GRAPH_CACHE.get(id(module))
    if cached is None or cached[0]() is not module:
        import weakref

        graph = _trace(module)
        _GRAPH_CACHE[id(module)] = (weakref.ref(module), graph)
    else:
        graph = cached[1]
    return _graph_geometry(module, graph, ndim, name)


def _node_where_module(module: nn.Module, name: str) -> str:
    return f"layer '{name}' ({type(module).__name__})" if name else f"layer ({type(module).__name__})"


def _graph_geometry(root: nn.Module, graph: torch.fx.Graph, ndim: int, prefix: str = "") -> Geometry:
    geoms: dict[torch.fx.Node, Geometry | None] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise NotStreamableError(f"{type(root).__name__}.forward takes no tensor input")
    for node in graph.nodes:
        if node.op == "placeholder":
            geoms[node] = Geometry.identity(ndim) if node is placeholders[0] else None
            continue
        if node.op == "get_attr":
            geoms[node] = None
            continue
        inputs: list[Geometry] = []
        for arg in node.all_input_nodes:
            g = geoms.get(arg)
            if g is not None:
                inputs.append(g)
        if node.op == "output":
            if not inputs:
                raise NotStreamableError(f"the output of {type(root).__name__} does not depend on its input")
            out_arg = node.args[0]
            if not isinstance(out_arg, torch.fx.Node):
                raise NotStreamableError(
                    f"{type(root).__name__} returns {type(out_arg).__name__}; a streamed trunk must return one tensor"
                )
            result = geoms[out_arg]
            assert result is not None
            return result
        if not inputs:
            geoms[node] = None  # depends only on parameters/constants
            continue
        module = root.get_submodule(node.target) if node.op == "call_module" else None
        ctx = _Context(ndim, _node_where(node, module, prefix))
        if node.op == "call_module":
            rule = _module_rule(module)
            if rule is None:
                ctx.refuse(
                    f"tilegrad does not know whether {type(module).__name__} is local; if it is, register its "
                    "geometry with tilegrad.geometry.register_geometry_rule"
                )
        else:
            rule = _FUNCTION_RULES.get(node.target)
            if rule is None:
                ctx.refuse(
                    "tilegrad does not know whether it is local; if it is, register its geometry with "
                    "tilegrad.geometry.register_geometry_rule"
                )
        if node.target in (torch.chunk, torch.split, "chunk", "split"):
            node.meta["tilegrad_tuple"] = True
        geoms[node] = rule(ctx, module, node, inputs)
    raise NotStreamableError(f"{type(root).__name__} has no output")  # pragma: no cover


def receptive_field(module: nn.Module, ndim: int = 2) -> ReceptiveField:
    """Total output stride, halo and receptive field of a trunk of local layers.

    >>> import torch.nn as nn
    >>> trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1))
    >>> rf = receptive_field(trunk, ndim=2)
    >>> rf.stride, rf.halo, rf.size
    ((Fraction(2, 1), Fraction(2, 1)), ((3, 3), (3, 3)), (8, 8))
    >>> print(rf)
    stride 2 x 2, halo 3+3 x 3+3 px, receptive field 8 x 8 px
    """
    return ReceptiveField.from_geometry(module_geometry(module, ndim))
