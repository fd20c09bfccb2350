"""Segments over any graph (tilegrad/graph.py), storage tiers and streamed heads in the engine (execute.py), each
against the plain computation: outputs, input gradients and every parameter gradient."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from torch import nn

import tilegrad
from tilegrad import ConfigError, NotStreamableError, StreamingModule
from tilegrad.geometry import observer_hook
from tilegrad.graph import TrunkGraph
from tilegrad.heads import AttentionMIL, GlobalPool

from .test_stream import rel_err, resnet18_trunk


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))) + x)


class TinyUNet(nn.Module):
    """Two levels, a skip concatenation, in-place activations: what a cut through a U-Net must get right."""

    def __init__(self, ndim: int = 2, c: int = 4):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        up = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        self.enc = nn.Sequential(conv(1, c, 3, padding=1), nn.ReLU(inplace=True))
        self.down = conv(c, 2 * c, 3, stride=2, padding=1)
        self.mid = nn.Sequential(nn.ReLU(), conv(2 * c, 2 * c, 3, padding=1), nn.ReLU())
        self.up = up(2 * c, c, 2, stride=2)
        self.dec = conv(2 * c, 2, 3, padding=1)

    def forward(self, x):
        e = self.enc(x)
        return self.dec(torch.cat([e, self.up(self.mid(self.down(e)))], dim=1))


def _weights(y: torch.Tensor) -> torch.Tensor:
    return torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape).sin()


def _check(trunk: nn.Module, shape, dtype=torch.float64, head=None, tol=1e-10, **kwargs) -> StreamingModule:
    torch.manual_seed(0)
    trunk = trunk.to(dtype)
    head = head.to(dtype) if head is not None else None
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    streamed = StreamingModule(trunk, head=head, **kwargs)
    y = streamed(x)
    (y * _weights(y)).sum().backward()
    params = [*trunk.parameters(), *(head.parameters() if head is not None else ())]
    got = [x.grad.clone(), *(p.grad.clone() for p in params)]
    x.grad = None
    for p in params:
        p.grad = None
    ref = trunk(x) if head is None else head(trunk(x))
    (ref * _weights(ref)).sum().backward()
    want = [x.grad, *(p.grad for p in params)]
    assert rel_err(y, ref) <= tol
    for a, b in zip(got, want):
        assert rel_err(a, b) <= tol * 10
    plan = streamed.last_plan
    assert plan is not None and not plan.conventional
    assert sum(len(s.grid) for s in plan.segments) > len(plan.segments), "the case must really be tiled"
    return streamed


@pytest.mark.parametrize("mode", ["lean", "stages", "auto"])
def test_unet_with_skip_cut_is_exact(mode):
    streamed = _check(TinyUNet(), (2, 1, 64, 48), tile_size=24, mode=mode)
    plan = streamed.last_plan
    if mode == "stages":
        # the skip tensor crosses a cut: the decoder's segment reads two sources at two scales
        assert any(len(s.segment.sources) == 2 for s in plan.segments), str(plan)


def test_unet_3d_float32_with_disk_tier():
    _check(TinyUNet(ndim=3), (1, 1, 24, 16, 16), dtype=torch.float32, tol=1e-5, tile_size=12, mode="stages",
           tiers="disk")  # fmt: skip


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_unet_3d_on_disk_in_the_rows_layout_is_exact(monkeypatch, dtype, tol):
    # 3D boundaries on disk are files of (D, H, N*C, W) rows (NOTE [ Storage tiers ] in boundary.py): a batch of 2
    # (N*C rows per position), sizes off the tile grid, boxes cut in every dim; outputs, input and parameter gradients exact
    from tilegrad import boundary

    layouts = []
    made = boundary.DiskStore.__init__

    def spy(self, *args, **kwargs):
        made(self, *args, **kwargs)
        layouts.append(self.layout)

    monkeypatch.setattr(boundary.DiskStore, "__init__", spy)
    _check(
        TinyUNet(ndim=3), (2, 1, 26, 18, 22), dtype=dtype, tol=tol, tile_size=12, mode="stages", tiers="disk"
    )
    assert layouts and set(layouts) == {"rows"}, layouts


def test_resnet_residual_graph_cut_at_every_candidate():
    trunk = resnet18_trunk()
    streamed = _check(trunk, (1, 3, 96, 64), tile_size=64, mode="stages")
    # the downsampling blocks read the block input twice (conv and the 1x1 shortcut): multi-source segments
    assert len(streamed.last_plan.segments) > 4


class _FloorMerge(nn.Module):
    """A 2x2 average pooling rounds 75 px down to 37; two branches from it meet at a concatenation."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 2, 1)
        self.d = nn.Conv2d(6, 4, 3, stride=2, padding=1)

    def forward(self, x):
        p = self.a(x)
        return self.d(torch.cat([torch.relu(self.b(p)), self.c(p)], dim=1))


def _rounded_sources(streamed: StreamingModule, far: bool = False) -> list[str]:
    """Sources of the last plan's segments whose map is the image size over its scale rounded up or down (``far``:
    off by a whole pixel of its scale or more, read by a segment of several tiles)."""
    found = []
    for sp in streamed.last_plan.segments:
        g = sp.segment.graph
        for s in sp.segment.sources:
            off = [abs(n * k - i) for n, k, i in zip(g.shape(s)[2:], g.scale(s), g.input_shape[2:])]
            tiled = len(sp.grid) > 1 or not far
            if s is not g.input and tiled and any(o >= k if far else o for o, k in zip(off, g.scale(s))):
                found.append(s.name)
    return found


# An image whose size is not a multiple of the network's stride (what real slides are): the strided layers round
# the maps up (stride-2 convolutions with padding) or down (2x2 pooling), and cuts and merge points on those maps
# are exact too (NOTE [ Segment windows ]). Before, such a cut was refused, and with it every plan that must cut
# there: BatchNorm in training mode and squeeze-excitation (their statistics' inputs are boundaries) on any image
# off the stride failed with "does not sit on its scale's grid".
@pytest.mark.parametrize("shape", [(1, 3, 97, 161), (1, 3, 100, 100)])
def test_cuts_on_maps_rounded_by_an_image_off_the_stride(shape):
    streamed = _check(resnet18_trunk(), shape, tile_size=64, mode="stages")
    assert _rounded_sources(streamed)


def test_merge_on_a_map_rounded_down():
    streamed = _check(_FloorMerge(), (1, 3, 150, 131), tile_size=40, mode="stages")
    assert _rounded_sources(streamed)


class _ValidNet(nn.Module):
    """Unpadded convolutions (as Inception-v3's stem): every map is 2 px smaller than the last, far off the image's
    grid at its scale."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
        self.b1, self.c1, self.b2 = _Branches(), nn.Conv2d(4, 4, 3), _Branches()
        self.c2, self.b3 = nn.Conv2d(4, 4, 3, stride=2), _Branches()

    def forward(self, x):
        return self.b3(self.c2(self.b2(torch.relu(self.c1(self.b1(self.stem(x)))))))


class _Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return torch.relu(self.a(x)) + self.b(x)


# A map far off its grid (90 px of a 96 px image at scale 1) may be cut where it is the only source of the segment
# that reads it: the tiles of that segment start on its grid and the last one runs to its end (NOTE [ Segment
# windows ]). Before, such maps were never cut, and Inception-v3 streamed as one segment with a 1344 px halo.
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_a_cut_on_a_map_far_off_its_grid(dtype, tol):
    streamed = _check(_ValidNet(), (1, 3, 96, 80), dtype=dtype, tol=tol, tile_size=32, mode="auto")
    assert _rounded_sources(streamed, far=True), str(streamed.last_plan)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_train_mode_batchnorm_on_an_image_off_the_stride(dtype, tol):
    from .test_statistics import _check as _check_statistics  # compares the running statistics too

    trunk = resnet18_trunk().train()
    # every boundary stored (tiers="device": none recomputed by its readers, NOTE [ Recomputed statistic inputs ]),
    # so that the rounded maps are read as sources
    streamed = _check_statistics(trunk, (1, 3, 100, 90), 64, dtype=dtype, tol=tol, tiers="device")
    assert _rounded_sources(streamed)


@pytest.mark.parametrize("tiers", ["device", "disk"])
@pytest.mark.parametrize(
    "head",
    [lambda: GlobalPool("max"), lambda: GlobalPool("avg"), lambda: AttentionMIL(4, hidden=8, classes=3)],
)
def test_streamed_heads_never_hold_the_trunk_output(head, tiers):
    trunk = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), _Block(8), nn.Conv2d(8, 4, 3)
    )
    streamed = _check(trunk, (2, 3, 80, 72), head=head(), tile_size=32, tiers=tiers, mode="stages")
    assert streamed.last_plan.head is not None
    assert "head" in str(streamed.last_plan)


def test_heads_float32():
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    _check(trunk, (1, 3, 96, 96), dtype=torch.float32, head=AttentionMIL(8, hidden=4), tol=1e-5, tile_size=40)


def test_lazy_input_with_a_sink_and_a_head():
    trunk = TinyUNet().double()
    head = GlobalPool("avg").double()
    image = np.random.default_rng(0).standard_normal((1, 1, 64, 64))

    class Sink:
        def __init__(self):
            self.grad = torch.zeros(image.shape, dtype=torch.float64)

        def add(self, box, g):
            self.grad[(slice(None), slice(None), *box)] += g

    sink = Sink()
    y = StreamingModule(trunk, tile_size=24, head=head, mode="stages")(image, grad_sink=sink)
    y.sum().backward()
    x = torch.from_numpy(image).requires_grad_(True)
    ref = head(trunk(x))
    ref.sum().backward()
    assert rel_err(y, ref) <= 1e-10 and rel_err(sink.grad, x.grad) <= 1e-10


def test_budget_moves_boundaries_to_disk_and_reports_them():
    trunk = resnet18_trunk()
    shape = (1, 3, 1024, 1024)
    roomy = tilegrad.plan_streaming(trunk, shape, memory_budget="2GiB", input_in_memory=False,
                                    head=GlobalPool("max"), mode="stages")  # fmt: skip
    tight = tilegrad.plan_streaming(trunk, shape, memory_budget="200MiB", input_in_memory=False,
                                    head=GlobalPool("max"), mode="stages")  # fmt: skip
    assert roomy.disk_bytes == 0 and tight.disk_bytes > 0, (str(roomy), str(tight))
    assert tight.peak_bytes <= 0.8 * 200 * 2**20
    assert "disk" in str(tight) and tight.to_dict()["disk_bytes"] == tight.disk_bytes
    with pytest.raises(tilegrad.MemoryBudgetError):  # boundaries held on the device do not fit that budget
        tilegrad.plan_streaming(trunk, shape, memory_budget="200MiB", input_in_memory=False,
                                head=GlobalPool("max"), mode="stages", tiers="device")  # fmt: skip
    forced = tilegrad.plan_streaming(trunk, shape, memory_budget="2GiB", input_in_memory=False,
                                     head=GlobalPool("max"), mode="stages", tiers="disk")  # fmt: skip
    assert {b.tier for b in forced.boundaries} == {"disk"} and forced.time_ratio > roomy.time_ratio


def test_a_missing_scratch_dir_fails_before_the_first_tile(tmp_path):
    trunk = TinyUNet().double()
    streamed = StreamingModule(
        trunk, tile_size=24, mode="stages", tiers="disk", scratch_dir=tmp_path / "nope"
    )
    with pytest.raises(ConfigError, match="nope"):
        streamed(torch.randn(1, 1, 64, 64, dtype=torch.float64))


def test_scratch_files_are_removed_after_the_step_and_on_error(tmp_path):
    trunk = TinyUNet().double()
    streamed = StreamingModule(trunk, tile_size=24, mode="stages", tiers="disk", scratch_dir=tmp_path)
    x = torch.randn(1, 1, 64, 64, dtype=torch.float64, requires_grad=True)
    y = streamed(x)
    assert os.listdir(tmp_path), "the boundaries are on disk during the step"
    y.sum().backward()
    assert not os.listdir(tmp_path)
    y = streamed(x)
    del y  # dropped without backward: the graph goes, and with it the scratch files
    assert not os.listdir(tmp_path)

    def boom(module, args):
        raise KeyboardInterrupt

    handle = trunk.dec.register_forward_pre_hook(observer_hook(boom))
    with pytest.raises(KeyboardInterrupt):
        streamed(x)
    handle.remove()
    assert not os.listdir(tmp_path)


def test_a_head_that_is_not_streamed_is_refused_by_name():
    with pytest.raises(NotStreamableError, match=r"Linear.*GlobalPool"):
        StreamingModule(nn.Conv2d(1, 1, 3), tile_size=16, head=nn.Linear(1, 1))


def test_candidates_skip_tensors_changed_in_place():
    g = TrunkGraph(TinyUNet(), (1, 1, 32, 32), torch.float32)
    names = [n.name for n in g.candidates]
    # enc's conv output is modified by ReLU(inplace=True): its ReLU output is the candidate, not the conv
    assert "enc_0" not in names and "enc_1" in names, names
    segs = g.segments(g.candidates)
    assert segs[-1].out is g.output


def test_segmented_inference_is_exact():
    # NOTE [ Segmented inference ] in infer.py: with a budget, infer(mode="stages") cuts the graph as training does
    torch.manual_seed(0)
    net = TinyUNet().double().eval()
    x = torch.randn(1, 1, 64, 48, dtype=torch.float64)
    plan = tilegrad.plan_streaming(
        net, x.shape, tile_size=24, mode="stages", training=False, dtype=torch.float64
    )
    assert len(plan.segments) > 1
    with torch.no_grad():
        y = tilegrad.infer(net, x, tile_size=24, memory_budget="64MiB", mode="stages", progress=False)
        assert rel_err(y, net(x)) <= 1e-12


def test_each_pass_over_a_boundary_file_starts_where_the_previous_one_ended(monkeypatch, tmp_path):
    # NOTE [ Tile order ]: segments alternate their tile order in the forward and run their backward in reverse, so
    # the first box of every pass over a boundary file (a map: written, read by its reader's forward, read again by
    # its recomputation; a gradient: added into, read by its producer) overlaps the last box of the pass before:
    # the part of a map the page cache still holds is read first. A plain raster order in every pass fails this.
    from tilegrad.boundary import DiskStore
    from tilegrad.execute import Execution

    from .test_stream import conv_net_2d

    phase = ["forward"]
    log: list[tuple[str, str, tuple[slice, ...]]] = []  # (file, pass, box)

    def spying(op: str):
        inner = getattr(DiskStore, op)

        def spy(self, box, *rest, **kwargs):
            log.append((self.path.name, f"{phase[0]} {op}", box))
            return inner(self, box, *rest, **kwargs)

        return spy

    for op in ("read", "write", "add"):
        monkeypatch.setattr(DiskStore, op, spying(op))
    backward = Execution.backward

    def marked(self, *args, **kwargs):
        phase[0] = "backward"
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(Execution, "backward", marked)
    streamed = _check(
        conv_net_2d(), (1, 3, 256, 256), tile_size=32, mode="stages", tiers="disk", scratch_dir=tmp_path
    )
    assert len(streamed.last_plan.segments) >= 3 and all(len(s.grid) > 1 for s in streamed.last_plan.segments)
    passes: dict[str, list[list[tuple[slice, ...]]]] = {}
    last_pass: dict[str, str] = {}
    for name, what, box in log:
        if last_pass.get(name) != what:
            passes.setdefault(name, []).append([])
            last_pass[name] = what
        passes[name][-1].append(box)
    assert len(passes) == 2 * len(streamed.last_plan.boundaries)  # each map and its gradient
    for name, runs in passes.items():
        assert len(runs) == (3 if not name.endswith(".grad") else 2), name
        for before, after in itertools.pairwise(runs):
            assert all(a.start < b.stop and b.start < a.stop for a, b in zip(before[-1], after[0])), name


class _FunctionalInPlace(nn.Module):
    """Convolutions each followed by a functional activation that writes into the convolution's output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.c = nn.Conv2d(4, 4, 3, padding=1, stride=2)
        self.d = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        x = nn.functional.relu(self.a(x), True)  # inplace by position
        x = torch.relu_(self.b(x))  # an in-place function
        x = nn.functional.leaky_relu(self.c(x), 0.1, True)
        return self.d(x)


class _StatementInPlace(_FunctionalInPlace):
    """The same layers, with in-place writes whose results are not used: the later layers see the written tensor
    (NOTE [ In-place writes ] in graph.py); before, a segment after the write read the tensor unchanged."""

    def forward(self, x):
        x = self.a(x)
        x.add_(1.0)  # a statement: the result is x itself
        x = self.b(x)
        x.contiguous().mul_(2.0)  # through an alias that is x itself
        x = self.c(x)
        x.view(x.shape).sub_(0.5)  # through a view of all of x
        return self.d(x)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_in_place_statements_stream_exactly(dtype, tol):
    torch.manual_seed(0)
    net = _StatementInPlace().to(dtype)
    x = torch.randn(1, 2, 48, 40, dtype=dtype, requires_grad=True)
    streamed = StreamingModule(net, 24, mode="stages")
    _assert_streams_like_plain(streamed, net, x, torch.randn(1, 2, 12, 10, dtype=dtype), tol)
    assert len(streamed.last_plan.segments) > 1


def _assert_streams_like_plain(streamed, net, x, weight, tol):
    """Output, input gradient and every parameter gradient of ``streamed`` against ``net`` (training)."""
    (net(x).to(x.dtype) * weight).sum().backward()
    expected = [net(x).detach(), x.grad.clone(), *(p.grad.clone() for p in net.parameters())]
    x.grad = None
    net.zero_grad(set_to_none=True)
    out = streamed(x)
    (out.to(x.dtype) * weight).sum().backward()
    for got, want in zip([out.detach(), x.grad, *(p.grad for p in net.parameters())], expected):
        assert rel_err(got, want) <= tol


class _CopyThenInPlace(nn.Module):
    """In-place writes into what eager mode made a copy (leaving its source unchanged) or, by dtype, the same tensor."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, padding=1, stride=2)

    def forward(self, x):
        y = self.a(x)
        p = y.permute(0, 2, 3, 1)
        q = p.contiguous()  # a copy: p is not contiguous
        q.mul_(2.0)
        y = (p + q).permute(0, 3, 1, 2)
        z = y.double()  # a copy in float32, y itself in float64
        z.add_(1.0)
        return self.b((y * z).type_as(y))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_in_place_writes_into_copies_stream_exactly(dtype, tol):
    torch.manual_seed(0)
    net = _CopyThenInPlace().to(dtype)
    x = torch.randn(1, 2, 48, 40, dtype=dtype, requires_grad=True)
    _assert_streams_like_plain(StreamingModule(net, 24), net, x, torch.randn(1, 2, 24, 20, dtype=dtype), tol)


class _PartialInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        x = self.a(x)
        x[:, :2].mul_(2.0)  # half the channels, through a partial view
        return self.b(x)


def test_in_place_write_through_a_partial_view_is_refused():
    with pytest.raises(
        NotStreamableError, match=r"node 'mul_' writes in place into 'a' through a part.*assign"
    ):
        TrunkGraph(_PartialInPlace(), (1, 2, 32, 32), torch.float32)


def test_candidates_skip_tensors_changed_in_place_by_functions():
    # a segment reads its sources from the store's own memory (NOTE [ Storage tiers ] in boundary.py): a cut at a
    # tensor a later function overwrites would hand that function the store itself
    g = TrunkGraph(_FunctionalInPlace(), (1, 2, 32, 32), torch.float32)
    names = [n.name for n in g.candidates]
    assert not {"a", "b", "c"} & set(names) and {"relu", "relu_"} <= set(names), names


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("training", [True, False])
def test_functional_in_place_activations_stream_exactly(training, dtype, tol):
    torch.manual_seed(0)
    net = _FunctionalInPlace().to(dtype)
    x = torch.randn(1, 2, 48, 40, dtype=dtype, requires_grad=training)
    streamed = StreamingModule(net, 24, mode="stages")
    if not training:
        with torch.no_grad():
            assert rel_err(streamed(x), net(x)) <= tol
        assert len(streamed.last_plan.segments) > 1
        return
    _assert_streams_like_plain(streamed, net, x, torch.randn(1, 2, 12, 10, dtype=dtype), tol)
    assert len(streamed.last_plan.segments) > 1
