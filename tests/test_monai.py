"""tilegrad.monai.ExactInferer: MONAI's inferer interface over tilegrad.infer, against MONAI's own SimpleInferer.

The inferer must give what SimpleInferer gives (values to float rounding, shape, dtype, device, a MetaTensor's
metadata), inside MONAI's SupervisedEvaluator and when a bundle config names it (``_target_``).
"""

from __future__ import annotations

import monai
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.inferers import Inferer, SimpleInferer

from tilegrad import ConfigError
from tilegrad.geometry import observer_hook
from tilegrad.monai import ExactInferer

from .test_stream import rel_err


def unet_3d(dtype=torch.float64) -> torch.nn.Module:
    """A small MONAI 3D UNet with batch norm in eval mode and frozen statistics that are not the identity."""
    torch.manual_seed(0)
    net = monai.networks.nets.UNet(
        spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1,
        norm="batch",
    )  # fmt: skip
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.to(dtype).eval()


def test_is_a_monai_inferer():
    assert isinstance(ExactInferer(memory_budget="1GiB"), Inferer)


@pytest.mark.parametrize(
    "options",
    [{"tile_size": 48}, {"tile_size": (36, 48, 40), "batch_tiles": 3}, {"memory_budget": "128MiB"}],
    ids=["tile", "tile-per-dim-batched", "budget"],
)
def test_equals_simple_inferer_float64(options):
    net = unet_3d()
    x = torch.randn(2, 1, 44, 52, 60, dtype=torch.float64)
    with torch.no_grad():
        expected = SimpleInferer()(x, net)
        calls = []  # the comparison means something only if the volume was cut: count the forward calls
        net.register_forward_hook(observer_hook(lambda *_: calls.append(1)))
        got = ExactInferer(**options)(x, net)
    assert len(calls) >= 2
    assert type(got) is type(expected) and got.shape == expected.shape
    assert got.dtype == expected.dtype == torch.float64 and got.device == expected.device
    assert rel_err(got, expected) <= 1e-10


def test_a_metatensor_batch_keeps_its_metadata_as_with_simple_inferer():
    net = unet_3d(torch.float32)
    items = [
        {"image": MetaTensor(torch.randn(1, 36, 40, 44), affine=torch.diag(torch.tensor([2.0, 2, 2, 1])),
                             meta={"filename_or_obj": f"case{i}.nii.gz"})}
        for i in range(2)
    ]  # fmt: skip
    batch = monai.data.list_data_collate(items)["image"]
    with torch.no_grad():
        expected = SimpleInferer()(batch, net)
        got = ExactInferer(tile_size=40)(batch, net)
    assert isinstance(got, MetaTensor) and isinstance(expected, MetaTensor)
    assert got.is_batch == expected.is_batch is True
    assert got.meta["filename_or_obj"] == expected.meta["filename_or_obj"] == ["case0.nii.gz", "case1.nii.gz"]
    assert torch.equal(got.affine, expected.affine)
    assert rel_err(got.as_tensor(), expected.as_tensor()) <= 1e-5


def _evaluate(inferer: Inferer) -> float:
    """Mean Dice of the small UNet on four random volumes, computed by MONAI's SupervisedEvaluator."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import MeanDice, from_engine
    from monai.transforms import AsDiscreted, Compose

    generator = torch.Generator().manual_seed(3)
    data = [
        {"image": torch.randn(1, 40, 36, 48, generator=generator),
         "label": (torch.rand(1, 40, 36, 48, generator=generator) > 0.5).float()}
        for _ in range(4)
    ]  # fmt: skip
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=2),
        network=unet_3d(torch.float64),
        inferer=inferer,
        prepare_batch=lambda batch, device, non_blocking, **kw: (
            batch["image"].double(),
            batch["label"],
        ),
        postprocessing=Compose(
            [AsDiscreted(keys="pred", argmax=True, to_onehot=2), AsDiscreted(keys="label", to_onehot=2)]
        ),
        key_val_metric={
            "dice": MeanDice(include_background=True, output_transform=from_engine(["pred", "label"]))
        },
    )
    evaluator.run()
    return evaluator.state.metrics["dice"]


def test_supervised_evaluator_gives_the_simple_inferer_metric():
    simple = _evaluate(SimpleInferer())
    exact = _evaluate(ExactInferer(tile_size=40))
    assert 0.0 < simple < 1.0
    assert exact == pytest.approx(simple, abs=1e-12)


def test_a_bundle_config_instantiates_it():
    from monai.bundle import ConfigParser

    config = {
        "network_def": {
            "_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
            "strides": [2], "norm": "batch",
        },
        "network": "$@network_def.eval()",
        "inferer": {"_target_": "tilegrad.monai.ExactInferer", "memory_budget": "256MiB", "tile_size": 16},
    }  # fmt: skip
    parser = ConfigParser(config)
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, ExactInferer)
    assert inferer.memory_budget == 256 * 2**20 and inferer.tile_size == 16
    network = parser.get_parsed_content("network")
    x = torch.randn(1, 1, 24, 20, 28)
    with torch.no_grad():
        assert rel_err(inferer(x, network), network(x)) <= 1e-5


def test_a_bad_bundle_entry_says_why():
    from monai.bundle import ConfigParser

    parser = ConfigParser({"inferer": {"_target_": "tilegrad.monai.ExactInferer", "memory_budget": "lots"}})
    with pytest.raises(Exception) as info:  # MONAI wraps what the target raised in its own RuntimeError
        parser.get_parsed_content("inferer")
    chain, err = [], info.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(e, ConfigError) and "cannot read 'lots' as a byte count" in str(e) for e in chain)
