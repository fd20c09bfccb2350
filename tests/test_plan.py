"""The planner (tilegrad/plan.py): what it counts, how a fixed tile or a budget limits the plan, and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tilegrad
from tilegrad import GeometryError, StreamingModule
from tilegrad.geometry import observer_hook

from .test_stream import conv_net_2d, rel_err, resnet18_trunk


def test_plan_made_under_no_grad_counts_what_training_saves():
    # regression: planning profiled the trunk in the caller's grad mode; under no_grad nothing was "saved", so
    # kept graphs looked free and the predicted peak was too low
    trunk = resnet18_trunk()
    with torch.no_grad():
        quiet = tilegrad.plan_streaming(trunk, (1, 3, 320, 288), tile_size=160)
    normal = tilegrad.plan_streaming(trunk, (1, 3, 320, 288), tile_size=160)
    assert quiet.peak_bytes == normal.peak_bytes
    # a segment of one convolution reading a boundary saves only its source (counted where it is made): 0 is right
    # there, so compare segment by segment, and the multi-layer segments do save
    assert [s.tile_saved_bytes for s in quiet.segments] == [s.tile_saved_bytes for s in normal.segments]
    assert all(s.tile_saved_bytes > 0 for s in quiet.segments if len(s.segment.nodes) > 2)


def test_fixed_tile_limit_keeps_the_plan_flat_apart_from_input_and_output():
    # NOTE [ Tile memory ]: without a budget the fixed tile sets the limit (lean plan + one tile), so the predicted
    # peak minus input and output stays flat as the image grows 16x in area, while cuts keep it fast
    trunk = resnet18_trunk()
    rest = []
    for side in (1024, 4096):
        plan = tilegrad.plan_streaming(trunk, (1, 3, side, side), tile_size=512)
        io = 4 * (3 * side * side + 512 * (side // 32) ** 2)
        rest.append(plan.peak_bytes - io)
        assert any("tile sets the limit" in n for n in plan.notes)
        assert plan.segments[0].tile == (512, 512)  # the segment reading the image takes the requested tile
    assert rest[1] < 1.5 * rest[0], rest
    lean = tilegrad.plan_streaming(trunk, (1, 3, 4096, 4096), tile_size=512, mode="lean")
    assert plan.time_ratio < lean.time_ratio / 5


def test_tile_too_small_says_the_smallest_that_works():
    net = nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(10)])  # halo 10 px each side
    with pytest.raises(GeometryError) as info:
        StreamingModule(net, 12, mode="lean")(torch.randn(1, 1, 64, 64))
    message = str(info.value)
    assert "tile_size 12" in message and "10 + 10 px" in message and "use at least 21" in message
    StreamingModule(net, 21, mode="lean")(torch.randn(1, 1, 64, 64))  # and that size does work


def test_auto_tile_with_budget_reports_its_choice():
    net = conv_net_2d().double()
    streamed = StreamingModule(net, "auto", memory_budget="64MiB")
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    y = streamed(x)
    assert streamed.last_plan.peak_bytes <= 64 * 2**20
    assert isinstance(streamed.tile_size, tuple) or streamed.last_plan.conventional
    assert "predicted peak" in str(streamed.last_plan)
    assert rel_err(y, net(x)) <= 1e-10


def test_budget_too_small_raises_with_numbers():
    net = conv_net_2d()
    with pytest.raises(tilegrad.MemoryBudgetError, match="no streaming plan fits the memory budget"):
        StreamingModule(net, "auto", memory_budget=1000)(torch.randn(1, 3, 64, 64))


def test_planning_calls_no_forward_hooks():
    # regression (the kept-segment count of tests/test_stream.py was one run too many): the tracer ran each layer
    # on meta tensors through nn.Module.__call__, so the user's hooks saw meta tensors during planning
    trunk = resnet18_trunk()
    seen = []
    trunk.conv1.register_forward_pre_hook(observer_hook(lambda m, args: seen.append(("pre", args[0].device))))
    trunk.layer1[0].conv2.register_forward_hook(
        observer_hook(lambda m, args, out: seen.append(("post", out.device)))
    )
    tilegrad.plan_streaming(trunk, (1, 3, 320, 288), memory_budget="300MiB")
    assert seen == []
    trunk(torch.randn(1, 3, 64, 64))  # the hooks themselves work
    assert ("pre", torch.device("cpu")) in seen and ("post", torch.device("cpu")) in seen


def test_planner_caches_give_what_a_fresh_computation_gives():
    # NOTE [ Planning cost ]: the planner shares one Segment per (output, sources) between cut sets and summarises
    # tile grids without listing them; both must be what a fresh graph and the listed grid say
    from tilegrad.graph import TrunkGraph

    trunk = resnet18_trunk()
    shape = (1, 3, 640, 576)
    graph = TrunkGraph(trunk, shape, torch.float32)
    a, b, c = graph.candidates[2], graph.candidates[5], graph.candidates[8]
    with_c = graph.segments([a, b, c])
    without_c = graph.segments([a, b])
    assert with_c[1] is without_c[1]  # the segment a -> b, shared
    fresh = TrunkGraph(trunk, shape, torch.float32)
    index = {n.name: n for n in fresh.nodes}
    ref = fresh.segments([index[a.name], index[b.name]])[1]
    shared = without_c[1]
    assert [n.name for n in shared.nodes] == [n.name for n in ref.nodes]
    assert [n.name for n in shared.sources] == [n.name for n in ref.sources]
    assert (shared.flops, shared.saved_bytes, shared.largest_bytes, shared.source_bytes) == (
        ref.flops, ref.saved_bytes, ref.largest_bytes, ref.source_bytes
    )  # fmt: skip
    assert shared.geometry == ref.geometry

    plan = tilegrad.plan_streaming(
        trunk, shape, memory_budget="200MiB", input_in_memory=False, head=tilegrad.heads.GlobalPool("max")
    )
    assert len(plan.segments) > 1 and any(s.tiles > 1 for s in plan.segments), str(plan)
    for s in plan.segments:
        tiles = list(s.grid)
        assert s.tiles == len(tiles)
        assert s.max_in_shape == tuple(max(t.in_shape[d] for t in tiles) for d in range(2))
        assert s.input_area == sum(t.in_shape[0] * t.in_shape[1] for t in tiles)


@pytest.mark.parametrize(
    ("side", "kwargs"),
    [
        # ResNet-34 + GlobalPool, lazy input: the deep segments' windows move between the ladder's rungs
        (3072, {"memory_budget": "768MiB", "input_in_memory": False, "head": "max"}),
        (6144, {"memory_budget": "1GiB", "input_in_memory": False, "head": "max"}),
    ],
)
def test_tile_refinement_only_makes_a_plan_faster_at_the_same_peak(side, kwargs):
    # NOTE [ Tile refinement ]: the searched plan's windows move between the ladder's rungs only when the plan's
    # own cost falls, and never above the searched plan's peak; cuts and tiers stay
    import torchvision

    from tilegrad.graph import TrunkGraph
    from tilegrad.plan import BUDGET_SAFETY, _head_flops, _head_name, _Planner

    trunk, _ = tilegrad.split_model(torchvision.models.resnet34().eval(), at="avgpool")
    shape = (1, 3, side, side)
    head = tilegrad.heads.GlobalPool(kwargs.pop("head")) if "head" in kwargs else None
    plan = tilegrad.plan_streaming(trunk, shape, head=head, **kwargs)
    graph = TrunkGraph(trunk, shape, torch.float32)
    planner = _Planner(
        graph, training=True, input_in_memory=kwargs.get("input_in_memory", True), input_grad=False,
        output_in_memory=True, head_flops=_head_flops(head, graph.shape(graph.output), torch.float32),
        head=_head_name(head), tiers="auto", batch_tiles=1,
    )  # fmt: skip
    # the search on the ladder's own windows: NOTE [ Balanced tiles ] already shrinks each window to the smallest
    # with its tile count, which finds these plans in the search itself (plan_streaming's plan below)
    planner._balanced = lambda seg, tile, grid: (tile, grid)  # type: ignore[method-assign]
    requested = None
    budget = int(tilegrad.units.parse_bytes(kwargs["memory_budget"]) * BUDGET_SAFETY)
    searched, _ = planner.search("auto", budget, requested)
    refined = planner.refine(searched, budget, requested)
    assert refined.time_ratio < searched.time_ratio, (str(searched), str(refined))
    assert refined.peak_bytes <= searched.peak_bytes
    assert [s.segment for s in refined.segments] == [s.segment for s in searched.segments]
    assert [(b.name, b.tier, b.grad_tier) for b in refined.boundaries] == [
        (b.name, b.tier, b.grad_tier) for b in searched.boundaries
    ]
    # what plan_streaming returns (balanced windows, then refined) is as fast, within the same peak
    assert plan.time_ratio <= refined.time_ratio * (1 + 1e-12) and plan.peak_bytes <= budget / BUDGET_SAFETY
    # the cost model's parts add up to the ratio, and the plan says them
    assert sum(refined.time_parts.values()) == pytest.approx(refined.time_ratio, rel=1e-12)
    assert refined.time_parts["compute"] >= 1.0 and "halo overlap +" in str(plan)
    for s in refined.segments:  # the refined windows' summaries are their grids'
        assert s.tiles == len(s.grid)
    if requested is not None:
        assert refined.segments[0].tile == requested


def test_the_tile_check_answers_normalisations_with_their_shape_and_keeps_their_shape_errors():
    # _check_tiles runs every tiled segment on meta tiles; there PyTorch runs batch norm as a Python decomposition
    # (RegNet-Y-1.6GF at 64^2: 8.5 of the check's 10.7 s), so a normalisation answers with its input's shape. A
    # layer norm whose normalized_shape does not match the tile still raises, as it would on the tile.
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from tilegrad.plan import _ShapeOnlyNorms

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.empty(2, 4, 6, 5, device="meta")
    c = torch.empty(4, device="meta")
    with Ops() as ops, _ShapeOnlyNorms():
        assert F.batch_norm(x, c, c, c, c).shape == x.shape
    assert not any("norm" in n for n in ops.names), ops.names  # no batch norm kernel ran
    with _ShapeOnlyNorms():
        assert F.group_norm(x, 2, c, c).shape == x.shape
        assert F.instance_norm(x).shape == x.shape
        assert F.layer_norm(x, (6, 5)).shape == x.shape
        with pytest.raises(RuntimeError):
            F.layer_norm(x, (6, 6))
        assert (x + 1).shape == x.shape  # everything else runs as usual


def test_cuts_at_residual_block_outputs_are_candidates_and_exact():
    # NOTE [ Segments over a graph ]: within a stage, a residual block's output that every path goes through is a
    # candidate cut (ResNet-34 at gigapixel sizes: x1.77 -> x1.62 predicted); a plan cutting there is exact (float64:
    # output, input gradient, every parameter gradient)
    from tilegrad.graph import TrunkGraph

    from .test_stream import assert_equivalent

    trunk = resnet18_trunk()
    graph = TrunkGraph(trunk, (1, 3, 256, 256), torch.float32)
    names = [n.name for n in graph.candidates]
    blocks = ["layer1_0_relu_1", "layer1_1_relu_1", "layer2_0_relu_1", "layer3_0_relu_1", "layer4_0_relu_1"]
    assert all(b in names for b in blocks), names
    assert "layer4_1_relu_1" not in names  # the output
    assert not any(
        b in [n.name for n in graph.stage_candidates] for b in ["layer1_0_relu_1", "layer4_0_relu_1"]
    )
    assert not any(n.name.startswith("layer1_0_conv") or n.name == "layer1_0_bn1" for n in graph.candidates)
    # (a budget at which the fastest plan cuts inside layer1: at 600 MiB it cuts at stage outputs only)
    streamed = assert_equivalent(trunk, (1, 3, 512, 448), "auto", memory_budget="400MiB")
    stage = {n.name for n in streamed.last_plan.graph.stage_candidates}
    cuts = [s.segment.out.name for s in streamed.last_plan.segments[:-1]]
    assert any(c not in stage for c in cuts), str(streamed.last_plan)


def test_the_page_cache_is_host_memory_less_a_cpu_budget_only(monkeypatch):
    """NOTE [ Page cache ]: a CPU step's budget is host RAM the page cache cannot have; a CUDA step's budget is device
    memory, another pool (it took 4 GiB of a 20 GiB host's cache for a 4 GiB GPU budget before)."""
    import tilegrad.plan as tplan

    monkeypatch.setattr(tplan, "PAGE_CACHE", None)
    monkeypatch.setattr(tplan, "_available_bytes", lambda: 20 * 2**30 + 123)
    assert tplan.page_cache_bytes(4 * 2**30, "cpu") == 16 * 2**30
    assert tplan.page_cache_bytes(4 * 2**30, torch.device("cuda", 0)) == 20 * 2**30
    assert tplan.page_cache_bytes(None, "cpu") == 20 * 2**30
    # the planner asks with the device the module's parameters are on
    asked = []
    monkeypatch.setattr(tplan, "page_cache_bytes", lambda budget, device="cpu": asked.append(device) or 0)
    tilegrad.plan_streaming(conv_net_2d(), (1, 3, 64, 64), tile_size=32, memory_budget="64MiB")
    assert [torch.device(d).type for d in asked] == ["cpu"]


@pytest.mark.parametrize("cached", [True, False])
def test_disk_reads_cost_a_copy_from_the_page_cache_and_the_disk_beyond_it(monkeypatch, cached):
    # NOTE [ Page cache ]: with a cache larger than every store each read costs DISK_READ; with none, DISK_COLD_READ;
    # writes and adds cost the same either way (a gradient's first adds read unwritten blocks). Counted by hand for a
    # chain of segments: the producer writes its output, its reader reads it in the forward and again in the
    # backward (unless kept), adds into its gradient, and the producer reads that gradient.
    import tilegrad.plan as tplan

    monkeypatch.setattr(tplan, "PAGE_CACHE", 2**50 if cached else 0)
    plan = tilegrad.plan_streaming(conv_net_2d(), (1, 3, 256, 256), tile_size=64, mode="stages", tiers="disk")
    assert len(plan.boundaries) >= 2 and {b.tier for b in plan.boundaries} == {"disk"}
    read = tplan.DISK_READ if cached else tplan.DISK_COLD_READ
    expected = 0.0
    for k, b in enumerate(plan.boundaries):  # b: the output of segment k, read by segment k + 1
        reader = plan.segments[k + 1]
        assert [s.name for s in reader.segment.sources] == [b.name]
        share = 1.0 if reader.keep else reader.overlap
        expected += b.nbytes / tplan.DISK_WRITE + b.nbytes * share / read  # forward
        expected += (0 if reader.keep else b.nbytes * share / read) + b.nbytes * share / tplan.DISK_ADD
        expected += b.nbytes / read  # the producer's backward reads the gradient
    assert plan.time_parts["disk"] * plan.conventional_seconds == pytest.approx(expected, rel=1e-9)


def test_the_planner_recomputes_a_statistic_input_where_its_cost_model_finds_it_faster():
    # NOTE [ Recomputed statistic inputs ] in statistics.py, NOTE [ Cost model ]: MONAI UNet 3D in training mode at
    # 160^3 under a quarter of its peak: the first convolution's 16x80^3 output (a 1-channel convolution of the image,
    # which is in memory) costs less to recompute in its readers' tiles than to store on disk and read back
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(3, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), norm="batch").train()
    shape = (1, 1, 160, 160, 160)
    auto = tilegrad.plan_streaming(model, shape, memory_budget="138MiB")
    again = {b.name for b in auto.boundaries if b.tier == "recompute"}
    assert "model_0_conv" in again, str(auto)
    assert "recomputed by their readers" in str(auto)
    assert not again & {s.name for sp in auto.segments for s in sp.segment.sources}
    assert auto.peak_bytes <= 0.8 * 138 * 2**20
    # the plan with every statistic input stored (on disk: they do not fit the device), under the same budget, is
    # predicted slower, and so is every reader recomputing every input: the choice is the cost model's, input by input
    for tiers in ("disk", "recompute"):
        other = tilegrad.plan_streaming(model, shape, memory_budget="138MiB", tiers=tiers)
        assert other.time_ratio > auto.time_ratio, (tiers, str(other), str(auto))


def test_a_cache_smaller_than_the_maps_serves_part_of_each_reverse_scan(monkeypatch):
    # NOTE [ Page cache ]: training scans each boundary in the reverse order of its previous pass (NOTE [ Tile
    # order ] in execute.py), so a cache smaller than the maps still serves a share of every read: the disk part
    # lies strictly between the all-cold and all-cached figures, and grows as the cache shrinks
    import tilegrad.plan as tplan

    parts = []
    for cache in (0, 2**20, 3 * 2**20, 2**50):
        monkeypatch.setattr(tplan, "PAGE_CACHE", cache)
        plan = tilegrad.plan_streaming(
            conv_net_2d(), (1, 3, 256, 256), tile_size=64, mode="stages", tiers="disk"
        )
        assert max(b.nbytes for b in plan.boundaries) > 2**20
        parts.append(plan.time_parts["disk"])
    assert parts[0] > parts[1] > parts[2] > parts[3], parts


def test_a_depthwise_convolution_costs_its_measured_slowdown():
    # NOTE [ Cost model ]: a depthwise convolution costs DEPTHWISE_CONV times its FLOPs and bytes at the rates, a
    # dense one (and a grouped one that is not depthwise) the rates themselves
    import tilegrad.plan as tplan

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
    )
    plan = tilegrad.plan_streaming(net, (1, 3, 64, 64), tile_size=32, mode="lean")
    profiles = plan.graph.profiles
    cost = {n.target: p.flops / tplan.FLOP_RATE + p.out_bytes / tplan.BYTE_RATE for n, p in profiles.items()}
    assert cost["1"] > 0
    expected = 3 * (sum(cost.values()) + (tplan.DEPTHWISE_CONV - 1) * cost["1"])
    assert plan.conventional_seconds == pytest.approx(expected, rel=1e-12)
