"""Streamed heads (tilegrad.heads, NOTE [ Streamed heads ]): partials of the tiles' cores, combined, equal the head
on the whole map: the output, the gradient with respect to the map and every parameter gradient.

The streamed backward here is the one the engine runs: combine on partials made leaves, the loss backpropagated
into them, then each tile's partial recomputed from its own core (a separate leaf) with a graph and its partial
gradients pushed through; the cores' gradients are assembled into a map.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from tilegrad.errors import NotStreamableError, ShapeError
from tilegrad.heads import STREAMED_HEADS, AttentionMIL, GlobalPool, normalise_attention, streamed_head


def _partition(spatial: tuple[int, ...], rng: random.Random) -> list[tuple[slice, ...]]:
    """Random tiles covering a map once: random cuts per axis (1 to 3 pieces), tiles in a shuffled order."""
    edges = []
    for size in spatial:
        cuts = sorted(rng.sample(range(1, size), k=min(size - 1, rng.randint(0, 2))))
        bounds = [0, *cuts, size]
        edges.append([slice(a, b) for a, b in itertools.pairwise(bounds)])
    tiles = list(itertools.product(*edges))
    rng.shuffle(tiles)
    return tiles


def _streamed(head, x: torch.Tensor, tiles, out_grad: torch.Tensor):
    """The streamed output, the assembled gradient of the map (parameter gradients accumulate in head)."""
    cores = [x[(slice(None), slice(None), *t)].detach() for t in tiles]
    with torch.no_grad():
        partials = [head.partial(c) for c in cores]
    leaves = [tuple(p.detach().requires_grad_(p.is_floating_point()) for p in part) for part in partials]
    out = head.combine(leaves)
    out.backward(out_grad)
    grad = torch.zeros_like(x)
    for core, t, leaf in zip(cores, tiles, leaves):
        core = core.clone().requires_grad_()
        part = head.partial(core)
        pairs = [(p, lf.grad) for p, lf in zip(part, leaf) if lf.grad is not None and p.requires_grad]
        if pairs:
            torch.autograd.backward([p for p, _ in pairs], [g for _, g in pairs])
        if core.grad is not None:
            grad[(slice(None), slice(None), *t)] = core.grad
    return out.detach(), grad


def _heads(channels: int) -> list[tuple[str, nn.Module]]:
    return [
        ("max", GlobalPool("max")),
        ("avg", GlobalPool("avg")),
        ("attention-gated", AttentionMIL(channels, hidden=5, classes=3)),
        ("attention-ungated", AttentionMIL(channels, hidden=4, classes=2, gated=False)),
    ]


# (spatial shape, batch): 2D and 3D, N = 1 and 2, odd sizes
SHAPES = [((7, 9), 1), ((6, 11), 2), ((4, 5, 6), 1), ((3, 7, 5), 2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spatial,batch", SHAPES)
@pytest.mark.parametrize("kind", ["max", "avg", "attention-gated", "attention-ungated"])
def test_streamed_head_equals_whole_map(kind, spatial, batch, dtype):
    torch.manual_seed(len(kind) * 100 + len(spatial) * 10 + batch)
    channels = 6
    head = dict(_heads(channels))[kind].to(dtype)
    x = torch.randn(batch, channels, *spatial, dtype=dtype, requires_grad=True)
    ref = head(x)
    out_grad = torch.randn_like(ref)
    ref.backward(out_grad)
    ref_params = {n: p.grad.clone() for n, p in head.named_parameters()}
    head.zero_grad(set_to_none=True)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    for trial in range(3):
        tiles = _partition(spatial, random.Random(trial))
        out, grad = _streamed(head, x, tiles, out_grad)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out, ref.detach(), rtol=rtol, atol=atol)
        torch.testing.assert_close(grad, x.grad, rtol=rtol, atol=atol)
        for name, p in head.named_parameters():
            torch.testing.assert_close(p.grad, ref_params[name], rtol=rtol, atol=atol, msg=name)
        head.zero_grad(set_to_none=True)


@pytest.mark.parametrize("spatial,batch", SHAPES)
def test_attention_map_from_tiles_is_softmax_of_whole_logits(spatial, batch):
    torch.manual_seed(1)
    head = AttentionMIL(5, hidden=7, classes=2).double()
    x = torch.randn(batch, 5, *spatial, dtype=torch.float64)
    with torch.no_grad():
        whole = torch.softmax(head.logits(x).flatten(2), -1).reshape(batch, 1, *spatial)
        tiles = _partition(spatial, random.Random(7))
        cores = [x[(slice(None), slice(None), *t)] for t in tiles]
        partials = [head.partial(c) for c in cores]
        merged = head.merge(partials)
        for given in (partials, merged):  # a list of partials or the merged one
            amap = torch.zeros(batch, 1, *spatial, dtype=torch.float64)
            for core, t in zip(cores, tiles):
                amap[(slice(None), slice(None), *t)] = normalise_attention(head.logits(core), given)
            torch.testing.assert_close(amap, whole, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(amap.flatten(1).sum(1), torch.ones(batch, dtype=torch.float64))
        torch.testing.assert_close(head.attention(x), whole)


@pytest.mark.parametrize("kind", ["max", "avg", "attention-gated"])
def test_merge_is_associative(kind):
    """An engine may merge as it goes: merging merged groups equals merging all partials."""
    torch.manual_seed(2)
    head = dict(_heads(4))[kind].double()
    x = torch.randn(2, 4, 8, 9, dtype=torch.float64)
    tiles = _partition((8, 9), random.Random(3))
    partials = [head.partial(x[(slice(None), slice(None), *t)]) for t in tiles]
    grouped = [head.merge(partials[:2]), head.merge(partials[2:])] if len(partials) > 2 else partials
    torch.testing.assert_close(head.combine(grouped), head.combine(partials), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(head.combine(partials), head(x), rtol=1e-12, atol=1e-14)


def test_attention_logits_do_not_overflow_in_the_streamed_sum():
    """Large logits: the running log-sum-exp keeps every exp <= 1 (a plain sum of exp(a) would overflow)."""
    head = AttentionMIL(3, hidden=2, classes=2).double()
    with torch.no_grad():
        head.attention_w.weight.fill_(400.0)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64) * 10
    partials = [head.partial(x[..., :3, :]), head.partial(x[..., 3:, :])]
    out = head.combine(partials)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, head(x), rtol=1e-10, atol=1e-12)


def test_max_ties_gradient_goes_to_first_tile_holding_the_maximum():
    """The documented tie rule (NOTE [ Streamed heads ]): the whole map sends the gradient to the first maximum in
    raster order; the streamed head to the first maximum of the first tile (in the partials' order) holding it."""
    head = GlobalPool("max").double()
    x = torch.zeros(1, 1, 2, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        x[0, 0, 0, 1] = 5.0  # first in raster order of the whole map (left tile)
        x[0, 0, 1, 2] = 5.0  # in the right tile
    head(x).sum().backward()
    assert x.grad[0, 0, 0, 1] == 1 and x.grad.sum() == 1
    right_first = [(slice(0, 2), slice(2, 4)), (slice(0, 2), slice(0, 2))]
    out, grad = _streamed(head, x, right_first, torch.ones(1, 1, dtype=torch.float64))
    assert out.item() == 5.0
    assert grad[0, 0, 1, 2] == 1 and grad.sum() == 1  # the right tile came first
    _, grad = _streamed(head, x, right_first[::-1], torch.ones(1, 1, dtype=torch.float64))
    assert grad[0, 0, 0, 1] == 1 and grad.sum() == 1  # left tile first: the conventional choice


def test_avg_partials_accumulate_in_float64_for_float32():
    head = GlobalPool("avg")
    total, count = head.partial(torch.ones(1, 2, 3, 3))
    assert total.dtype == torch.float64 and count.dtype == torch.float32
    assert head.combine([(total, count)]).dtype == torch.float32
    total, count = head.partial(torch.ones(1, 2, 3, 3, dtype=torch.bfloat16))
    assert total.dtype == torch.float32 and count.dtype == torch.float32


def test_streamed_head_accepts_the_streamed_reductions():
    for head in (GlobalPool("max"), GlobalPool("avg"), AttentionMIL(4)):
        assert streamed_head(head) is head


@pytest.mark.parametrize("module", [nn.AdaptiveAvgPool2d(1), nn.Sequential(nn.Flatten(), nn.Linear(4, 2))])
def test_streamed_head_refuses_other_heads_by_name(module):
    with pytest.raises(NotStreamableError) as err:
        streamed_head(module)
    message = str(err.value)
    assert type(module).__name__ in message
    for name in STREAMED_HEADS:
        assert name in message


@pytest.mark.parametrize(
    "call,error,fragment",
    [
        (lambda: AttentionMIL(4).combine([]), ShapeError, "at least one tile"),
        (lambda: GlobalPool("avg").combine([(torch.zeros(1, 2),)]), ShapeError, "2-tuples"),
    ],
)
def test_combine_mistakes(call, error, fragment):
    """Misuse of the engine-facing methods (the user-facing rows are in tests/test_errors.py)."""
    with pytest.raises(error) as err:
        call()
    assert fragment in str(err.value)
