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


# The same refusals where users meet them: planning a streamed step or tiled inference (tilegrad/graph.py traces the
# whole model). Before, these named a trace node or a trace failure: UNETR and ViT "flatten merges spatial positions"
# at the patch embedding, AutoencoderKL a reshape inside its attention block, ControlNet and DiffusionModelUNet
# "symbolically traced variables cannot be used as inputs to control flow", SwinUNETR "invalid __array_struct__".
PLANNED = [
    (
        "MONAI UNETR",
        lambda: nets.UNETR(in_channels=1, out_channels=2, img_size=(32, 32, 32)),
        [
            "'vit.blocks.0.attn' (SABlock) in UNETR",
            "attention over all positions is global",
            "run the model whole",
        ],
    ),
    (
        "MONAI ViT",
        lambda: nets.ViT(in_channels=1, img_size=(32, 32, 32), patch_size=16),
        ["'blocks.0.attn' (SABlock) in ViT", "attention over all positions is global"],
    ),
    (
        "MONAI AutoencoderKL",
        lambda: nets.AutoencoderKL(spatial_dims=3),
        [
            "'encoder.blocks.8.attn' (SABlock) in AutoencoderKL",
            "The blocks before 'encoder.blocks.8' are local",
        ],
    ),
    (
        "MONAI ControlNet",
        lambda: nets.ControlNet(spatial_dims=3, in_channels=1),
        ["'down_blocks.2.attentions.0.attn' (SABlock) in ControlNet", "before 'down_blocks.2' are local"],
    ),
    (
        "MONAI DiffusionModelUNet",
        lambda: nets.DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=2),
        ["'down_blocks.2.attentions.0.attn' (SABlock) in DiffusionModelUNet", "attention over all positions"],
    ),
    (
        "MONAI SwinUNETR",
        lambda: nets.SwinUNETR(in_channels=1, out_channels=2, feature_size=24),
        ["(WindowAttention) in SwinUNETR", "attention over all positions is global", "run the model whole"],
    ),
]


@pytest.mark.parametrize("case, factory, words", PLANNED, ids=[c[0] for c in PLANNED])
def test_planning_refusals_name_the_layer_and_the_cause(case, factory, words):
    torch.manual_seed(0)
    model = factory().eval()
    for training in (True, False):  # a streamed step, tiled inference
        with pytest.raises(NotStreamableError) as info:
            tilegrad.plan_streaming(model, (1, 1, 32, 32, 32), tile_size=24, mode="stages", training=training)
        for word in words:
            assert word in str(info.value), case


def test_a_model_that_rejects_the_size_in_its_own_forward_is_named_with_the_size_it_takes():
    """MONAI's AHNet pools 32x32 and 64x64 windows of a half-resolution map in its PSP block: its own forward fails
    below 128 px in-plane. The refusal names the layer and says which size runs."""
    model = nets.AHNet().eval()
    with pytest.raises(tilegrad.GeometryError) as info:
        tilegrad.plan_streaming(model, (1, 1, 32, 32, 32), tile_size=24, mode="stages")
    message = str(info.value)
    assert "in layer 'psp.pool_modules.2' (MaxPool3d in PSP)" in message
    assert "Output size is too small" in message and "While executing" not in message
    assert "model's own forward" in message and "(1, 1, 128, 128, 128), 4x larger" in message
    with pytest.raises(RuntimeError, match="Output size is too small"), torch.no_grad():  # as the plain model
        model(torch.zeros(1, 1, 32, 32, 32))


class _PoolBesideAttention(nn.Module):
    """A global pooling branch computed before, and apart from, an attention branch."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x):
        gate = self.pool(self.c2(x))
        n, _, h, w = x.shape
        t = self.c1(x).flatten(2).transpose(1, 2)
        return self.attn(t, t, t)[0].transpose(1, 2).reshape(n, 4, h, w) + gate


def test_a_refusal_that_feeds_no_attention_is_not_blamed_on_it():
    # review: any refusal in a model holding attention anywhere was rewritten as "attention is global"
    with pytest.raises(NotStreamableError) as info:
        tilegrad.receptive_field(_PoolBesideAttention(), ndim=2)
    assert "'pool' (AdaptiveAvgPool2d)" in str(info.value) and "attention" not in str(info.value)


def test_an_attention_layer_directly_in_a_sequential_names_the_layers_before_it():
    # review: the way forward read "blocks before '.2' ... an nn.Sequential of [:2]"
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            n, c, h, w = x.shape
            t = x.flatten(2).transpose(1, 2)
            return self.attn(t, t, t)[0].transpose(1, 2).reshape(n, c, h, w)

    class Attention(Tokens):  # the name marks it as attention, as timm's and MONAI's blocks are
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Attention())
    with pytest.raises(NotStreamableError) as info:
        tilegrad.receptive_field(model, ndim=2)
    assert "The layers before '2' are local" in str(info.value) and "model[:2]" in str(info.value)
    assert "'.2'" not in str(info.value)
