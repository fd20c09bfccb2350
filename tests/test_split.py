"""split_model on torchvision and MONAI classification networks and nn.Sequential: head(trunk(x)) == model(x),
and the trunk is streamable."""

from __future__ import annotations

import pytest
import torch
import torchvision
from monai.networks import nets
from torch import nn

import tilegrad
from tilegrad import ConfigError
from tilegrad.split import streamable_part

# (case, factory, input shape)
MONAI_CASES = [
    # features + class_layers (relu, pool, flatten, linear); was "cannot split DenseNet121 at None"
    (
        "DenseNet121 2D",
        lambda: nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=2),
        (1, 3, 64, 64),
    ),
    ("resnet18 2D", lambda: nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=2), (1, 3, 64, 64)),
    # regression: MONAI keeps the maxpool child but its forward skips it; the trunk included it
    (
        "resnet18 2D no_max_pool",
        lambda: nets.resnet18(spatial_dims=2, n_input_channels=3, num_classes=2, no_max_pool=True),
        (1, 3, 64, 64),
    ),
    (
        "resnet10 3D",
        lambda: nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=3),
        (1, 1, 32, 32, 32),
    ),
]


@pytest.mark.parametrize("case, factory, shape", MONAI_CASES, ids=[c[0] for c in MONAI_CASES])
def test_monai_classifiers_split_exactly(case, factory, shape):
    torch.manual_seed(0)
    model = factory().eval()
    trunk, head = tilegrad.split_model(model)
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.allclose(head(trunk(x)), model(x), atol=1e-5), case
    assert not any(isinstance(m, torch.nn.Linear) for m in trunk.modules())
    tilegrad.receptive_field(trunk, ndim=len(shape) - 2)  # the trunk is local: no NotStreamableError


def test_monai_densenet_rejects_other_split_points():
    with pytest.raises(tilegrad.ConfigError, match="split after 'features'"):
        tilegrad.split_model(
            nets.DenseNet121(spatial_dims=2, in_channels=3, out_channels=2), at="features.norm5"
        )


def test_split_model_resnet_vgg_densenet_sequential():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    for factory in (torchvision.models.resnet18, torchvision.models.vgg11, torchvision.models.densenet121):
        model = factory().eval()
        trunk, head = tilegrad.split_model(model)
        with torch.no_grad():
            assert torch.allclose(head(trunk(x)), model(x), atol=1e-6), factory.__name__
        tilegrad.receptive_field(trunk, ndim=2)  # the trunk is streamable
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    trunk, head = tilegrad.split_model(seq)
    assert len(trunk) == 1 and torch.allclose(head(trunk(x)), seq(x))
    with pytest.raises(ConfigError, match="expected the name of one of its children"):
        tilegrad.split_model(seq, at="nope")


class _PoolingInside(nn.Module):
    """A dense network whose only global pooling sits inside a block (a squeeze-excitation gate), no head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 4, 1), nn.Sigmoid())
        self.out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        return self.out(x * self.gate(x))


def test_a_model_without_a_head_among_its_children_is_streamed_whole():
    # torchvision's DeepLabV3 (the ASPP pooling branch) and the transformers were refused with "cannot split ... at
    # None": streamed whole, the refusal names the layer that cannot stream; this one streams
    model = _PoolingInside()
    with pytest.raises(ConfigError, match=r"none of its children is a head layer.*pass at="):
        tilegrad.split_model(model)
    trunk, head = streamable_part(model)
    assert trunk is model and head is None
    tilegrad.plan_streaming(model, (1, 3, 64, 64), tile_size=32, mode="stages")
    deeplab = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None
    )
    with pytest.raises(tilegrad.NotStreamableError, match=r"inside 'classifier.0' \(ASPP\)"):
        tilegrad.plan_streaming(streamable_part(deeplab)[0], (1, 3, 64, 64), tile_size=32)


timm = pytest.importorskip("timm")
tv = torchvision.models
SE = "SqueezeExcitation"  # refused inside the trunk until squeeze-and-excitation is streamed

# (case, factory, input side, None when the trunk is local or the words of its refusal); each was refused by
# split_model before ("split_model knows torchvision and MONAI ResNet ..."), timm's ResNet failed on at='avgpool'
FAMILIES = [
    ("MobileNetV2", tv.mobilenet_v2, 64, None),
    ("MobileNetV3", tv.mobilenet_v3_small, 64, [SE, "AdaptiveAvgPool2d"]),
    ("EfficientNet-B0", tv.efficientnet_b0, 64, [SE, "squeeze-and-excitation"]),
    pytest.param("EfficientNetV2-S", tv.efficientnet_v2_s, 64, [SE], marks=pytest.mark.slow),
    ("RegNetX", tv.regnet_x_400mf, 64, None),
    ("RegNetY", tv.regnet_y_400mf, 64, [SE, "trunk_output.block1"]),
    ("ConvNeXt", tv.convnext_tiny, 64, None),
    ("ShuffleNetV2", tv.shufflenet_v2_x0_5, 64, None),
    ("MNASNet", tv.mnasnet0_5, 64, None),
    ("SqueezeNet", tv.squeezenet1_1, 64, None),
    ("GoogLeNet", lambda: tv.googlenet(init_weights=True), 64, None),
    pytest.param("Inception3", lambda: tv.inception_v3(init_weights=True), 96, None, marks=pytest.mark.slow),
    ("timm resnet18", lambda: timm.create_model("resnet18"), 64, None),
    ("timm convnext_atto", lambda: timm.create_model("convnext_atto"), 64, None),
    pytest.param(
        "timm efficientnet_b0",
        lambda: timm.create_model("efficientnet_b0"),
        64,
        ["SqueezeExcite", "mean over positions"],
        marks=pytest.mark.slow,
    ),
    (
        "MONAI SEResNet50",
        lambda: nets.SEResNet50(spatial_dims=2, in_channels=3, num_classes=2),
        64,
        ["ChannelSELayer", "AdaptiveAvgPool2d"],
    ),
    (
        "MONAI EfficientNetBN",
        lambda: nets.EfficientNetBN(
            "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3, num_classes=2
        ),
        64,
        ["_se_adaptpool"],
    ),
    (
        "MONAI Classifier",
        lambda: nets.Classifier(in_shape=(3, 32, 32), classes=2, channels=(4, 8), strides=(2, 2)),
        32,
        ["InstanceNorm2d"],
    ),
    # Critic's forward ends in a mean over the flattened map and a view (N, 1), not Regressor's reshape (was
    # RuntimeError: shape '[1, 1]' is invalid for input of size ...)
    (
        "MONAI Critic",
        lambda: nets.Critic(in_shape=(3, 32, 32), channels=(4, 8), strides=(2, 2)),
        32,
        ["InstanceNorm2d"],
    ),
]


@pytest.mark.parametrize(
    "case, factory, side, refusal", FAMILIES, ids=[getattr(c, "values", c)[0] for c in FAMILIES]
)
def test_families_split_exactly_and_the_trunk_is_local_or_refused_by_name(case, factory, side, refusal):
    torch.manual_seed(0)
    model = factory().eval().double()
    x = torch.randn(1, 3, side, side, dtype=torch.float64)
    trunk, head = tilegrad.split_model(model)
    with torch.no_grad():
        assert torch.equal(head(trunk(x)), model(x)), case
    if refusal is None:
        tilegrad.receptive_field(trunk, ndim=2)  # the trunk is local: no NotStreamableError
    else:
        with pytest.raises(tilegrad.NotStreamableError) as info:
            tilegrad.receptive_field(trunk, ndim=2)
        for word in refusal:
            assert word in str(info.value), case


def test_timm_split_points_use_timms_names():
    model = timm.create_model("resnet18").eval()
    for at in ("global_pool", "avgpool", "forward_head"):  # timm calls the pooling global_pool
        trunk, head = tilegrad.split_model(model, at=at)
        assert trunk.method == "forward_features" and head.method == "forward_head"
    with pytest.raises(ConfigError, match="between forward_features and forward_head"):
        tilegrad.split_model(model, at="layer3")


def test_timm_features_only_is_a_trunk_with_one_map():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", features_only=True, out_indices=(3,)).eval().double()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    trunk, head = tilegrad.split_model(model)
    with torch.no_grad():
        assert torch.equal(head(trunk(x)), model(x)[0])
    assert tilegrad.receptive_field(trunk, ndim=2).stride == (16, 16)
    several = timm.create_model("resnet18", features_only=True, out_indices=(2, 3))
    with pytest.raises(tilegrad.NotStreamableError, match=r"returns 2 feature maps.*out_indices=\(i,\)"):
        tilegrad.split_model(several)


def test_family_split_points_are_checked():
    with pytest.raises(ConfigError, match="MobileNetV2 is split after 'features'"):
        tilegrad.split_model(tv.mobilenet_v2(), at="classifier.1")
    with pytest.raises(ConfigError, match="aux_logits"):
        tilegrad.split_model(tv.googlenet(init_weights=True).train())


def test_timm_vgg_splits_by_timms_contract():
    # timm's VGG shares torchvision's class name but has no avgpool (was AttributeError: 'VGG' object has no
    # attribute 'avgpool'); on the meta device: 133M parameters
    with torch.device("meta"):
        model = timm.create_model("vgg11")
    trunk, head = tilegrad.split_model(model)
    assert trunk.method == "forward_features" and head.method == "forward_head"


@pytest.mark.parametrize("name", ["EfficientNetBNFeatures", "EfficientNetEncoder"])
def test_monai_feature_extractors_returning_lists_are_refused_in_words(name):
    # their forward returns one map per stage (was AttributeError: 'list' object has no attribute 'shape')
    with torch.device("meta"):
        model = getattr(nets, name)("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=3)
    with pytest.raises(
        tilegrad.NotStreamableError, match=f"{name} returns the feature maps of several stages"
    ):
        tilegrad.split_model(model)


@pytest.mark.parametrize(
    "kwargs, size",
    [
        ({}, 224),  # MONAI's default pool: average over 7x7, stride 1, then flatten and a Linear
        ({"pool": None, "use_conv": True}, 64),  # torchvision's own pooling kept, fc a 1x1 convolution
    ],
    ids=["default", "pool=None use_conv"],
)
def test_monai_torchvision_fc_model_splits_exactly(kwargs, size):
    # was "cannot split TorchVisionFCModel ... forward may not be a plain chain of its children"
    torch.manual_seed(0)
    model = nets.TorchVisionFCModel("resnet18", num_classes=3, pretrained=False, **kwargs).eval()
    trunk, head = tilegrad.split_model(model)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(head(trunk(x)), model(x), atol=1e-5)
    assert not any(isinstance(m, (nn.Linear, nn.AdaptiveAvgPool2d)) for m in trunk.modules())
    tilegrad.receptive_field(trunk, ndim=2)


@pytest.mark.parametrize(
    "name, kwargs, cause",
    [
        ("MILModel", {"num_classes": 2, "pretrained": False}, "bag of patches.*AttentionMIL"),
        ("ResNetFeatures", {"model_name": "resnet10", "pretrained": False}, "several stages"),
        ("ResNetEncoder", {"model_name": "resnet10", "pretrained": False}, "several stages"),
        (
            "VarAutoEncoder",
            {
                "spatial_dims": 3,
                "in_shape": (1, 32, 32, 32),
                "out_channels": 2,
                "latent_size": 8,
                "channels": (8, 16),
                "strides": (2, 2),
            },
            "latent code.*global.*AutoEncoder",
        ),
        ("SegResNetVAE", {"input_image_size": (32, 32, 32)}, "VAE branch.*SegResNet"),
        (
            "GlobalNet",
            {
                "spatial_dims": 3,
                "in_channels": 1,
                "num_channel_initial": 8,
                "depth": 2,
                "image_size": (32, 32, 32),
            },
            "affine.*LocalNet",
        ),
    ],
)
def test_monai_networks_that_cannot_stream_say_why(name, kwargs, cause):
    # these were refused with "cannot split X ... forward may not be a plain chain of its children"
    model = getattr(nets, name)(**kwargs)
    with pytest.raises(tilegrad.NotStreamableError, match=cause) as info:
        streamable_part(model)
    assert str(info.value).startswith(name) and "cannot split" not in str(info.value)
