"""Local operations that read sizes or move dims (NOTE [ Layouts and tile extents ] in tilegrad/geometry/layout.py):
accepted and streamed exactly where they are local, refused with the reason where they are not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from monai.networks import nets
from torch import nn
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

import tilegrad
from tilegrad import GeometryError, NotStreamableError, StreamingModule
from tilegrad.geometry.layout import regroup, standard

from ..test_stream import assert_equivalent

timm = pytest.importorskip("timm")


def _timm_convnext_stages():
    model = timm.models.convnext.ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), num_classes=2)
    return model.eval().stages[:2]


# (case, trunk factory, input shape, tile): each was refused before, although every layer in it is local
EXACT = [
    # channel_shuffle: x.size() then view/transpose over channels only; was "it reads the tensor size"
    (
        "ShuffleNetV2 stage2",
        lambda: torchvision.models.shufflenet_v2_x0_5().eval().stage2,
        (1, 24, 40, 36),
        24,
    ),
    # LayerNorm2d (permute, F.layer_norm over C, permute back) and the channels-last Linear MLP of CNBlock;
    # was "LayerNorm2d normalises over space"
    (
        "torchvision ConvNeXt",
        lambda: ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]).eval().features,
        (1, 3, 128, 112),
        88,
    ),
    ("timm ConvNeXt", _timm_convnext_stages, (1, 8, 56, 48), 24),
    # stochastic_depth in eval mode is the identity; was "tilegrad does not know whether it is local"
    (
        "EfficientNetV2 features[:2]",
        lambda: torchvision.models.efficientnet_v2_s().eval().features[:2],
        (1, 3, 48, 40),
        24,
    ),
]


@pytest.mark.parametrize("case, factory, shape, tile", EXACT, ids=[c[0] for c in EXACT])
def test_local_shape_operations_stream_exactly(case, factory, shape, tile):
    torch.manual_seed(0)
    assert_equivalent(factory(), shape, tile, mode="lean")


class _Repeat(nn.Module):
    """MONAI VNet's InputTransition: the input repeated over channels, added to a convolution of it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x) + x.repeat([1, 4, 1, 1]))


class _Glu(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.glu = nn.GLU(dim)

    def forward(self, x):
        return F.glu(self.glu(self.conv(x)), 1)


def test_channel_repeat_and_glu_over_channels_stream_exactly():
    assert_equivalent(_Repeat(), (1, 2, 40, 36), 16)
    assert_equivalent(_Glu(1), (1, 2, 40, 36), 16)


def test_monai_vnet_is_local():
    # VNet repeats its input over channels (x.repeat([1, 16, 1, 1, 1])); was "tilegrad does not know .repeat()"
    rf = tilegrad.receptive_field(nets.VNet(spatial_dims=3, in_channels=1, out_channels=2).eval(), ndim=3)
    assert rf.stride == (1, 1, 1)


class _Body(nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self._forward = forward

    def forward(self, x):
        return self._forward(self.conv(x))


# (case, what the trunk does after a convolution, words the refusal must contain)
REFUSED = [
    # GLU's default dim=-1 halves the width: it crashed with a raw RuntimeError before
    ("F.glu(x) over the width", lambda x: F.glu(x), ["GLU", "spatial dim", "dim=1"]),
    ("LayerNorm over space", lambda x: F.layer_norm(x, x.shape[-2:]), ["normalises over space"]),
    ("repeat over the height", lambda x: x.repeat(1, 1, 2, 1), ["repeats a spatial dim"]),
    ("flatten to a sequence", lambda x: x.flatten(2), ["flatten merges spatial positions"]),
    ("view merging H and W", lambda x: x.view(x.shape[0], x.shape[1], -1), ["spatial dims merged"]),
    ("size arithmetic", lambda x: x[:, :, : x.shape[2] // 2], ["tile's extent"]),
    (
        "a constant spatial size",
        lambda x: x.reshape(1, 4, 32, 32),
        ["spatial dims merged, split, or given as numbers"],
    ),
    (
        "conv on channels-last",
        lambda x: F.conv2d(x.permute(0, 2, 3, 1), torch.ones(4, 32, 1, 1)),
        ["(N, H, W, C)"],
    ),
    ("returns channels-last", lambda x: x.permute(0, 2, 3, 1), ["returns a tensor with dims (N, H, W, C)"]),
    ("dropout in training", lambda x: F.dropout(x, 0.5, training=True), ["training mode"]),
    ("Linear over the width", lambda x: F.linear(x, torch.ones(32, 32)), ["Linear", "spatial axis"]),
]


@pytest.mark.parametrize("case, forward, words", REFUSED, ids=[c[0] for c in REFUSED])
def test_non_local_shape_operations_are_refused_with_the_reason(case, forward, words):
    with pytest.raises(NotStreamableError) as info:
        tilegrad.receptive_field(_Body(forward), ndim=2)
    for word in words:
        assert word in str(info.value), case


def test_nn_glu_over_the_width_is_refused_naming_it():
    # nn.GLU's default dim=-1 halves the width: it crashed with a raw RuntimeError before
    with pytest.raises(NotStreamableError, match=r"layer '1' \(GLU\) cannot be streamed: GLU splits dim -1"):
        tilegrad.receptive_field(nn.Sequential(nn.Conv2d(1, 4, 3), nn.GLU()), ndim=2)


def test_stochastic_depth_in_training_mode_is_refused():
    trunk = torchvision.models.efficientnet_v2_s().features[:3].train()
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # frozen statistics: only the stochastic depth is in training mode
    with pytest.raises(NotStreamableError, match="stochastic depth in training mode"):
        tilegrad.receptive_field(trunk, ndim=2)
    tilegrad.receptive_field(trunk.eval(), ndim=2)  # the same trunk, traced again in eval mode, is local


def test_regroup_labels_the_dims_a_view_makes():
    # ShuffleNet: (N, C, H, W) -> (N, groups, C/groups, H, W): both new dims are channels
    assert regroup(standard(2), (2, 8, 5, 6), (2, 2, 4, 5, 6), [None, None, None, 0, 1]) == (
        "N",
        "C",
        "C",
        0,
        1,
    )
    # merging the batch into the channels is still local; merging H into C is not
    assert regroup(standard(2), (2, 8, 5, 6), (16, 5, 6), [None, 0, 1]) == ("NC", 0, 1)
    assert regroup(standard(2), (2, 8, 5, 6), (2, 40, 6), [None, None, 1]) is None


def test_monai_basicunet_with_batch_norm_streams_exactly():
    # BasicUNet asks torch.jit.isinstance(x_e, torch.Tensor) (False on a bare fx proxy: the skips vanished from the
    # trace) and len(x.shape) (a TraceError); 1D keeps the case small, the 2D case is in the slow run
    torch.manual_seed(0)
    model = nets.BasicUNet(
        spatial_dims=1, in_channels=1, out_channels=2, norm="batch", features=(4, 4, 8, 8, 8, 4)
    )
    assert_equivalent(model.eval(), (1, 1, 900), 256, mode="lean")


def test_basicunet_at_an_odd_size_is_refused_by_the_segmented_engine_before_any_tile():
    # at 900 px UpCat pads a halved odd size: traced on the whole image the pad is there for every tile, so a plan
    # that tiles the decoder where it pads is refused with the way forward (mode="lean" runs the model itself per
    # tile); mode="stages" tiles every stage. The automatic plan runs the padding stages in one tile (the maps there
    # are small): it streams, exactly
    model = nets.BasicUNet(
        spatial_dims=1, in_channels=1, out_channels=2, norm="batch", features=(4, 4, 8, 8, 8, 4)
    ).eval()
    with pytest.raises(GeometryError, match='mode="lean"'):
        StreamingModule(model, 256, mode="stages")(torch.randn(1, 1, 900))
    assert_equivalent(model, (1, 1, 900), 256)


@pytest.mark.slow
def test_monai_basicunet_2d_with_batch_norm_streams_exactly():
    torch.manual_seed(0)
    model = nets.BasicUNet(
        spatial_dims=2, in_channels=1, out_channels=2, norm="batch", features=(4, 4, 8, 8, 8, 4)
    )
    assert_equivalent(model.eval(), (1, 1, 352, 336), 240)


def test_basicunet_trace_keeps_its_skip_connections():
    from tilegrad.geometry.trace import trace_graph

    model = nets.BasicUNet(
        spatial_dims=2, in_channels=1, out_channels=2, norm="batch", features=(4, 4, 8, 8, 8, 4)
    )
    graph = trace_graph(model.eval())
    cats = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.cat]
    # one per decoder level; the plain fx tracer took the no-skip branch and traced none
    assert len(cats) == 4
