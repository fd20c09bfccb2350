"""split_model on MONAI's classification networks: head(trunk(x)) == model(x), and the trunk is streamable."""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets

import tilegrad

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
