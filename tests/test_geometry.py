"""Receptive-field geometry (tilegrad/geometry/): known receptive fields, fractional strides, and the layers that
are refused, named in the error."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torchvision
from torch import nn

import tilegrad
from tilegrad import NotStreamableError, StreamingModule


def test_receptive_field_known_values():
    rf = tilegrad.receptive_field(tilegrad.split_model(torchvision.models.resnet34())[0].eval(), ndim=2)
    assert rf.stride == (32, 32) and rf.size == (899, 899)  # the published ResNet-34 receptive field
    vgg = tilegrad.receptive_field(torchvision.models.vgg16().features, ndim=2)
    assert vgg.size == (212, 212) and vgg.stride == (32, 32)  # the published VGG-16 value
    one = tilegrad.receptive_field(nn.Conv3d(1, 1, (3, 5, 7), stride=(1, 2, 2), padding=(1, 2, 3)), ndim=3)
    assert one.halo == ((1, 1), (2, 1), (3, 2)) and one.stride == (1, 2, 2)


def test_receptive_field_upsampling_has_fractional_stride():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.PixelShuffle(2))
    rf = tilegrad.receptive_field(net, ndim=2)

    assert rf.stride == (Fraction(1, 2), Fraction(1, 2))


@pytest.mark.parametrize(
    ("layer", "names"),
    [
        # (module to stream, words the error must contain)
        # (BatchNorm in training mode, InstanceNorm and GroupNorm stream: tests/test_statistics.py)
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1)), ["AdaptiveAvgPool2d", "head"]),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), ["Flatten"]),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2)), ["Linear"]),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5).train()), ["Dropout", "training mode"]),
        (nn.Sequential(nn.Upsample(size=(8, 8))), ["fixed size"]),
        (nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)), ["align_corners"]),
        (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular")), ["circular"]),
    ],
)
def test_refuses_non_local_layers_naming_them(layer, names):
    with pytest.raises(NotStreamableError) as info:
        StreamingModule(layer, 16)(torch.randn(1, 1, 32, 32))
    for word in names:
        assert word in str(info.value)


def test_refuses_attention_and_global_mean_in_a_graph():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.conv(x) * x.mean(dim=(2, 3), keepdim=True)

    with pytest.raises(NotStreamableError, match="mean"):
        tilegrad.receptive_field(Attn(), ndim=2)
    with pytest.raises(NotStreamableError, match="attention"):
        tilegrad.receptive_field(nn.MultiheadAttention(4, 1), ndim=2)


def test_names_of_the_old_geometry_module_still_import():
    # geometry.py became a package; every name imported from it before still comes from tilegrad.geometry
    from tilegrad.geometry import (  # noqa: F401
        ACTIVATIONS,
        DimGeometry,
        Geometry,
        ReceptiveField,
        compose,
        module_geometry,
        receptive_field,
        register_geometry_rule,
    )


def test_a_custom_layer_taught_with_the_toolkit_streams_exactly():
    from tilegrad.geometry import Context, merge, window

    class BlurAdd(nn.Module):
        """x + a 5-tap box blur of x, written with functional calls the tracer does not see inside."""

        def forward(self, x):
            return x + torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)

    def rule(ctx: Context, module, node, inputs):
        return merge(ctx, [inputs[0], window(ctx, inputs, kernel=5, stride=1, padding=2)])

    tilegrad.register_geometry_rule(BlurAdd, rule)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), BlurAdd(), nn.Conv2d(2, 1, 3, padding=1)).double()
    assert tilegrad.receptive_field(net, ndim=2).halo == ((4, 4), (4, 4))
    x = torch.randn(1, 1, 40, 33, dtype=torch.float64, requires_grad=True)
    y = StreamingModule(net, 16, mode="lean")(x)
    assert torch.allclose(y, net(x), atol=1e-12, rtol=0)
