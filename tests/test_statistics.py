"""Streamed statistics (tilegrad/statistics.py, NOTE [ Streamed statistics ]): normalisation with per-image or
per-batch statistics and squeeze-excitation, against the plain computation: outputs, input gradients, every
parameter gradient and (BatchNorm in training mode) the running statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tilegrad import NotStreamableError, StreamingModule
from tilegrad.geometry import observer_hook
from tilegrad.heads import GlobalPool


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _check(trunk: nn.Module, shape, tile, dtype=torch.float64, tol=1e-10, head=None, **kwargs):
    torch.manual_seed(0)
    trunk = trunk.to(dtype)
    trunk.zero_grad(set_to_none=True)
    ref = copy.deepcopy(trunk)
    ref_head = copy.deepcopy(head).to(dtype) if head is not None else None
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    streamed = StreamingModule(
        trunk, tile_size=tile, head=head.to(dtype) if head is not None else None, **kwargs
    )
    y = streamed(x)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    x0 = x.detach().clone().requires_grad_(True)
    y0 = ref(x0) if ref_head is None else ref_head(ref(x0))
    (y0 * w).sum().backward()
    assert _rel(y, y0) <= tol
    assert _rel(x.grad, x0.grad) <= tol
    for (name, p), q in zip(trunk.named_parameters(), ref.parameters()):
        # a bias right before a normalisation has a (nearly) zero gradient, all cancellation: compare it on the
        # scale of the largest gradient (in float32, whose sums over many positions round, on that scale itself)
        top = max(r.grad.abs().max().item() for r in ref.parameters())
        scale = max(q.grad.abs().max().item(), top * (1e-3 if dtype == torch.float64 else 1.0))
        assert (p.grad - q.grad).abs().max().item() <= tol * scale, name
    for (name, a), b in zip(trunk.named_buffers(), ref.buffers()):
        if a.is_floating_point():
            # the running mean of a zero-mean map (a convolution without bias of a batch-normalised input) is
            # rounding noise: compare it on the scale of the statistics' values (about 1)
            assert (a - b).abs().max().item() <= tol * max(b.abs().max().item(), 1e-3), name
        else:
            assert torch.equal(a, b), name
    plan = streamed.last_plan
    assert not plan.conventional and sum(len(s.grid) for s in plan.segments) > len(plan.segments)
    return streamed


def test_batchnorm_in_training_mode_gives_conventional_gradients_and_running_stats():
    model = torchvision.models.resnet18()
    trunk = nn.Sequential(*list(model.children())[:-2]).train()
    _check(trunk, (2, 3, 96, 64), 48)


def test_batchnorm_momentum_none_cumulative_average():
    trunk = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1)).train()  # fmt: skip
    _check(trunk, (2, 2, 48, 40), 24)


@pytest.mark.parametrize("ndim", [2, 3])
def test_monai_unet_with_default_instance_norm(ndim):
    from monai.networks.nets import UNet

    shape = (1, 1, 48, 48) if ndim == 2 else (1, 1, 24, 24, 16)
    _check(UNet(ndim, 1, 2, (4, 8, 16), (2, 2)), shape, 24 if ndim == 2 else 16)


def test_groupnorm_and_a_streamed_head():
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.GroupNorm(4, 8))  # fmt: skip
    _check(trunk, (2, 3, 64, 48), 24, head=GlobalPool("avg"))


def test_squeeze_excitation_mobilenet_v3():
    _check(torchvision.models.mobilenet_v3_small().features.eval(), (1, 3, 96, 96), 48)


def test_squeeze_excitation_efficientnet_b0_with_in_place_silu_in_its_mlp():
    # torchvision's SE block runs SiLU(inplace=True) on the pooled vector, a global value read whole
    trunk = torchvision.models.efficientnet_b0().features[:4].eval()
    _check(trunk, (1, 3, 96, 96), 48)


def test_timm_style_mean_and_float32():
    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1 = nn.Conv2d(c, 2, 1)
            self.fc2 = nn.Conv2d(2, c, 1)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)
            return x * self.fc2(torch.relu(self.fc1(s))).sigmoid()

    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SE(8), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, stride=2, padding=1), SE(4))  # fmt: skip
    _check(trunk, (2, 3, 64, 64), 32)
    _check(trunk, (2, 3, 64, 64), 32, dtype=torch.float32, tol=1e-5)


class _ScaledStdConv(nn.Conv2d):
    """timm's ScaledStdConv2d (nfnet) in small: the weight standardised per output channel on every call, with
    F.batch_norm in training mode on the weight (no running statistics), times a learned gain."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * 0.5).view(-1), training=True, momentum=0.0, eps=1e-6)  # fmt: skip
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class _CentredConv(nn.Conv2d):
    """A weight centred over its kernel window: a mean over the weight's last two dims (dims 2, 3, as an image's)."""

    def forward(self, x):
        w = self.weight - self.weight.mean((2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("conv", [_ScaledStdConv, _CentredConv])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_statistics_of_parameters_alone_are_computed_with_each_tile(conv, dtype, tol):
    # a normalisation or spatial mean whose input the image does not flow into is the same for every tile: it was
    # rewritten into a streamed statistic all the same, and the model refused ("segment ending at reshape does not
    # depend on the image": timm's nfnet row, streamed exactly before the functional norms were streamed)
    trunk = nn.Sequential(conv(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          conv(8, 8, 3, padding=1, stride=2), nn.ReLU(), conv(8, 4, 3, padding=1)).train()  # fmt: skip
    streamed = _check(trunk, (2, 3, 48, 40), 24, dtype=dtype, tol=tol)
    assert len(streamed.last_plan.segments) > 1


def test_instance_norm_tracking_running_stats_in_training_is_refused():
    trunk = nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True)).train()
    with pytest.raises(NotStreamableError, match="track_running_stats"):
        StreamingModule(trunk, tile_size=16)(torch.randn(1, 1, 40, 40))


@pytest.mark.parametrize("transposed", [False, True])
def test_a_segment_ending_in_a_convolution_does_not_recompute_it(transposed):
    # NOTE [ Last convolution not recomputed ] in execute.py: the backward calls the last convolution's backward on
    # the recomputed input; a batch norm in training mode cuts right after every convolution, so each segment ends
    # in one, and each convolution runs once per tile of its segment (the forward), exact as before
    last = nn.ConvTranspose2d(6, 3, 2, stride=2) if transposed else nn.Conv2d(6, 3, 3, padding=1, stride=2)
    trunk = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.PReLU(),
                          nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), last).train()  # fmt: skip
    calls = {k: 0 for k in ("0", "3", "6")}
    for name in calls:
        count = lambda *a, name=name: calls.__setitem__(name, calls[name] + 1)  # noqa: E731
        trunk.get_submodule(name).register_forward_hook(observer_hook(count))
    streamed = _check(trunk, (2, 2, 48, 40), 24)
    plan = streamed.last_plan
    tiles = {sp.segment.out.target: len(sp.grid) for sp in plan.segments if not sp.keep}
    tiles = {name: n for name, n in tiles.items() if name in calls}
    assert tiles and max(tiles.values()) > 1, plan
    for name, n in tiles.items():  # a forward pass over the tiles and nothing in the backward
        assert calls[name] == n + 1, (name, calls, tiles)  # + 1: the plain reference run in _check


@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float64, 1e-10), (torch.float32, 1e-4)],  # float32: sums over the map round in another order
)
def test_whole_pieces_compute_their_statistics_in_place(dtype, tol):
    # NOTE [ Whole pieces ] in graph.py: consecutive one-tile segments run as one piece on the whole map, its
    # graph kept, the BatchNorm layers inside called as themselves (batch statistics and running statistics as in
    # the conventional step), next to streamed segments whose statistics are accumulated tile by tile
    trunk = torchvision.models.efficientnet_b0().features[:5].eval()
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    calls: dict[str, int] = {}
    for name, m in trunk.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(
                observer_hook(lambda *a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
            )
    # batch 2: with one image the pooled output of a batch-normalised map is its bias
    streamed = _check(trunk, (2, 3, 128, 96), 64, dtype=dtype, tol=tol, head=GlobalPool("avg"))
    plan = streamed.last_plan
    pieces = [sp for sp in plan.segments if sp.segment.whole]
    assert pieces and all(sp.keep and len(sp.grid) == 1 for sp in pieces), plan
    assert any(not sp.keep and len(sp.grid) > 1 for sp in plan.segments), plan  # and streamed statistics
    inside = {sp.segment.out.name for sp in pieces}
    native = {
        n.meta["tilegrad_module"] for sp in pieces for n in sp.segment.nodes if "tilegrad_module" in n.meta
    }
    assert native and inside
    for name, n in calls.items():  # the layer itself once per step in a whole piece (+ 1: the reference run)
        assert n == (2 if name in native else 1), (name, n)


def test_a_batchnorm_called_twice_updates_its_running_statistics_twice():
    # review of the whole pieces: one BatchNorm module called at a streamed position (its statistics accumulated
    # tile by tile) and again inside a whole piece (the layer itself); the conventional step updates it twice, and
    # a check by module path dropped the engine's update (num_batches_tracked 1 instead of 2 per step)
    shared = nn.BatchNorm2d(8)
    layers = [nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
              nn.Conv2d(8, 8, 3, padding=1, stride=2), shared, nn.ReLU()]  # fmt: skip
    for _ in range(3):
        layers += [nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU()]
    layers += [nn.Conv2d(8, 8, 3, padding=1), shared, nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)]
    streamed = _check(
        nn.Sequential(*layers).train(), (2, 2, 128, 112), 48
    )  # running statistics compared there
    plan = streamed.last_plan
    # the shared layer's two statistics (fx names the module "4" at both calls): one inside a whole piece, one
    # streamed between the segments
    graph = plan.segments[0].segment.graph
    inside = {n for sp in plan.segments if sp.segment.whole for n in sp.segment.nodes}
    shared_stats = [r for r in graph.reductions if r.meta.get("tilegrad_module") == "4"]
    assert len(shared_stats) == 2 and len([r for r in shared_stats if r in inside]) == 1, str(plan)
    assert int(shared.num_batches_tracked) == 2


class _SplitAttention(nn.Module):
    """timm ResNeSt's split attention in small: the gate's reshape reads the batch size from the pooled statistic
    (``x.size(0)`` of a global value: an int the engine hands on as it is; was AttributeError: 'int' object has no
    attribute 'detach')."""

    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, 2 * c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        b = s.size(0)
        a = self.fc(s).view(b, 2, -1).softmax(1)
        return x * a[:, 0].reshape(b, -1, 1, 1) + (x * x) * a[:, 1].reshape(b, -1, 1, 1)


def test_squeeze_excitation_reading_sizes_from_the_map():
    # MONAI's ChannelSELayer: ``b, c = x.shape[:2]; pool(x).view(b, c)``: the sizes come from the map, constants
    # for the statistic (was TypeError: forward() missing 1 required positional argument: 'input', the global node
    # built from the whole trunk); and an int-valued global node
    from monai.networks.blocks import ChannelSELayer

    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ChannelSELayer(2, 8, r=2), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, stride=2), _SplitAttention(8))  # fmt: skip
    _check(trunk, (2, 3, 64, 48), 32)
    _check(trunk, (2, 3, 64, 48), 32, dtype=torch.float32, tol=1e-5)


# review of the statistics without float64 copies: a bfloat16 / float16 tile's variance was rounded to its dtype
# (2.6e-3 relative in bfloat16), and apply_norm's backward failed on bfloat16 data with float32 statistics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_moments_and_apply_norm(dtype):
    from tilegrad.statistics import apply_norm, moments_partial

    torch.manual_seed(0)
    x = (3 + 2 * torch.randn(2, 4, 16, 16)).to(dtype)
    count, mean, m2 = moments_partial(x, "batch")  # a tile's partial, accumulated wide
    wide = x.double().transpose(0, 1).reshape(4, -1)
    assert _rel(m2.double() / count.double(), wide.var(1, correction=0)) < 1e-6
    assert _rel(mean.double(), wide.mean(1)) < 1e-6
    x.requires_grad_(True)
    stats = torch.stack([torch.randn(4), torch.rand(4) + 0.5]).requires_grad_(True)  # mean, variance
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    y = apply_norm(x, stats, w, b, mode="batch")
    grads = torch.autograd.grad(y.sum(), [x, stats, w, b])
    xr = x.detach().float().requires_grad_(True)
    ref = torch.autograd.grad(apply_norm(xr, stats, w, b, mode="batch").sum(), [xr, stats, w, b])
    for g, r in zip(grads, ref):
        assert _rel(g.float(), r) < 1e-2


class _SE(nn.Module):
    """A timm-style squeeze-excitation for 2D or 3D maps (the mean over space, a small MLP, a channel gate)."""

    def __init__(self, c, ndim):
        super().__init__()
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.dims = tuple(range(2, 2 + ndim))
        self.fc1, self.fc2 = conv(c, 2, 1), conv(2, c, 1)

    def forward(self, x):
        return x * self.fc2(torch.relu(self.fc1(x.mean(self.dims, keepdim=True)))).sigmoid()


def _recompute_case(kind: str, ndim: int) -> tuple[nn.Module, tuple[int, ...], int]:
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    shape = (2, 2, 40, 36) if ndim == 2 else (2, 2, 24, 20, 16)
    tile = 20 if ndim == 2 else 12
    if kind == "instance":
        from monai.networks.nets import UNet

        shape = (1, 1, 48, 40) if ndim == 2 else (1, 1, 24, 24, 16)
        return UNet(ndim, 1, 2, (4, 8, 16), (2, 2)), shape, (24 if ndim == 2 else 16)
    norm = {
        "group": lambda c: nn.GroupNorm(2, c),
        "batch": lambda c: (nn.BatchNorm2d if ndim == 2 else nn.BatchNorm3d)(c),
        "se": lambda c: _SE(c, ndim),
    }[kind]
    trunk = nn.Sequential(conv(2, 6, 3, padding=1), norm(6), nn.PReLU(), conv(6, 6, 3, padding=1, stride=2),
                          norm(6), nn.ReLU(), conv(6, 4, 3, padding=1), norm(4), nn.ReLU(),
                          conv(4, 3, 3, padding=1))  # fmt: skip
    return trunk.train(), shape, tile


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("kind", ["instance", "group", "batch", "se"])
def test_statistic_inputs_recomputed_by_their_readers(kind, ndim, dtype, tol):
    # NOTE [ Recomputed statistic inputs ] in statistics.py: tiers="recompute" makes every statistic's input one its
    # readers compute again per tile instead of reading it from a store; outputs, input gradient, every parameter
    # gradient and BatchNorm's running statistics as the plain computation's (compared in _check)
    trunk, shape, tile = _recompute_case(kind, ndim)
    streamed = _check(trunk, shape, tile, dtype=dtype, tol=tol, tiers="recompute")
    plan = streamed.last_plan
    if kind != "batch":  # and without gradients (a BatchNorm would update its statistics again)
        x = torch.randn(*shape, dtype=dtype)
        with torch.no_grad():
            assert _rel(streamed(x), trunk(x)) <= tol
        assert any(b.tier == "recompute" for b in streamed.last_plan.boundaries)
    again = {b.name for b in plan.boundaries if b.tier == "recompute"}
    assert again, str(plan)
    for sp in plan.segments:  # never read, never stored
        assert not again & {s.name for s in sp.segment.sources}, str(plan)
    # and at least one reader recomputes its input over several tiles
    graph = plan.segments[0].segment.graph
    forced = {n for n in graph.forced if n.name in again}
    readers = [sp for sp in plan.segments if forced & set(sp.segment.nodes) and sp.segment.out not in forced]
    assert any(len(sp.grid) > 1 for sp in readers), str(plan)
