"""The one resolver of model specs (tilegrad/models/resolve.py) that every command uses."""

from __future__ import annotations

import importlib
import sys

import pytest
from torch import nn

from tilegrad import ConfigError
from tilegrad.models.resolve import find_model, resolve_model


def test_sources_in_order(tmp_path):
    path = tmp_path / "my_nets.py"
    path.write_text("from torch import nn\ndef build():\n    return nn.Conv2d(1, 1, 1)\n")
    assert find_model(f"{path}:build").source == "factory"
    assert find_model("torch.nn:Identity").source == "factory"
    assert find_model("ESPCN3d").source == "tilegrad" and find_model("espcn3d").label == "ESPCN3d"
    assert find_model("small_cnn").source == "tilegrad"
    assert find_model("ResNet18").source == "torchvision"
    factory, label = resolve_model(f"{path}:build")
    assert isinstance(factory(), nn.Conv2d) and label == f"{path}:build"


def test_mistakes_are_config_errors_with_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'resnet81'.*Did you mean resnet18"):
        find_model("resnet81")
    with pytest.raises(ConfigError, match="does not exist"):
        find_model(str(tmp_path / "missing.py") + ":build")
    with pytest.raises(ConfigError, match="takes no arguments"):
        find_model("torch.nn:Conv2d").module()
    with pytest.raises(ConfigError, match="returned int"):
        find_model("builtins:int").module()


def test_the_old_path_warns_and_still_resolves():
    sys.modules.pop("tilegrad.memory.resolve", None)
    with pytest.warns(DeprecationWarning, match="tilegrad.models.resolve"):
        old = importlib.import_module("tilegrad.memory.resolve")
    factory, label = old.resolve_model("torch.nn:Identity")
    assert isinstance(factory(), nn.Identity) and label == "torch.nn:Identity"
