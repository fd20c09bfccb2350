"""estimate_memory: hand-computed fixtures, per-layer rows, errors, and predicted peaks against measured peaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import tilegrad
from tilegrad import MemoryReport, ShapeError, TilegradError, estimate_memory
from tilegrad.memory.workload import measure_workload_subprocess
from tilegrad.models.resolve import resolve_model

MODELS = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_models.py"
F32 = 4


# ---- hand-computed fixtures --------------------------------------------------------------------------------------
def test_inference_peak_by_hand():
    # Conv2d(1->4, 3x3) then ReLU on a 1x1x8x8 input, no_grad: at the ReLU the input (256 B), the conv output and
    # the ReLU output (1024 B each) and the 40 parameters (160 B) are alive at once. device="cuda" leaves out CPU
    # kernel scratch so the figure is exactly the tensors.
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    report = estimate_memory(net, (1, 1, 8, 8), mode="infer", device="cuda")
    assert report.parameter_bytes == 40 * F32
    assert report.input_bytes == 64 * F32
    assert report.peak_bytes == 40 * F32 + 64 * F32 + 2 * 256 * F32
    assert report.activation_bytes == 0  # nothing is saved under no_grad
    assert report.peak_at.startswith("forward")


def test_training_totals_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))
    n_params = (3 * 8 * 9 + 8) + (8 * 2 * 9 + 2)
    for optimizer, copies in ((None, 0), ("sgd", 1), ("adam", 2)):
        report = estimate_memory(net, (2, 3, 16, 16), optimizer=optimizer, device="cuda")
        assert report.parameter_count == n_params
        assert report.gradient_bytes == n_params * F32
        assert report.optimizer_bytes == copies * n_params * F32
        # ReLU saves its 2x8x16x16 result, which the second conv saves too (one storage); conv1 saves the input.
        assert report.activation_bytes == 2 * 8 * 16 * 16 * F32
        floor = (
            report.parameter_bytes + report.gradient_bytes + report.optimizer_bytes + report.activation_bytes
        )
        assert report.peak_bytes > floor
        assert report.peak_bytes < floor + 4 * report.activation_bytes


def test_frozen_parameters_get_no_gradient_or_state():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    for p in net[0].parameters():
        p.requires_grad_(False)
    report = estimate_memory(net, (1, 3, 32, 32), optimizer="adam")
    trainable = sum(p.numel() for p in net[2].parameters())
    assert report.gradient_bytes == trainable * F32
    assert report.optimizer_bytes == 2 * trainable * F32


# ---- per-layer rows ----------------------------------------------------------------------------------------------
def test_vgg16_matches_the_cs231n_table():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.vgg16()
    report = estimate_memory(model, (1, 3, 224, 224), mode="infer")
    assert report.parameter_count == 138_357_544
    convs = [r for r in report.layers if r.type == "Conv2d"]
    # CS231n: CONV3-64 224x224x64 = 3.2M twice, CONV3-128 112x112x128 = 1.6M, 256: 56x56 = 800K, 512: 28x28 = 400K,
    # 512: 14x14 = 100K.
    expected = [224 * 224 * 64] * 2 + [112 * 112 * 128] * 2 + [56 * 56 * 256] * 3 + [28 * 28 * 512] * 3
    expected += [14 * 14 * 512] * 3
    assert [r.output_elements for r in convs] == expected
    assert [r.params for r in convs][:2] == [1728 + 64, 36864 + 64]
    fcs = [r for r in report.layers if r.type == "Linear"]
    assert [r.params for r in fcs] == [25088 * 4096 + 4096, 4096 * 4096 + 4096, 4096 * 1000 + 1000]


def test_rows_for_3d_batches_and_repeated_modules():
    relu = nn.ReLU()
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), relu, nn.Conv3d(4, 4, 3, padding=1))
    net.add_module("again", relu)  # the same ReLU module runs twice
    report = estimate_memory(net, (3, 1, 8, 10, 12))
    rows = {r.name: r for r in report.layers}
    assert rows["0"].output_shape == (3, 4, 8, 10, 12)
    assert rows["1"].calls == 2  # registered twice, one module: one row, two calls
    assert rows["1"].output_elements == 2 * 3 * 4 * 8 * 10 * 12
    assert "again" not in rows


def test_shared_parameters_and_storages_are_counted_once():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(inplace=True), conv)
    report = estimate_memory(net, (1, 4, 16, 16))
    assert report.parameter_count == 4 * 4 * 9 + 4 + 2 * 4  # conv once, BatchNorm weight and bias
    # saved: BatchNorm input (conv output) + the in-place ReLU result (= BatchNorm output storage, which the second
    # conv saves again) + BatchNorm's per-channel mean and inverse std.
    one_map = 4 * 16 * 16 * F32
    assert report.activation_bytes == 2 * one_map + 2 * 4 * F32
    assert sum(r.saved_bytes for r in report.layers) == report.activation_bytes


def test_the_model_is_left_untouched():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    net[2].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    estimate_memory(net, (2, 3, 16, 16), optimizer="adam")
    estimate_memory(net, (2, 3, 16, 16), mode="infer")
    after = net.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], before[k]) for k in before)
    assert net.training and net[1].training and not net[2].training
    assert all(p.grad is None for p in net.parameters())


def test_large_inputs_are_estimated_without_allocating():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet34()
    report = estimate_memory(model, (1, 3, 8192, 8192), optimizer="sgd")
    # Saved activations scale with the area: 8192^2 / 224^2 = 1337x the 224 px figure.
    small = estimate_memory(model, (1, 3, 224, 224), optimizer="sgd")
    assert report.activation_bytes == pytest.approx(small.activation_bytes * (8192 / 224) ** 2, rel=0.02)
    assert report.peak_bytes > 40 * 2**30


def test_report_forms(tmp_path):
    report = estimate_memory(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), (1, 1, 10, 10), optimizer="sgd")
    assert isinstance(report, MemoryReport)
    data = json.loads(report.to_json())
    assert data["peak_bytes"] == report.peak_bytes and data["layers"][0]["output_shape"] == [1, 2, 8, 8]
    text = report.table()
    assert "PEAK (train step)" in text and "KiB" in text
    pytest.importorskip("matplotlib")
    path = report.plot(tmp_path / "layers.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"input_shape": (3,)}, "received (3,)"),  # no channel dim
        ({"input_shape": (1, 3, -4, 4)}, "positive integers"),
        ({"input_shape": "1x3x4x4"}, "positive integers"),
        ({"mode": "eval"}, "expected mode 'train' or 'infer'"),
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
        ({"dtype": torch.int64}, "floating-point"),
        ({"device": "tpu"}, "expected device"),
    ],
)
def test_bad_arguments_say_what_was_expected(kwargs, needle):
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    args = {"input_shape": (1, 3, 16, 16), **kwargs}
    with pytest.raises(TilegradError) as info:
        estimate_memory(net, **args)
    assert needle in str(info.value)


def test_a_model_failing_on_the_input_names_what_it_expects():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ShapeError) as info:
        estimate_memory(net, (1, 5, 16, 16))
    message = str(info.value)
    assert "(1, 5, 16, 16)" in message and "expects input (N, 3, H, W)" in message


class _Block(nn.Module):
    """A container whose own forward indexes with a boolean mask: a data-dependent output shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[y > 0]


def _two_stage_cnn() -> nn.Module:
    # A BatchNorm on a 1x1 map deep inside, after two poolings: at 4x4 with batch 1 only it can fail.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2), nn.BatchNorm2d(8)),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


# Regression (review of issue 3): every failure used to be blamed on the first layer ("Its first layer conv1 expects
# input (N, 3, H, W)"), even where that layer was fine.
@pytest.mark.parametrize(
    ("model", "shape", "kwargs", "needles"),
    [
        # train-mode BatchNorm on a 1x1 map at batch 1: name it, suggest batch >= 2 or inference
        (_two_stage_cnn, (1, 3, 4, 4), {}, ["layer '2.2' (BatchNorm2d, input (1, 8, 1, 1))", "batch of 2", "infer"]),
        # the same model in eval mode is fine at 4x4, but at 2x2 the second pooling gets a 1x1 map
        (_two_stage_cnn, (1, 3, 2, 2), {"mode": "infer"}, ["layer '2.1' (MaxPool2d, input (1, 8, 1, 1))",
                                                           "input is too small"]),
        # wrong channels: the first layer, and only then, is named with what it expects
        (_two_stage_cnn, (1, 5, 8, 8), {}, ["layer '0' (Conv2d, input (1, 5, 8, 8))", "expects input (N, 3, H, W)"]),
        # the classifier receives more features than it was built for
        (_two_stage_cnn, (2, 3, 8, 8), {}, ["layer '4' (Linear, input (2, 32))", "expects input (N, ..., 8)"]),
    ],
)  # fmt: skip
def test_a_failing_model_names_the_innermost_failing_layer(model, shape, kwargs, needles):
    with pytest.raises(ShapeError) as info:
        estimate_memory(model(), shape, **kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    if "expects input (N, 3, H, W)" not in needles:
        assert "expects input (N, 3, H, W)" not in message, message


def test_a_torchvision_model_too_small_for_its_batchnorm_names_it():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet18()
    with pytest.raises(ShapeError) as info:
        estimate_memory(model, (1, 3, 32, 32))
    message = str(info.value)
    assert "layer 'layer4.0.bn1' (BatchNorm2d, input (1, 512, 1, 1))" in message and "batch of 2" in message
    assert "conv1" not in message


@pytest.mark.parametrize(
    ("model", "where"),
    [
        (_Block, "in the forward of _Block itself"),  # the op is in the model's own forward
        (lambda: nn.Sequential(nn.ReLU(), _Block()), "in layer '1' (_Block, input (1, 3, 8, 8))"),
    ],
)
def test_data_dependent_shapes_are_recognised(model, where):
    with pytest.raises(TilegradError) as info:
        estimate_memory(model(), (1, 3, 8, 8))
    message = str(info.value)
    assert not isinstance(info.value, ShapeError)
    assert "data-dependent shapes" in message and where in message, message
    assert "measure_peak_memory" in message


def test_data_dependent_exception_types_are_recognised():
    from torch._subclasses.fake_tensor import DynamicOutputShapeException

    class Raises(nn.Module):
        def forward(self, x):
            raise DynamicOutputShapeException(torch.ops.aten.nonzero.default)

    with pytest.raises(TilegradError, match="data-dependent shapes"):
        estimate_memory(nn.Sequential(nn.Conv2d(3, 3, 1), Raises()), (1, 3, 8, 8))


# ---- streaming ---------------------------------------------------------------------------------------------------
def test_streamed_trunk_is_simulated_tile_by_tile():
    trunk = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    plain = estimate_memory(nn.Sequential(trunk, head), (1, 1, 512, 512))
    streamed_model = nn.Sequential(tilegrad.StreamingModule(trunk, tile_size=64, mode="lean"), head)
    streamed = estimate_memory(streamed_model, (1, 1, 512, 512))
    assert streamed.peak_bytes < plain.peak_bytes / 3
    assert any("streamed" in note and "planner's quick estimate" in note for note in streamed.notes)
    assert next(p for p in trunk.parameters()).device.type == "cpu"  # stand-ins swapped back after backward


def test_the_plan_for_a_training_step_is_made_with_grad_enabled():
    # Regression: estimate_memory made the StreamingModule's plan in a forward under no_grad, where the planner's
    # profile sees nothing saved for backward; the cached plan then took kept graphs for free, and the simulated
    # ResNet-34 peak at 2048 px with --tile 768 jumped from 670 MiB to 1.06 GiB.
    trunk = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1)
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    streamed = tilegrad.StreamingModule(trunk, tile_size=64)
    estimate_memory(nn.Sequential(streamed, head), (1, 1, 256, 256))
    assert streamed.last_plan is not None
    assert all(seg.tile_saved_bytes > 0 for seg in streamed.last_plan.segments), streamed.last_plan


def test_streamed_backward_peak_names_the_layer():
    # Regression: nodes of the tiles recomputed inside backward carried no label, so the streamed peak was said to be
    # in "ConvolutionBackward0 of <the whole model>".
    trunk = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1)
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    model = nn.Sequential(tilegrad.StreamingModule(trunk, tile_size=64, mode="lean"), head)
    plain = estimate_memory(nn.Sequential(trunk, head), (1, 1, 512, 512), name="net")
    streamed = estimate_memory(model, (1, 1, 512, 512), name="net")
    assert plain.peak_at.startswith("backward, ConvolutionBackward0 of 0.")
    assert streamed.peak_at.startswith("backward, ConvolutionBackward0 of 0.module."), streamed.peak_at


# ---- predicted versus measured ---------------------------------------------------------------------------------
# One fresh Python process per configuration (tilegrad.memory.workload.measure_workload_subprocess): the process
# builds the model and runs two SGD training steps once to warm up, then again inside measure_peak_memory.
ACCURACY = [
    pytest.param("tilegrad_espcn3d", (1, 6, 24, 24, 24), id="espcn3d-24"),  # tilegrad.models.ESPCN3d
    # reversible blocks recompute activations inside backward: the simulation must follow that recomputation
    pytest.param("tilegrad_espcn3d_rev4", (1, 6, 16, 16, 16), id="espcn3d-rev4-16"),
    pytest.param("unet3d", (1, 1, 48, 48, 48), id="unet3d-48"),  # batch 1: unfold-based Slow3d kernels
    pytest.param("resnet34", (2, 3, 128, 128), id="resnet34-128"),
    pytest.param("tilegrad_espcn3d", (2, 6, 24, 24, 24), id="espcn3d-24-b2", marks=pytest.mark.slow),
    pytest.param("espcn3d", (1, 6, 24, 24, 24), id="local-espcn3d-24", marks=pytest.mark.slow),
    pytest.param("small_cnn_streamed_256", (1, 3, 1024, 1024), id="streamed-1024", marks=pytest.mark.slow),
    pytest.param("unet3d", (2, 1, 32, 32, 32), id="unet3d-32-b2", marks=pytest.mark.slow),  # batch 2: oneDNN
    pytest.param("resnet34", (1, 3, 224, 224), id="resnet34-224", marks=pytest.mark.slow),
    pytest.param("unet2d", (2, 1, 256, 256), id="unet2d-256", marks=pytest.mark.slow),
    pytest.param("unet2d", (1, 1, 384, 384), id="unet2d-384", marks=pytest.mark.slow),
    pytest.param("vgg16", (1, 3, 64, 64), id="vgg16-64", marks=pytest.mark.slow),
    pytest.param("vgg16", (1, 3, 128, 128), id="vgg16-128", marks=pytest.mark.slow),
    pytest.param("densenet121", (1, 3, 128, 128), id="densenet121-128", marks=pytest.mark.slow),
    pytest.param("densenet121", (2, 3, 128, 128), id="densenet121-128-b2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "shape"), ACCURACY)
def test_predicted_peak_within_10_percent_of_measured(name, shape):
    pytest.importorskip("torchvision")
    if name.startswith("unet"):
        pytest.importorskip("monai")
    spec = f"{MODELS}:{name}"
    factory, _ = resolve_model(spec)
    with torch.device("meta"):
        model = factory()
    predicted = estimate_memory(model, shape, optimizer="sgd").peak_bytes
    measured = measure_workload_subprocess(spec, shape, optimizer="sgd", timeout=600)
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_no_workspace_on_an_input_smaller_than_the_kernel():
    # the planner prices the box of a small tile at a deep scale: a 5x5 kernel on a 4x4 box crashed planning timm's
    # NASNet ("Kernel size can't be greater than actual input size"); no convolution runs there, so no workspace
    from tilegrad.memory.kernels import CONV_BACKWARD, conv_workspace_bytes, select_conv_backend

    w = torch.empty(8, 8, 5, 5, device="meta")
    small, large = (torch.empty(1, 8, n, n, device="meta") for n in (4, 40))
    conf = ([1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    assert select_conv_backend(small, w, *conf) is None and select_conv_backend(large, w, *conf) is not None
    assert select_conv_backend(small, w, [1, 1], [1, 1], [1, 1], False, [0, 0], 1) is not None  # padded to 6
    grad = torch.empty(1, 8, 1, 1, device="meta")
    assert conv_workspace_bytes(CONV_BACKWARD, (grad, small, w, None, *conf, [True, True, False])) == 0
    assert conv_workspace_bytes(CONV_BACKWARD, (grad, large, w, None, *conf, [True, True, False])) > 0


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_a_2d_transposed_unfold_forward_scratch_grows_with_the_batch_as_measured(batch):
    # PyTorch's SlowTranspose2d forward unfolds every sample of the batch at once (its backward and SlowTranspose3d
    # one at a time); the rule counted one sample, under-predicting batch_tiles > 1 in inference plans
    from tilegrad.memory.kernels import conv_workspace_bytes, select_conv_backend

    torch.set_num_threads(1)
    conv = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1).double()
    x = torch.randn(batch, 32, 40, 40, dtype=torch.float64)
    conf = (conv.stride, conv.padding, conv.dilation, conv.transposed, conv.output_padding, conv.groups)
    assert select_conv_backend(x, conv.weight, *conf).name == "SlowTranspose2d"
    with torch.no_grad():
        conv(x)  # first use
        with tilegrad.PeakMemoryMeter("cpu") as meter:
            y = conv(x)
    scratch = meter.peak_bytes - y.numel() * y.element_size()
    modelled = conv_workspace_bytes(torch.ops.aten.convolution.default, (x, conv.weight, None, *conf))
    assert 0.9 * scratch <= modelled <= 1.1 * scratch
