"""Refusals that say why in the user's words, naming the module path and the layer type, with a way forward: the
segmentation and transformer networks of torchvision and MONAI at their default arguments (small inputs)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from monai.networks import nets
from torch import nn

import tilegrad
from tilegrad import NotStreamableError

seg = torchvision.models.segmentation


# (case, factory, spatial rank, words the refusal must contain); each failed before on a trace node instead of the
# cause: "function getattr (node 'getattr_1')" (FCN, DeepLabV3, ViT), "KeyError: Proxy(getattr_1)" (UNETR),
# "invalid __array_struct__" (SwinUNETR)
CASES = [
    (
        "FCN: the final resize to the input's size",
        lambda: seg.fcn_resnet50(weights=None, weights_backbone=None),
        2,
        ["F.interpolate(size=...) fixes the output size", "in FCN.forward", "model.backbone.values()"],
    ),
    (
        "DeepLabV3: the ASPP image pooling branch",
        lambda: seg.deeplabv3_resnet50(weights=None, weights_backbone=None),
        2,
        ["'classifier.0.convs.4.0' (AdaptiveAvgPool2d in ASPPPooling)", "ASPP pooling"],
    ),
    (
        "torchvision ViT",
        lambda: torchvision.models.vit_b_16(),
        2,
        [
            "'encoder.layers.encoder_layer_0.self_attention' (MultiheadAttention)",
            "attention over all positions",
        ],
    ),
    (
        "MONAI UNETR",
        lambda: nets.UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32)),
        3,
        ["'vit.blocks.0.attn' (SABlock) in UNETR", "attention over all positions is global"],
    ),
    (
        "MONAI SwinUNETR",
        lambda: nets.SwinUNETR(in_channels=1, out_channels=2),
        3,
        ["(WindowAttention) in SwinUNETR", "attention over all positions is global", "window"],
    ),
]


@pytest.mark.parametrize("case, factory, ndim, words", CASES, ids=[c[0] for c in CASES])
def test_refusals_name_the_layer_and_the_cause(case, factory, ndim, words):
    torch.manual_seed(0)
    with pytest.raises(NotStreamableError) as info:
        tilegrad.receptive_field(factory().eval(), ndim=ndim)
    for word in words:
        assert word in str(info.value), case


def test_the_way_forward_for_fcn_streams_its_backbone():
    # what the FCN refusal suggests: the backbone's layers as a trunk, then the classifier and the resize
    torch.manual_seed(0)
    model = seg.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3).eval().double()
    trunk = nn.Sequential(*model.backbone.values())
    assert tilegrad.receptive_field(trunk, ndim=2).stride == (8, 8)  # FCN's dilated ResNet keeps stride 8
    x = torch.randn(1, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        y = nn.functional.interpolate(model.classifier(trunk(x)), size=x.shape[-2:], mode="bilinear")
        assert torch.equal(y, model(x)["out"])


def test_global_pooling_in_a_trunk_names_the_block_it_sits_in():
    se = torchvision.models.efficientnet_b0().features[:2].eval()
    with pytest.raises(
        NotStreamableError, match=r"AdaptiveAvgPool2d in SqueezeExcitation\).*squeeze-and-excitation"
    ):
        tilegrad.receptive_field(se, ndim=2)
