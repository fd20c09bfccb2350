"""One contract over the whole geometry registry, as timm tests every model: for every rule tilegrad registers, a
small instance of its layer or call, and either its declared stride and halo hold against the receptive field
autograd measures (the gradient of one output position with respect to the input: where it is nonzero), or the
rule refuses it. A rule registered without a case here fails the coverage test."""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import tilegrad
from tilegrad import NotStreamableError
from tilegrad.geometry import module_geometry, toolkit
from tilegrad.models import ESPCN3d, PixelShuffle3d

LOCAL, REFUSED = "local", "refused"


def _coupled():
    conv = lambda: nn.Conv2d(1, 1, 3, padding=1)  # noqa: E731
    return tilegrad.ReversibleSequential(tilegrad.AdditiveCoupling(conv(), conv()))


# module type -> (factory, spatial rank, channels, expectation, tight: the declared interval is exactly what the
# gradient reaches, not only a bound on it)
MODULES = {
    nn.Conv1d: (lambda: nn.Conv1d(2, 2, 5, stride=2, padding=1), 1, 2, LOCAL, True),
    nn.Conv2d: (
        lambda: nn.Conv2d(2, 2, (3, 5), stride=(1, 2), padding=(0, 2), dilation=(2, 1)),
        2,
        2,
        LOCAL,
        True,
    ),
    nn.Conv3d: (lambda: nn.Conv3d(2, 2, 3, stride=2, padding=1), 3, 2, LOCAL, True),
    nn.ConvTranspose1d: (lambda: nn.ConvTranspose1d(2, 2, 4, stride=2, padding=1), 1, 2, LOCAL, True),
    nn.ConvTranspose2d: (lambda: nn.ConvTranspose2d(2, 2, 3, stride=2), 2, 2, LOCAL, True),
    nn.ConvTranspose3d: (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), 3, 2, LOCAL, True),
    nn.MaxPool1d: (lambda: nn.MaxPool1d(3, stride=2, padding=1), 1, 2, LOCAL, False),
    nn.MaxPool2d: (lambda: nn.MaxPool2d(2), 2, 2, LOCAL, False),
    nn.MaxPool3d: (lambda: nn.MaxPool3d(3, stride=1, padding=1), 3, 2, LOCAL, False),
    nn.AvgPool1d: (lambda: nn.AvgPool1d(3, stride=2), 1, 2, LOCAL, True),
    nn.AvgPool2d: (lambda: nn.AvgPool2d(3, stride=1, padding=1), 2, 2, LOCAL, True),
    nn.AvgPool3d: (lambda: nn.AvgPool3d(2), 3, 2, LOCAL, True),
    nn.LPPool1d: (lambda: nn.LPPool1d(2, 3, stride=2), 1, 2, LOCAL, True),
    nn.LPPool2d: (lambda: nn.LPPool2d(2, 2), 2, 2, LOCAL, True),
    nn.Upsample: (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), 2, 2, LOCAL, False),
    nn.PixelShuffle: (lambda: nn.PixelShuffle(2), 2, 4, LOCAL, True),
    nn.PixelUnshuffle: (lambda: nn.PixelUnshuffle(2), 2, 2, LOCAL, False),  # one channel reads one pixel
    nn.modules.padding._ConstantPadNd: (lambda: nn.ConstantPad2d((1, 2, 0, 3), 0.5), 2, 2, LOCAL, True),
    nn.modules.padding._ReflectionPadNd: (lambda: nn.ReflectionPad1d(2), 1, 2, LOCAL, False),
    nn.modules.padding._ReplicationPadNd: (lambda: nn.ReplicationPad2d(1), 2, 2, LOCAL, False),
    nn.modules.padding._CircularPadNd: (lambda: nn.CircularPad2d(1), 2, 2, REFUSED, False),
    nn.modules.batchnorm._BatchNorm: (lambda: nn.BatchNorm2d(2).eval(), 2, 2, LOCAL, True),
    nn.modules.instancenorm._InstanceNorm: (lambda: nn.InstanceNorm2d(2), 2, 2, REFUSED, False),
    nn.GroupNorm: (lambda: nn.GroupNorm(1, 2), 2, 2, REFUSED, False),
    nn.LayerNorm: (lambda: nn.LayerNorm(12), 2, 2, REFUSED, False),  # over the width: a statistic over space
    nn.RMSNorm: (lambda: nn.RMSNorm(12), 2, 2, REFUSED, False),
    nn.Dropout: (lambda: nn.Dropout(0.5).eval(), 2, 2, LOCAL, True),
    nn.Dropout1d: (lambda: nn.Dropout1d(0.5).train(), 1, 2, REFUSED, False),
    nn.Dropout2d: (lambda: nn.Dropout2d(0.5).eval(), 2, 2, LOCAL, True),
    nn.Dropout3d: (lambda: nn.Dropout3d(0.5).eval(), 3, 2, LOCAL, True),
    nn.AlphaDropout: (lambda: nn.AlphaDropout(0.5).eval(), 2, 2, LOCAL, True),
    nn.FeatureAlphaDropout: (lambda: nn.FeatureAlphaDropout(0.5).eval(), 2, 2, LOCAL, True),
    nn.Softmax: (lambda: nn.Softmax(dim=1), 2, 2, LOCAL, True),
    nn.LogSoftmax: (lambda: nn.LogSoftmax(dim=-1), 2, 2, REFUSED, False),
    nn.LocalResponseNorm: (lambda: nn.LocalResponseNorm(2), 2, 4, LOCAL, True),
    nn.CrossMapLRN2d: (lambda: nn.CrossMapLRN2d(3), 2, 4, LOCAL, True),
    nn.GLU: (lambda: nn.GLU(dim=1), 2, 4, LOCAL, True),
    nn.Linear: (lambda: nn.Linear(12, 12), 2, 2, REFUSED, False),
    nn.Bilinear: (lambda: nn.Bilinear(12, 12, 2), 2, 2, REFUSED, False),
    nn.Flatten: (lambda: nn.Flatten(), 2, 2, REFUSED, False),
    nn.Unflatten: (lambda: nn.Unflatten(1, (1, 2)), 2, 2, REFUSED, False),
    nn.MultiheadAttention: (lambda: nn.MultiheadAttention(12, 1), 2, 2, REFUSED, False),
    nn.Transformer: (lambda: nn.Transformer(12, 1, 1, 1, 16), 2, 2, REFUSED, False),
    nn.TransformerEncoderLayer: (lambda: nn.TransformerEncoderLayer(12, 1, 16), 2, 2, REFUSED, False),
    nn.TransformerDecoderLayer: (lambda: nn.TransformerDecoderLayer(12, 1, 16), 2, 2, REFUSED, False),
    tilegrad.ReversibleSequential: (_coupled, 2, 2, LOCAL, False),
    ESPCN3d: (lambda: ESPCN3d(upscale=2, features=(4, 4)), 3, 1, LOCAL, False),
    PixelShuffle3d: (lambda: PixelShuffle3d(2), 3, 8, LOCAL, True),
    **{
        t: (lambda t=t: t(), 2, 2, LOCAL, True)
        for t in (
            nn.Identity,
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
            nn.Sigmoid,
            nn.Tanh,
            nn.Hardtanh,
            nn.Hardswish,
            nn.Hardsigmoid,
            nn.Softplus,
            nn.Softsign,
            nn.Tanhshrink,
            nn.LogSigmoid,
        )
    },
    nn.Threshold: (lambda: nn.Threshold(0.1, 0.0), 2, 2, LOCAL, True),
    **{
        t: (lambda t=t: t(1), 2, 2, REFUSED, False)
        for t in (
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d,
        )
    },
}

W = torch.ones(2, 2, 3, 3, dtype=torch.float64)
_ELEMENTWISE = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul, torch.add, torch.sub,
    torch.mul, torch.div, torch.maximum, torch.minimum, torch.pow, operator.pow,
]  # fmt: skip
_UNARY = [
    operator.neg, torch.neg, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.sqrt,
    torch.rsqrt, torch.square, torch.round, F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardtanh,
    F.hardsigmoid, F.sigmoid, F.tanh, F.softplus,
]  # fmt: skip
_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "type_as",
]  # fmt: skip
_UNARY_METHODS = [
    "neg", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "sqrt", "rsqrt", "square",
    "contiguous", "clone", "float", "double", "half", "bfloat16", "detach", "round",
]  # fmt: skip
_COMPARE = [
    operator.gt,
    operator.lt,
    operator.ge,
    operator.le,
    operator.eq,
    operator.ne,
    "gt",
    "lt",
    "ge",
    "le",
    "eq",
    "ne",
]


def _compare(op):
    call = (lambda x: getattr(x, op)(0.5)) if isinstance(op, str) else (lambda x: op(x, 0.5))
    return lambda x: torch.where(call(x), x, x * 2)


# function or method name -> (call on a (1, C=4, ...) input, spatial rank, expectation, tight)
FUNCTIONS = {
    # x + f(...): round, detach and saturated activations have no gradient of their own
    **{f: (lambda x, f=f: f(x.abs() + 1, x * 0.5 + 2), 2, LOCAL, True) for f in _ELEMENTWISE},
    **{f: (lambda x, f=f: 3 * x + f(x.abs() + 0.1), 2, LOCAL, True) for f in _UNARY},
    **{m: (lambda x, m=m: getattr(x.abs() + 1, m)(x * 0.5 + 2), 2, LOCAL, True) for m in _METHODS},
    **{
        m: (lambda x, m=m: 3 * x + getattr(x.abs() + 0.1, m)().double(), 2, LOCAL, True)
        for m in _UNARY_METHODS
    },
    **{c: (_compare(c), 2, LOCAL, True) for c in _COMPARE},
    torch.clamp: (lambda x: x + torch.clamp(x, -0.5, 0.5), 2, LOCAL, True),
    "clamp": (lambda x: x + x.clamp(-0.5, 0.5), 2, LOCAL, True),
    "clamp_": (lambda x: x + (x + 0).clamp_(-0.5, 0.5), 2, LOCAL, True),
    "square_": (lambda x: x + (x + 1).square_(), 2, LOCAL, True),
    torch.where: (lambda x: torch.where(x > 0, x, -x), 2, LOCAL, True),
    "to": (lambda x: x.to(torch.float64), 2, LOCAL, True),
    F.prelu: (lambda x: F.prelu(x, torch.full((1,), 0.25, dtype=x.dtype)), 2, LOCAL, True),
    F.conv1d: (lambda x: F.conv1d(x, W[:, :, 0].repeat(2, 2, 1), stride=2, padding=1), 1, LOCAL, True),
    F.conv2d: (lambda x: F.conv2d(x, W.repeat(1, 2, 1, 1), padding=2, dilation=2), 2, LOCAL, True),
    F.conv3d: (lambda x: F.conv3d(x, W[..., None].repeat(1, 2, 1, 1, 2), stride=(1, 2, 1)), 3, LOCAL, True),
    F.max_pool1d: (lambda x: F.max_pool1d(x, 3, 2, 1), 1, LOCAL, False),
    F.max_pool2d: (lambda x: F.max_pool2d(x, 2), 2, LOCAL, False),
    F.max_pool3d: (lambda x: F.max_pool3d(x, 3, 1, 1), 3, LOCAL, False),
    F.avg_pool1d: (lambda x: F.avg_pool1d(x, 3, 1, 1), 1, LOCAL, True),
    F.avg_pool2d: (lambda x: F.avg_pool2d(x, 2), 2, LOCAL, True),
    F.avg_pool3d: (lambda x: F.avg_pool3d(x, 2, 2), 3, LOCAL, True),
    F.interpolate: (lambda x: F.interpolate(x, scale_factor=3, mode="nearest"), 2, LOCAL, True),
    F.pad: (lambda x: F.pad(x, (2, 1, 1, 0)), 2, LOCAL, True),
    F.pixel_shuffle: (lambda x: F.pixel_shuffle(x, 2), 2, LOCAL, True),
    torch.pixel_shuffle: (lambda x: torch.pixel_shuffle(x, 2), 2, LOCAL, True),
    torch.cat: (lambda x: torch.cat([x, x * 2], dim=1), 2, LOCAL, True),
    torch.concat: (lambda x: torch.concat([x, x * 2], dim=-1), 2, REFUSED, False),
    torch.chunk: (lambda x: torch.chunk(x, 2, dim=1)[1], 2, LOCAL, True),
    torch.split: (lambda x: torch.split(x, 1, dim=2)[0], 2, REFUSED, False),
    "chunk": (lambda x: x.chunk(2, 1)[0], 2, LOCAL, True),
    "split": (lambda x: x.split(3, 1)[1], 2, LOCAL, True),
    F.softmax: (lambda x: F.softmax(x, dim=1), 2, LOCAL, True),
    F.log_softmax: (lambda x: F.log_softmax(x, dim=2), 2, REFUSED, False),
    "softmax": (lambda x: x.softmax(1), 2, LOCAL, True),
    torch.argmax: (lambda x: x * torch.argmax(x, dim=1, keepdim=True), 2, LOCAL, True),
    "argmax": (lambda x: x * x.argmax(-1, keepdim=True), 2, REFUSED, False),
    operator.getitem: (lambda x: x[:, 1:3], 2, LOCAL, True),
    "view": (
        lambda x: x.view(x.shape[0], 2, 2, x.shape[2], x.shape[3]).transpose(1, 2).reshape(x.shape),
        2,
        LOCAL,
        True,
    ),
    "reshape": (lambda x: x.reshape(x.shape[0], 2, 2, *x.shape[2:]).sum(1), 2, LOCAL, True),
    torch.reshape: (lambda x: torch.reshape(x, (1, 4, -1)), 2, REFUSED, False),
    "flatten": (lambda x: x.unsqueeze(1).flatten(1, 2), 2, LOCAL, True),
    torch.flatten: (lambda x: torch.flatten(x, 2), 2, REFUSED, False),
    "permute": (lambda x: x.permute(0, 2, 3, 1).exp().permute(0, 3, 1, 2), 2, LOCAL, True),
    torch.permute: (
        lambda x: torch.permute(x, (0, 1, 3, 2)),
        2,
        REFUSED,
        False,
    ),  # a trunk returns (N, C, H, W)
    "transpose": (lambda x: x.transpose(1, -1).transpose(-1, 1), 2, LOCAL, True),
    torch.transpose: (lambda x: torch.transpose(x, 2, 3), 2, REFUSED, False),
    "swapaxes": (lambda x: x.swapaxes(0, 1).swapaxes(0, 1), 2, LOCAL, True),
    "swapdims": (lambda x: x.swapdims(0, 1).swapdims(1, 0), 2, LOCAL, True),
    "unsqueeze": (lambda x: x.unsqueeze(1).sum(1), 2, LOCAL, True),
    torch.unsqueeze: (lambda x: torch.unsqueeze(x, 2).amax(2), 2, LOCAL, True),
    "squeeze": (lambda x: x.unsqueeze(1).squeeze(1), 2, LOCAL, True),
    torch.squeeze: (lambda x: torch.squeeze(x), 2, REFUSED, False),
    "repeat": (lambda x: x.repeat(1, 2, 1, 1), 2, LOCAL, True),
    torch.stack: (
        lambda x: torch.stack([x, x.flip(1) * 2], dim=-3).sum(2),
        2,
        LOCAL,
        True,
    ),  # (N, C, new, H, W)
    # a flip over channels reorders them at each position; over space it mirrors about the tile's middle
    "flip": (lambda x: x * x.flip(1), 2, LOCAL, True),
    torch.flip: (lambda x: x * torch.flip(x, (3,)), 2, REFUSED, False),
    torch.fliplr: (lambda x: x * torch.fliplr(x), 2, LOCAL, True),  # dim 1: the channels of (N, C, H, W)
    torch.flipud: (lambda x: x * torch.flipud(x), 2, LOCAL, True),  # dim 0: the batch
    torch.mean: (lambda x: x - torch.mean(x, dim=1, keepdim=True), 2, LOCAL, True),
    "mean": (lambda x: x - x.mean((2, 3), keepdim=True), 2, REFUSED, False),
    torch.sum: (lambda x: torch.sum(x), 2, REFUSED, False),
    "sum": (lambda x: x * x.sum(1, keepdim=True), 2, LOCAL, True),
    torch.amax: (lambda x: torch.amax(x, 1, keepdim=True), 2, LOCAL, True),
    "amax": (lambda x: x.amax(-1, keepdim=True), 2, REFUSED, False),
    torch.amin: (lambda x: torch.amin(x, (0, 1), keepdim=True), 2, LOCAL, True),
    "amin": (lambda x: x.amin(), 2, REFUSED, False),
    F.layer_norm: (lambda x: F.layer_norm(x, x.shape[-2:]), 2, REFUSED, False),
    F.rms_norm: (lambda x: F.rms_norm(x.permute(0, 2, 3, 1), (4,)).permute(0, 3, 1, 2), 2, LOCAL, True),
    F.linear: (
        lambda x: F.linear(x.permute(0, 2, 3, 1), torch.ones(3, 4, dtype=x.dtype)).permute(0, 3, 1, 2),
        2,
        LOCAL,
        True,
    ),
    F.glu: (lambda x: F.glu(x, 1), 2, LOCAL, True),
    F.dropout: (lambda x: F.dropout(x, 0.3, training=False), 2, LOCAL, True),
    F.dropout1d: (lambda x: F.dropout1d(x, 0.3, training=True), 1, REFUSED, False),
    F.dropout2d: (lambda x: F.dropout2d(x, 0.0), 2, LOCAL, True),
    F.dropout3d: (lambda x: F.dropout3d(x, 0.3, False), 3, LOCAL, True),
    "torchvision.ops.stochastic_depth.stochastic_depth": (
        lambda x: torchvision.ops.stochastic_depth(x, 0.3, "row", training=False),
        2,
        LOCAL,
        True,
    ),
    getattr: (lambda x: x.mT, 2, REFUSED, False),
    "max": (lambda x: x.max(1)[0], 2, REFUSED, False),
    torch.max: (lambda x: torch.max(x), 2, REFUSED, False),
    F.adaptive_avg_pool1d: (lambda x: F.adaptive_avg_pool1d(x, 1), 1, REFUSED, False),
    F.adaptive_avg_pool2d: (lambda x: F.adaptive_avg_pool2d(x, 1), 2, REFUSED, False),
    F.adaptive_avg_pool3d: (lambda x: F.adaptive_avg_pool3d(x, 1), 3, REFUSED, False),
    F.adaptive_max_pool2d: (lambda x: F.adaptive_max_pool2d(x, 1), 2, REFUSED, False),
    F.scaled_dot_product_attention: (lambda x: F.scaled_dot_product_attention(x, x, x), 2, REFUSED, False),
    # with running statistics in eval mode: an affine map per channel (timm's BatchNormAct2d traced through)
    F.batch_norm: (
        lambda x: F.batch_norm(x, *(torch.rand(4, dtype=x.dtype) + 0.5 for _ in range(3))),
        2,
        LOCAL,
        True,
    ),
    F.group_norm: (lambda x: F.group_norm(x, 2), 2, REFUSED, False),
    F.instance_norm: (lambda x: F.instance_norm(x), 2, REFUSED, False),
}


class _Tokens(nn.Module):
    """A 1D map as tokens (N, L, C) through ``block``, back to (N, C, L): how transformers call attention."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x.transpose(1, 2)).transpose(1, 2)


def _monai_attention():
    from monai.networks.blocks.selfattention import SABlock

    return _Tokens(SABlock(hidden_size=4, num_heads=1))


FUNCTIONS["monai.networks.blocks.selfattention.SABlock"] = (_monai_attention(), 1, REFUSED, False)


def _timm_same():
    from timm.layers import Conv2dSame
    from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
    from timm.layers.std_conv import ScaledStdConv2dSame, StdConv2dSame

    return {
        "timm.layers.std_conv.StdConv2dSame": StdConv2dSame(4, 4, 3, stride=2),
        "timm.layers.std_conv.ScaledStdConv2dSame": ScaledStdConv2dSame(4, 4, 3, stride=2),
        "timm.layers.conv2d_same.Conv2dSame": Conv2dSame(4, 4, 3, stride=2),
        "timm.layers.pool2d_same.MaxPool2dSame": MaxPool2dSame(3, stride=2),
        "timm.layers.pool2d_same.AvgPool2dSame": AvgPool2dSame(3, stride=2),
    }


# 'same' padding computed per input: tiles of other sizes are padded differently (odd and even extents)
FUNCTIONS.update({name: (layer, 2, REFUSED, False) for name, layer in _timm_same().items()})


class _Call(nn.Module):
    """A 1x1 convolution (so the trace knows the channels) followed by the call under test."""

    def __init__(self, call, ndim: int, channels: int = 4):
        super().__init__()
        self.first = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1](channels, channels, 1)
        self.call = call

    def forward(self, x):
        return self.call(self.first(x))


def _key(target) -> str:
    return target if isinstance(target, str) else f"{getattr(target, '__module__', '')}.{target.__qualname__}"


def _tilegrads(registry):
    """The entries tilegrad registers itself (tests and doctests register rules for their own layers too)."""
    ours = ("torch", "tilegrad.", "_operator", "builtins")
    return [
        t
        for t, rule in registry.items()
        if getattr(rule, "__module__", "").startswith("tilegrad.")
        # the statistics rules apply only to the nodes rewrite_statistics creates; tests/test_statistics.py checks
        # them against the plain computation (NOTE [ Streamed statistics ])
        and getattr(rule, "__module__", "") != "tilegrad.statistics"
        and (isinstance(t, str) or getattr(t, "__module__", "").startswith(ours))
    ]


def test_every_registered_rule_has_a_contract_case():
    missing = [_key(t) for t in _tilegrads(toolkit._MODULE_RULES) if t not in MODULES]
    missing += [_key(t) for t in _tilegrads(toolkit._FUNCTION_RULES) if t not in FUNCTIONS]
    assert not missing, f"add a contract case for: {missing}"


def _measured(module: nn.Module, ndim: int, channels: int, size: int):
    """Per spatial dim: the output index probed, the input range its gradient reaches, and the output sizes at
    two input sizes (for the stride)."""
    torch.manual_seed(0)
    x = torch.randn(1, channels, *(size,) * ndim, dtype=torch.float64, requires_grad=True)
    y = module(x)
    centre = tuple(s // 2 for s in y.shape[2:])
    y[(0, 0, *centre)].backward()
    reached = x.grad.abs().sum(dim=(0, 1)) > 0
    spans = []
    for d in range(ndim):
        others = tuple(i for i in range(ndim) if i != d)
        nonzero = (reached.sum(dim=others) if others else reached).nonzero().flatten()
        spans.append((int(nonzero.min()), int(nonzero.max())) if len(nonzero) else None)
    return centre, spans, tuple(y.shape[2:])


def _check(module: nn.Module, ndim: int, channels: int, expectation: str, tight: bool):
    module = module.double()
    if expectation == REFUSED:
        with pytest.raises(NotStreamableError):
            module_geometry(module, ndim)
        return
    geometry = module_geometry(module, ndim)
    size = {1: 40, 2: 20, 3: 10}[ndim]
    centre, spans, out = _measured(module, ndim, channels, size)
    for d, (dim, o, span) in enumerate(zip(geometry.dims, centre, spans)):
        assert span is not None, f"dim {d}: the probed output does not depend on the input"
        lo, hi = o * dim.stride + dim.lo, o * dim.stride + dim.hi
        declared = (max(0, math.ceil(lo)), min(size - 1, math.floor(hi)))
        assert declared[0] <= span[0] and span[1] <= declared[1], (
            f"dim {d}: reaches {span}, declared {declared}"
        )
        if tight:
            assert span == declared, f"dim {d}: reaches {span}, declared {declared}"
    # the stride: growing the input by 4 strides' numerators grows the output by as many denominators
    grow = [4 * d.stride.numerator for d in geometry.dims]
    x = torch.zeros(1, channels, *(size + g for g in grow), dtype=torch.float64)
    with torch.no_grad():
        bigger = module(x).shape[2:]
    for d, (dim, a, b, g) in enumerate(zip(geometry.dims, out, bigger, grow)):
        assert Fraction(b - a) == Fraction(g) / dim.stride, f"dim {d}: stride {dim.stride}, sizes {a} -> {b}"


@pytest.mark.parametrize("target", list(MODULES), ids=[t.__name__ for t in MODULES])
def test_module_rules_match_the_measured_receptive_field_or_refuse(target):
    factory, ndim, channels, expectation, tight = MODULES[target]
    _check(factory(), ndim, channels, expectation, tight)


@pytest.mark.parametrize("target", list(FUNCTIONS), ids=[_key(t) for t in FUNCTIONS])
def test_function_rules_match_the_measured_receptive_field_or_refuse(target):
    call, ndim, expectation, tight = FUNCTIONS[target]
    _check(_Call(call, ndim), ndim, 4, expectation, tight)


@pytest.mark.parametrize(
    "call, expectation",
    [
        (lambda x: x.flip(1, 0), LOCAL),  # dims as separate arguments
        (lambda x: x.flip(dims=[-3]), LOCAL),
        (lambda x: torch.flip(x, [1]), LOCAL),
        (lambda x: x.flip((2,)), REFUSED),
        (lambda x: x.flip(-1), REFUSED),
        (lambda x: torch.flip(x, (1, 2)), REFUSED),
        (lambda x: x.permute(0, 2, 3, 1).flip(-1).permute(0, 3, 1, 2), LOCAL),  # the channels, last
        (lambda x: x.permute(0, 2, 3, 1).flip(1).permute(0, 3, 1, 2), REFUSED),  # the height, second
    ],
)
def test_flip_is_local_over_batch_and_channel_dims_only(call, expectation):
    _check(_Call(call, 2), 2, 4, expectation, expectation == LOCAL)


def test_a_spatial_flip_says_why():
    with pytest.raises(NotStreamableError, match=r"flips dims \(3,\) of \(N, C, H, W\), a spatial dim"):
        module_geometry(_Call(lambda x: x.flip(3), 2), 2)


def test_monai_attention_is_refused_as_attention():
    # registered by its qualified name (MONAI is not imported by tilegrad); traced through, it failed inside einops
    # with "KeyError: Proxy(getattr_1)" (issue 12: refusals that say why)
    with pytest.raises(
        NotStreamableError, match=r"'call.block' \(SABlock\).*attention over all positions is global"
    ):
        module_geometry(_Call(_monai_attention(), 1), 1)


@pytest.mark.parametrize("name", list(_timm_same()))
def test_timm_same_padding_is_refused_not_taken_for_its_base_class(name):
    # a subclass of nn.Conv2d / nn.MaxPool2d with padding 0 that pads in forward: the base class's rule would miss
    # the padding (timm's NASNet planned with it and a tile's output came out empty)
    with pytest.raises(NotStreamableError, match="'same' padding is computed from the size of each input"):
        module_geometry(_Call(_timm_same()[name], 2), 2)
