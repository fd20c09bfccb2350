"""Reversible blocks: exact gradients, invertibility, BatchNorm statistics, RNG replay, memory flat in depth."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import tilegrad
from tilegrad import AdditiveCoupling, ReversibleSequential, ShapeError

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def branch(c: int, ndim: int, kind: str = "conv") -> nn.Module:
    conv = CONV[ndim]
    if kind == "conv":  # conv-ReLU-conv, small weights so 16 blocks stay well conditioned
        return nn.Sequential(conv(c, c, 3, padding=1), nn.ReLU(), conv(c, c, 3, padding=1))
    if kind == "bn":
        return nn.Sequential(conv(c, c, 3, padding=1, bias=False), BN[ndim](c), nn.ReLU())  # bias: zero grad
    if kind == "dropout":
        return nn.Sequential(conv(c, c, 3, padding=1), nn.Dropout(0.3), nn.LeakyReLU())
    if kind == "pointwise":
        return nn.Sequential(conv(c, c, 1), nn.Tanh())
    raise ValueError(kind)


def blocks(n: int, c: int, ndim: int, kind: str = "conv") -> list[AdditiveCoupling]:
    return [AdditiveCoupling(branch(c, ndim, kind), branch(c, ndim, kind)) for _ in range(n)]


def grads_of(module: nn.Module, x: torch.Tensor, loss_fn=lambda y: (y * y.detach().sin()).sum()):
    """Forward + backward; return (output, [input grad, every parameter grad])."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    loss_fn(y).backward()
    return y.detach(), [x.grad] + [p.grad for p in module.parameters()]


def assert_close(a: list, b: list, rel: float) -> None:
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u is not None and v is not None, f"gradient {i} missing"
        err = ((u - v).norm() / v.norm().clamp_min(1e-300)).item()
        assert err <= rel, f"tensor {i}: relative error {err:.3g} > {rel:g}"


# ------------------------------------------------------------------------------------------- equivalence ----


@pytest.mark.parametrize(
    "ndim, shape",
    [
        (1, (3, 8, 40)),  # 1D, batch 3
        (2, (2, 8, 12, 11)),  # 2D, odd width
        (3, (1, 4, 6, 7, 5)),  # 3D, batch 1
    ],
)
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gradients_match_plain_backprop_at_16_blocks(ndim, shape, dtype, rel):
    torch.manual_seed(0)
    bl = blocks(16, shape[1] // 2, ndim)
    plain = nn.Sequential(*bl).to(dtype)
    rev = ReversibleSequential(*bl)  # same parameters
    x = torch.randn(shape, dtype=dtype)
    y_rev, g_rev = grads_of(rev, x)
    y_plain, g_plain = grads_of(plain, x)
    assert_close([y_rev], [y_plain], rel)
    assert_close(g_rev, g_plain, rel)
    assert len(g_rev) == 1 + 16 * 2 * 4


def test_nested_and_called_twice_per_step():
    """The same stack used twice in one graph, between ordinary layers: gradients accumulate as in plain backprop."""
    torch.manual_seed(1)
    bl = blocks(3, 3, 2)
    stem, head = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 1, 1)

    class Net(nn.Module):
        def __init__(self, stack):
            super().__init__()
            self.stem, self.stack, self.head = stem, stack, head

        def forward(self, x):
            h = self.stack(self.stem(x))
            return self.head(self.stack(torch.relu(h)))

    rev, plain = Net(ReversibleSequential(*bl)).double(), Net(nn.Sequential(*bl)).double()
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    _, g_rev = grads_of(rev, x)
    _, g_plain = grads_of(plain, x)
    assert_close(g_rev, g_plain, 1e-10)


def test_frozen_parameters_and_input_without_grad():
    """Frozen parameters get no gradient; the others match plain backprop of an independent copy of the blocks."""
    torch.manual_seed(2)
    bl = blocks(4, 2, 1)
    for p in bl[1].parameters():
        p.requires_grad_(False)
    plain = nn.Sequential(*copy.deepcopy(bl)).double()  # own parameters: its backward cannot fill rev's grads
    rev = ReversibleSequential(*bl).double()
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    for m in (rev, plain):
        m.zero_grad(set_to_none=True)
        m(x).square().sum().backward()  # x does not require grad
    assert all(p.grad is None for p in rev.blocks[1].parameters())
    g_rev = [p.grad for p in rev.parameters() if p.requires_grad]
    g_plain = [p.grad for p in plain.parameters() if p.requires_grad]
    assert len(g_rev) == len(g_plain) == 3 * 2 * 4
    assert_close(g_rev, g_plain, 1e-10)


def test_no_grad_forward_is_plain_and_matches():
    torch.manual_seed(3)
    rev = ReversibleSequential(*blocks(3, 2, 2))
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(rev(x), nn.Sequential(*rev.blocks)(x))


def amp_grads_of(module: nn.Module, x: torch.Tensor):
    """Like grads_of, the usual AMP pattern: forward under bfloat16 autocast, backward outside it."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
        loss = (y * y.detach().sin()).sum()
    loss.backward()  # the reversible recomputation runs here, where autocast is off: it must replay the state
    return y.detach(), [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("kind", ["conv", "bn"])
def test_autocast_bfloat16_matches_plain_autocast(kind):
    """Backward outside autocast: the recomputation replays the forward's autocast state, so each branch
    recomputes with the same bfloat16 ops as plain autocast backprop. For these 1D stacks the gradients are
    bit-identical (0 difference measured); without the replay they differ by up to 0.13 (conv) and 0.06 (bn)."""
    torch.manual_seed(0)
    bl = blocks(4, 4, 1, kind)
    plain = nn.Sequential(*copy.deepcopy(bl))
    rev = ReversibleSequential(*bl)
    x = torch.randn(3, 8, 40)
    y_rev, g_rev = amp_grads_of(rev, x)
    y_plain, g_plain = amp_grads_of(plain, x)
    assert torch.equal(y_rev, y_plain)  # same ops, same rounding in forward
    # tight, not zero: a float32 rounding in the reconstruction can flip one bfloat16 cast (seen at other seeds)
    assert_close(g_rev, g_plain, 1e-6)


@pytest.mark.parametrize("ndim, shape", [(1, (2, 8, 20)), (2, (2, 8, 10, 10)), (3, (1, 8, 5, 6, 5))])
def test_autocast_recomputation_runs_in_bfloat16(ndim, shape):
    """Every convolution runs in bfloat16 in forward and again in the recomputation outside autocast."""
    torch.manual_seed(4)
    bl = blocks(3, 4, ndim, "bn")
    plain = nn.Sequential(*copy.deepcopy(bl))
    rev = ReversibleSequential(*bl)
    dtypes: list[torch.dtype] = []
    for m in rev.modules():
        if isinstance(m, CONV[ndim]):
            m.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    x = torch.randn(shape)
    _, g_rev = amp_grads_of(rev, x)
    calls = 3 * 2 * 2  # 3 blocks, 2 branches of one conv each (bn kind), forward + recomputation
    assert dtypes == [torch.bfloat16] * calls
    _, g_plain = amp_grads_of(plain, x)
    assert_close(g_rev, g_plain, 5e-2)  # bfloat16 gradients: a rounding flip in the reconstruction spreads


# ------------------------------------------------------------------------------------------ invertibility ----


@pytest.mark.parametrize("kind", ["conv", "bn", "dropout", "pointwise"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_round_trip_of_every_block_type(kind, ndim):
    torch.manual_seed(5)
    stack = ReversibleSequential(*blocks(3, 2, ndim, kind)).double().eval()
    x = torch.randn(2, 4, *(6,) * ndim, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(stack.inverse(stack(x)), x, atol=1e-12)
        assert torch.allclose(stack.blocks[0].inverse(stack.blocks[0](x)), x, atol=1e-12)


def test_inverse_in_training_mode_is_exact_and_leaves_buffers_alone():
    """Training-mode BatchNorm sees the forward's inputs again, so the inverse is exact, and it is not a training
    step: running statistics and num_batches_tracked stay as the forward left them (NOTE [ Inverse in training
    mode ])."""
    torch.manual_seed(5)
    stack = ReversibleSequential(*blocks(3, 2, 3, "bn")).double()
    x = torch.randn(2, 4, 5, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = stack(x)
        before = [b.clone() for b in stack.buffers()]
        assert torch.allclose(stack.inverse(y), x, rtol=0, atol=1e-12)
    after = list(stack.buffers())
    assert len(after) == 6 * 3 and all(torch.equal(a, b) for a, b in zip(before, after))
    assert {int(m.num_batches_tracked) for m in stack.modules() if isinstance(m, nn.BatchNorm3d)} == {1}


def test_inverse_refuses_training_mode_dropout_and_names_it():
    torch.manual_seed(5)
    stack = ReversibleSequential(*blocks(2, 2, 2, "dropout"))
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        y = stack(x)
        with pytest.raises(
            tilegrad.NotInvertibleError, match=r"blocks\.0\.f\.1 \(Dropout\).*Call \.eval\(\)"
        ):
            stack.inverse(y)
        with pytest.raises(
            tilegrad.NotInvertibleError, match=r"AdditiveCoupling\.inverse: .*: f\.1 \(Dropout\)"
        ):
            stack.blocks[1].inverse(y)
        stack.eval()
        assert torch.allclose(stack.inverse(stack(x)), x, atol=1e-5)


class Noise(nn.Module):
    """A random layer tilegrad cannot know by its type."""

    def forward(self, x):
        return x + 0.1 * torch.randn_like(x) if self.training else x


def test_inverse_refuses_a_branch_that_draws_random_numbers():
    torch.manual_seed(5)
    block = AdditiveCoupling(nn.Sequential(branch(2, 2, "bn"), Noise()), branch(2, 2))
    y = torch.randn(2, 4, 6, 6)
    before = [b.clone() for b in block.buffers()]
    with torch.no_grad(), pytest.raises(tilegrad.NotInvertibleError, match="f or g drew random numbers"):
        block.inverse(y)
    assert all(torch.equal(a, b) for a, b in zip(before, block.buffers()))  # restored on the error path too
    with torch.no_grad():
        x = block.eval().inverse(y)
        assert torch.allclose(block(x), y, atol=1e-5)


def test_round_trip_other_split_dim():
    block = AdditiveCoupling(nn.Linear(3, 3), nn.Linear(3, 3), split_dim=-1).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(block.inverse(block(x)), x, atol=1e-12)
    rev, plain = ReversibleSequential(block), nn.Sequential(block)
    assert_close(grads_of(rev, x)[1], grads_of(plain, x)[1], 1e-10)


# ---------------------------------------------------------------------------------- statistics, randomness ----


@pytest.mark.parametrize("momentum", [0.1, None])  # None: cumulative average driven by num_batches_tracked
def test_batchnorm_running_statistics_update_once_per_step(momentum):
    torch.manual_seed(6)
    bl = blocks(3, 3, 3, "bn")
    for m in nn.Sequential(*bl).modules():
        if isinstance(m, nn.BatchNorm3d):
            m.momentum = momentum
    plain = nn.Sequential(*copy.deepcopy(bl)).double()
    rev = ReversibleSequential(*bl).double()
    for _step in range(2):
        x = torch.randn(2, 6, 5, 5, 5, dtype=torch.float64)
        _, g_rev = grads_of(rev, x)
        _, g_plain = grads_of(plain, x)
        assert_close(g_rev, g_plain, 1e-10)
    bns_rev = [m for m in rev.modules() if isinstance(m, nn.BatchNorm3d)]
    bns_plain = [m for m in plain.modules() if isinstance(m, nn.BatchNorm3d)]
    assert len(bns_rev) == 6
    for a, b in zip(bns_rev, bns_plain):
        assert a.num_batches_tracked.item() == b.num_batches_tracked.item() == 2
        assert torch.allclose(a.running_mean, b.running_mean, rtol=0, atol=1e-14)
        assert torch.allclose(a.running_var, b.running_var, rtol=0, atol=1e-14)


def test_dropout_replays_the_same_masks_and_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    bl = blocks(4, 3, 2, "dropout")
    rev, plain = ReversibleSequential(*bl).double(), nn.Sequential(*bl).double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    torch.manual_seed(123)
    y_rev, g_rev = grads_of(rev, x)
    after_rev = torch.rand(3)
    torch.manual_seed(123)
    y_plain, g_plain = grads_of(plain, x)
    after_plain = torch.rand(3)
    assert torch.equal(y_rev, y_plain)
    assert_close(g_rev, g_plain, 1e-10)
    assert torch.equal(after_rev, after_plain)


def test_without_rng_replay_dropout_gradients_are_wrong():
    """The replay is what makes the dropout test pass (guards against a test that cannot fail)."""
    torch.manual_seed(7)
    bl = blocks(4, 3, 2, "dropout")
    rev = ReversibleSequential(*bl, preserve_rng_state=False).double()
    plain = nn.Sequential(*bl).double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    torch.manual_seed(123)
    _, g_rev = grads_of(rev, x)
    torch.manual_seed(123)
    _, g_plain = grads_of(plain, x)
    with pytest.raises(AssertionError):
        assert_close(g_rev, g_plain, 1e-3)


# ------------------------------------------------------------------------------------ reconstruction check ----


class Scale(nn.Module):
    def __init__(self, inner: nn.Module, factor: float):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x):
        return self.inner(x) * self.factor


def test_reconstruction_check_warns_with_the_number_on_drift():
    torch.manual_seed(8)
    # large branch outputs without normalisation: activations grow ~1000x over 6 blocks, float32 rounding drifts
    bl = [AdditiveCoupling(Scale(branch(2, 2), 10.0), Scale(branch(2, 2), 10.0)) for _ in range(6)]
    rev = ReversibleSequential(*bl, check_reconstruction=1e-3)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    with pytest.warns(tilegrad.ReconstructionWarning, match=r"differs from the true input by [0-9.e+-]+"):
        rev(x).sum().backward()
    assert rev.last_reconstruction_error > 1e-3


def test_reconstruction_check_quiet_on_a_healthy_stack():
    torch.manual_seed(9)
    rev = ReversibleSequential(*blocks(8, 2, 2, "bn"), check_reconstruction=1e-3)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rev(x).sum().backward()
    assert 0 <= rev.last_reconstruction_error < 1e-5


# ------------------------------------------------------------------------------------------------ errors ----


def test_odd_channel_count_names_the_numbers():
    rev = ReversibleSequential(*blocks(2, 2, 2))
    with pytest.raises(ShapeError, match=r"splits dim 1 .* 5 entries .*\(1, 5, 4, 4\)"):
        rev(torch.randn(1, 5, 4, 4, requires_grad=True))


def test_branch_changing_the_shape_is_refused():
    block = AdditiveCoupling(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    with pytest.raises(ShapeError, match=r"AdditiveCoupling.f must return .*\(1, 2, 6, 6\).*\(1, 3, 6, 6\)"):
        block(torch.randn(1, 4, 6, 6))


def test_non_reversible_block_is_refused():
    with pytest.raises(tilegrad.NotInvertibleError, match="block 1 is Conv2d"):
        ReversibleSequential(*blocks(1, 2, 2), nn.Conv2d(4, 4, 1))


@pytest.mark.parametrize("threshold", [0, -1e-3])
def test_reconstruction_threshold_must_be_positive(threshold):
    with pytest.raises(tilegrad.ConfigError, match=rf"threshold > 0 .* received {threshold}"):
        ReversibleSequential(*blocks(1, 2, 2), check_reconstruction=threshold)


# ------------------------------------------------------------------------------ cost, safety, variants ----


class Counted(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_each_branch_runs_once_in_forward_and_once_in_backward():
    """Reconstruction and recomputation share one evaluation per branch (NOTE [ One Function over the whole stack ])."""
    torch.manual_seed(11)
    bl = [AdditiveCoupling(Counted(branch(2, 2)), Counted(branch(2, 2))) for _ in range(5)]
    rev = ReversibleSequential(*bl)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    y = rev(x)
    assert all(b.f.calls == b.g.calls == 1 for b in bl)
    y.sum().backward()
    assert all(b.f.calls == b.g.calls == 2 for b in bl)


def test_instance_norm_with_running_stats_updates_once():
    """Every buffer a training-mode layer updates is restored after the recomputation, not only BatchNorm's."""
    torch.manual_seed(12)

    def inorm_branch():
        return nn.Sequential(
            nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.InstanceNorm2d(3, track_running_stats=True)
        )

    bl = [AdditiveCoupling(inorm_branch(), inorm_branch()) for _ in range(3)]
    plain = nn.Sequential(*copy.deepcopy(bl)).double()
    rev = ReversibleSequential(*bl).double()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    assert_close(grads_of(rev, x)[1], grads_of(plain, x)[1], 1e-10)
    norms = [m for m in rev.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 6 and all(m.running_mean.abs().sum() > 0 for m in norms)  # updated...
    for a, b in zip(rev.buffers(), plain.buffers()):  # ...once: a second update would move them further
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


class FullShift(nn.Module):
    """x / 2 + p with p shaped like the whole half: autograd may hand back the incoming gradient itself as p's."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.p = nn.Parameter(torch.randn(shape, dtype=torch.float64))

    def forward(self, x):
        return x / 2 + self.p


def test_branches_whose_outputs_or_gradients_alias_their_inputs():
    """The backward pass overwrites its own buffers in place (NOTE [ Reconstruct in place ]); identity branches
    and parameter gradients that are the incoming gradient itself must not be corrupted by it."""
    torch.manual_seed(16)
    half = (2, 2, 7)
    bl = [AdditiveCoupling(nn.Identity(), FullShift(half)), AdditiveCoupling(FullShift(half), nn.Identity())]
    bl += [AdditiveCoupling(branch(2, 1), branch(2, 1)).double() for _ in range(2)]
    plain = nn.Sequential(*copy.deepcopy(bl))
    rev = ReversibleSequential(*bl)
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    assert_close(grads_of(rev, x)[1], grads_of(plain, x)[1], 1e-10)
    # y.sum(): the incoming gradient is an expanded (stride 0) tensor
    assert_close(grads_of(rev, x, lambda y: y.sum())[1], grads_of(plain, x, lambda y: y.sum())[1], 1e-10)


def test_input_and_output_shared_with_other_layers():
    """Regression for memcnn's keep_input=False crash: neighbours that saved the stack's input or output still
    backpropagate correctly, because nothing is freed or modified in place."""
    torch.manual_seed(13)
    bl = blocks(3, 2, 2)

    def net(stack, x):
        h = torch.relu(x)  # relu saves h, the stack's input
        y = stack(h)
        return (y * h).sum() + (y * y).sum()  # both factors saved by mul: stack input and stack output

    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    results = []
    for stack in (ReversibleSequential(*bl).double(), nn.Sequential(*bl).double()):
        xi = x.clone().requires_grad_(True)
        stack.zero_grad(set_to_none=True)
        net(stack, xi).backward()
        results.append([xi.grad] + [p.grad for p in stack.parameters()])
    assert_close(*results, 1e-10)


def test_output_modified_in_place_is_an_error_not_a_wrong_gradient():
    rev = ReversibleSequential(*blocks(2, 2, 2))
    y = rev(torch.randn(1, 4, 5, 5, requires_grad=True))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_autograd_grad_returns_gradients_without_touching_dot_grad():
    torch.manual_seed(14)
    bl = blocks(4, 2, 1)
    rev, plain = ReversibleSequential(*bl).double(), nn.Sequential(*bl).double()
    x = torch.randn(2, 4, 10, dtype=torch.float64, requires_grad=True)
    params = list(rev.parameters())
    g_rev = torch.autograd.grad(rev(x).square().sum(), [x, *params])
    g_plain = torch.autograd.grad(plain(x).square().sum(), [x, *params])
    assert all(p.grad is None for p in params)
    assert_close(list(g_rev), list(g_plain), 1e-10)


def test_memory_saving_false_is_plain_backprop_with_the_same_state_dict():
    torch.manual_seed(15)
    bl = blocks(3, 2, 2, "bn")
    rev = ReversibleSequential(*bl).double()
    naive = ReversibleSequential(*copy.deepcopy(bl), memory_saving=False).double()
    assert naive.state_dict().keys() == rev.state_dict().keys()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_close(grads_of(rev, x)[1], grads_of(naive, x)[1], 1e-10)
    y = naive(x.requires_grad_(True))
    assert y.grad_fn is not None and "Reversible" not in type(y.grad_fn).__name__  # a plain autograd graph
    assert "memory_saving=False" in repr(naive)


# -------------------------------------------------------------------------------------------- streaming ----


def test_receptive_field_of_a_reversible_stack():
    stack = ReversibleSequential(*blocks(4, 2, 2, "pointwise"))  # 1x1 branches: halo 0
    assert tilegrad.receptive_field(stack, ndim=2).halo == ((0, 0), (0, 0))
    # f and g with a 3x3 conv each: y1 reaches 1 px, y2 = x2 + g(y1) reaches 2 px, per block
    bl = [AdditiveCoupling(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)) for _ in range(3)]
    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), ReversibleSequential(*bl))
    assert tilegrad.receptive_field(trunk, ndim=2).halo == ((7, 7), (7, 7))


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_streaming_module_over_a_reversible_trunk_is_exact(dtype, rel):
    torch.manual_seed(10)
    bl = blocks(3, 2, 2)
    stem = nn.Conv2d(1, 4, 3, padding=1)
    rev_trunk = nn.Sequential(stem, ReversibleSequential(*bl)).to(dtype)
    plain_trunk = nn.Sequential(stem, nn.Sequential(*bl)).to(dtype)
    streamed = tilegrad.StreamingModule(rev_trunk, tile_size=32, mode="lean")
    x = torch.randn(2, 1, 50, 41, dtype=dtype)
    y_s, g_s = grads_of(streamed, x)
    y_p, g_p = grads_of(plain_trunk, x)
    assert streamed.last_plan is not None and len(streamed.last_plan.segments[0].grid) > 1
    assert_close([y_s], [y_p], rel)
    assert_close(g_s, g_p, rel)


# ------------------------------------------------------------------------------------------------ memory ----

_PEAK_SCRIPT = """
import sys, torch, tilegrad
from torch import nn
sys.path.insert(0, {tests!r})
from test_reversible import blocks
torch.manual_seed(0)
kind, depth = sys.argv[1], int(sys.argv[2])
bl = blocks(depth, 8, 2)
module = tilegrad.ReversibleSequential(*bl) if kind == "rev" else nn.Sequential(*bl)
x = torch.randn(1, 16, 160, 160, requires_grad=True)  # 1.6 MB per activation
def step():
    module(x).sum().backward()
step()  # warm up allocator and autograd
print(min(tilegrad.measure_peak_memory(step) for _ in range(2)))
"""


def test_memory_is_flat_in_depth(subprocess_peak):
    """Peak of one training step, each configuration in a fresh process (no allocator history)."""
    script = _PEAK_SCRIPT.format(tests=str(Path(__file__).parent))
    peaks = {
        (kind, depth): subprocess_peak(script, kind, depth, threads=1)
        for kind in ("rev", "plain")
        for depth in (4, 16)
    }
    summary = {k: f"{v / 2**20:.1f} MiB" for k, v in peaks.items()}
    assert peaks["rev", 16] <= 1.3 * peaks["rev", 4], summary
    # the same measurement sees plain backprop grow with depth, so it can tell
    assert peaks["plain", 16] >= 2.5 * peaks["plain", 4], summary
    assert peaks["rev", 16] * 3 <= peaks["plain", 16], summary


def test_guide_examples_run(doc_blocks, doc_examples):
    """The python blocks of docs/reversible.md run as written (ESPCN-sized shapes are small enough)."""
    assert len(doc_blocks("reversible.md")) == 3
    spaces = doc_examples("reversible.md", shared=False)
    assert spaces[1]["stack"].last_reconstruction_error > 1e-3
    assert [w.category for w in spaces[1]["caught"]] == [tilegrad.ReconstructionWarning]
    assert spaces[2]["body"][0][1].num_batches_tracked.item() == 1
