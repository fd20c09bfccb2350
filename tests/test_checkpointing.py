"""checkpoint_sequential: exact gradients, BatchNorm statistics once, fewer saved activations, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tilegrad
from tilegrad import checkpoint_sequential


def body(n: int = 8) -> nn.Sequential:
    return nn.Sequential(
        *[nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Dropout(0.2), nn.ReLU()) for _ in range(n)]
    )


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of activations autograd keeps after the forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def count_calls(module: nn.Sequential) -> list[int]:
    """Per top-level layer, how often it starts running (forward and recomputation); updated in place.

    A pre-hook: the non-reentrant recomputation stops as soon as it has every saved tensor backward needs, which
    can be inside a segment's last layer, before a forward hook would fire.
    """
    calls = [0] * len(module)
    for i, layer in enumerate(module):
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize(
    "segments, recomputed",
    [
        (1, range(8)),  # one segment: the whole module is checkpointed
        (3, range(5)),  # bounds 0, 3, 5, 8: the last segment (layers 5-7) runs plainly
        (8, range(7)),  # one layer per segment: all but the last
    ],
)
def test_gradients_match_plain_backprop_with_dropout(segments, recomputed):
    torch.manual_seed(0)
    plain = body().double()
    ckpt = checkpoint_sequential(plain, segments)
    calls = count_calls(plain)  # the layers are shared: counts both runs below
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    grads = []
    for m in (ckpt, plain):
        torch.manual_seed(1)
        xi = x.clone().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        m(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in plain.parameters()])
    for a, b in zip(*grads):
        assert ((a - b).norm() / b.norm()).item() <= 1e-10
    assert calls == [3 if i in recomputed else 2 for i in range(8)]  # checkpointed: forward + recomputation


def test_keeps_fewer_activations():
    plain = body(8)
    x = torch.randn(1, 4, 32, 32, requires_grad=True)
    full = saved_bytes(plain, x)
    assert saved_bytes(checkpoint_sequential(plain, 4), x) * 2 < full
    assert (
        saved_bytes(checkpoint_sequential(plain, 1), x) * 8 < full
    )  # only the input (and dropout RNG state)


def bn_body(n: int = 6) -> nn.Sequential:
    return nn.Sequential(
        *[
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
            for _ in range(n)
        ]
    )


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average driven by num_batches_tracked
def test_batchnorm_running_statistics_update_once_per_step(momentum):
    torch.manual_seed(2)
    plain = bn_body().double()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    ckpt = checkpoint_sequential(copy.deepcopy(plain), segments=3)
    for _step in range(2):
        x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
        grads = []
        for m in (ckpt, plain):
            m.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            m(xi).sin().sum().backward()
            grads.append([xi.grad] + [p.grad for p in m.parameters()])
        for a, b in zip(*grads):
            assert ((a - b).norm() / b.norm()).item() <= 1e-10
    bns = [[m for m in net.modules() if isinstance(m, nn.BatchNorm2d)] for net in (ckpt, plain)]
    for a, b in zip(*bns):
        assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == 2
        assert torch.allclose(a.running_mean, b.running_mean, rtol=0, atol=1e-14)
        assert torch.allclose(a.running_var, b.running_var, rtol=0, atol=1e-14)


def test_plain_torch_checkpoint_updates_batchnorm_twice():
    """Why the test above matters: torch.utils.checkpoint alone counts every checkpointed BatchNorm twice."""
    net = bn_body(2)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False).sum().backward()
    assert net[0][1].num_batches_tracked.item() == 2


def test_errors():
    with pytest.raises(tilegrad.ConfigError, match=r"between 1 and the number of layers \(8\), received 9"):
        checkpoint_sequential(body(8), 9)
    with pytest.raises(tilegrad.ConfigError, match=r"takes an nn\.Sequential, received Conv2d"):
        checkpoint_sequential(nn.Conv2d(1, 1, 1), 1)
