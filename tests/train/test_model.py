"""Slide classifiers: model sources, the split into trunk and head, frozen normalisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tilegrad
from tilegrad import ConfigError
from tilegrad.train import PoolingHead, build_model


def test_torchvision_resnet_splits_into_trunk_and_pooling_head():
    model = build_model("resnet18", 3)
    assert isinstance(model.head, PoolingHead) and model.head.fc.out_features == 3
    assert model.head.fc.in_features == 512
    assert not any(isinstance(m, (nn.Linear, nn.AdaptiveAvgPool2d)) for m in model.trunk.modules())
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 3)


def test_freeze_norm_keeps_batchnorm_in_eval_mode_with_frozen_statistics():
    model = build_model("resnet18", 2).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(bn.training for bn in bns)
    before = bns[0].running_mean.clone()
    model(torch.rand(1, 3, 64, 64)).sum().backward()
    assert torch.equal(bns[0].running_mean, before)
    assert bns[0].weight.grad is not None  # affine parameters still train
    unfrozen = build_model("resnet18", 2, freeze_norm=False).train()
    assert all(m.training for m in unfrozen.modules() if isinstance(m, nn.BatchNorm2d))


def test_factory_spec_module_or_pair(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "def pair(channels=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, channels, 3), nn.ReLU()), nn.Sequential(nn.Flatten(2),"
        " nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(channels, 2))\n"
        "def not_a_model():\n"
        "    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("mynets:pair", 2, model_kwargs={"channels": 6})
    assert model.trunk[0].out_channels == 6
    assert model(torch.rand(1, 3, 20, 20)).shape == (1, 2)
    with pytest.raises(ConfigError, match="returned int"):
        build_model("mynets:not_a_model", 2)
    with pytest.raises(ConfigError, match="has no callable 'missing'"):
        build_model("mynets:missing", 2)
    with pytest.raises(ConfigError, match="cannot import"):
        build_model("no_such_module_xyz:f", 2)


def test_file_factory_spec_works_for_training_as_for_the_other_commands(tmp_path):
    # one resolver (tilegrad/models/resolve.py): path/to/file.py:factory, as tilegrad memory/plan/infer take it
    path = tmp_path / "nets_on_disk.py"
    path.write_text(
        "from torch import nn\n"
        "def classifier(width=4):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(width, 5))\n"
    )
    model = build_model(f"{path}:classifier", 2, model_kwargs={"width": 6})
    assert model.trunk[0].out_channels == 6 and isinstance(model.head, PoolingHead)
    assert model(torch.rand(1, 3, 20, 20)).shape == (1, 2)
    with pytest.raises(ConfigError, match="has no callable 'nothing'"):
        build_model(f"{path}:nothing", 2)
    with pytest.raises(ConfigError, match=r"calling .*classifier\(\*\*\{'depth': 3\}\) failed"):
        build_model(f"{path}:classifier", 2, model_kwargs={"depth": 3})


def test_built_in_models_are_the_tilegrad_models():
    from tilegrad.models import small_cnn

    model = build_model("small_cnn", 2, model_kwargs={"width": 4})
    assert type(model.trunk) is type(small_cnn()) and model.trunk[0].out_channels == 4
    with pytest.raises(ConfigError, match="no pretrained weights for the built-in model"):
        build_model("small_cnn", 2, pretrained=True)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet7'.*small_cnn"):
        build_model("resnet7", 2)


# MONAI's networks through the factory spec (issue 6 review: DenseNet121 was not split automatically)
MONAI_SPECS = [
    ("monai.networks.nets:DenseNet121", {"spatial_dims": 2, "in_channels": 3, "out_channels": 2}, 1024),
    ("monai.networks.nets:resnet18", {"spatial_dims": 2, "n_input_channels": 3, "no_max_pool": True}, 512),
]


@pytest.mark.parametrize("spec, kwargs, channels", MONAI_SPECS, ids=[s[0].split(":")[1] for s in MONAI_SPECS])
def test_monai_models_build_with_a_pooling_head_and_a_streamable_trunk(spec, kwargs, channels):
    model = build_model(spec, 2, model_kwargs=kwargs).train()
    assert isinstance(model.head, PoolingHead) and model.head.fc.in_features == channels
    if "DenseNet" in spec:  # class_layers' ReLU runs before pooling: it moved into the trunk
        assert isinstance(model.trunk[-1], nn.ReLU)
    else:  # no_max_pool: MONAI's forward skips the maxpool child
        assert "maxpool" not in dict(model.trunk.named_children())
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2)
    tilegrad.receptive_field(model.trunk, ndim=2)  # training mode, frozen BatchNorm: streamable
