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
