"""Subclasses of registered layers that change what the layer computes (NOTE [ Subclasses that change what a layer
computes ] in tilegrad/geometry/toolkit.py): traced through, so they stream exactly as they really compute, or are
refused naming the layer. Before, each of the computing subclasses below took its parent's rule: planned as the
plain convolution, pooling or batch norm, a tile came out wrong (or, for a statistics layer in training mode, its
extra work was dropped by the rewrite) with no error."""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tilegrad import NotStreamableError, StreamingModule, receptive_field
from tilegrad.geometry import register_geometry_rule, toolkit
from tilegrad.geometry.toolkit import overrides_computation, window

from ..test_stream import rel_err


class AsymmetricPadConv(nn.Conv2d):
    """Pads 2 px on the left and 1 px on top before an unpadded convolution: a shifted receptive field."""

    def forward(self, x):
        return super().forward(F.pad(x, (2, 0, 1, 0)))


class ShiftedConv(nn.Conv2d):
    """Adds a learned per-channel shift and an activation after the convolution."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shift = nn.Parameter(torch.randn(self.out_channels, 1, 1))

    def forward(self, x):
        return torch.relu(super().forward(x) + self.shift)


class ReflectConv(nn.Conv2d):
    """Overrides only ``_conv_forward``: reflection padding of 2 px where the layer declares zero padding of 1."""

    def _conv_forward(self, x, weight, bias):
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), weight, bias, self.stride, 0, self.dilation)


class BatchNormAct(nn.BatchNorm2d):
    """A batch norm followed by an activation in one layer (timm's BatchNormAct2d does this)."""

    def forward(self, x):
        return F.silu(super().forward(x))


class GroupNormAct(nn.GroupNorm):
    """A group norm followed by an activation (timm's GroupNormAct): traced into F.group_norm, a streamed statistic."""

    def forward(self, x):
        return F.silu(super().forward(x))


class InstanceNormAct(nn.InstanceNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x)) * 2


class PaddedPool(nn.MaxPool2d):
    """Pads the right and bottom border with -inf before pooling (a 'same' pooling for even sizes)."""

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1), value=float("-inf")))


class Quiet(nn.Conv2d):
    """Changes only construction and its description: still a plain convolution."""

    def __init__(self, c: int):
        super().__init__(c, c, 3, padding=1)

    def extra_repr(self) -> str:
        return "quiet"


def _net(layer: nn.Module, c: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, c, 3, padding=1),
        nn.ReLU(),
        layer,
        nn.Conv2d(c, c, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, 2, 3, padding=1),
    )


LAYERS = {
    "asymmetric pad conv": lambda: AsymmetricPadConv(3, 3, 3),
    "shifted conv": lambda: ShiftedConv(3, 3, 3, padding=1),
    "_conv_forward only": lambda: ReflectConv(3, 3, 5, padding=1),
    "batch norm + act (eval)": lambda: BatchNormAct(3).eval(),
    "padded max pool": lambda: PaddedPool(2, stride=1),
    # statistics over the whole image, traced into the functional form and streamed (NOTE [ Streamed statistics ])
    "group norm + act": lambda: GroupNormAct(3, 3),
    "instance norm + act": lambda: InstanceNormAct(3, affine=True),
    "batch norm + act (batch statistics, none kept)": lambda: BatchNormAct(3, track_running_stats=False),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_computing_subclasses_stream_exactly(name, dtype, tol):
    torch.manual_seed(0)
    layer = LAYERS[name]()
    assert overrides_computation(layer)
    if (
        isinstance(layer, nn.BatchNorm2d) and layer.track_running_stats
    ):  # statistics that are not the identity
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    _assert_streams_exactly(_net(layer).to(dtype), dtype, tol)


def _assert_streams_exactly(net: nn.Module, dtype: torch.dtype, tol: float) -> StreamingModule:
    x = torch.randn(1, 2, 40, 36, dtype=dtype, requires_grad=True)
    expected_out = net(x)
    weight = torch.randn_like(expected_out)
    (expected_out * weight).sum().backward()
    expected = [expected_out.detach(), x.grad.clone(), *(p.grad.clone() for p in net.parameters())]
    x.grad = None
    net.zero_grad(set_to_none=True)
    streamed = StreamingModule(net, 16, mode="stages")
    out = streamed(x)
    (out * weight).sum().backward()
    got = [out.detach(), x.grad, *(p.grad for p in net.parameters())]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a is not None and rel_err(a, b) <= tol
    assert len(streamed.last_plan.segments) > 1
    return streamed


class Tripled(nn.Conv2d):
    """A convolution times 3, with a geometry rule of its own (the window of its kernel)."""

    def forward(self, x):
        return super().forward(x) * 3


def _instance_forward(c: int) -> nn.Module:
    conv = nn.Conv2d(c, c, 3, padding=1)
    conv.forward = types.MethodType(lambda self, x: nn.Conv2d.forward(self, nn.Conv2d.forward(self, x)), conv)
    return conv


class PartialForward(nn.Conv2d):
    """``forward`` as a functools.partialmethod (not a plain function): a second convolution with the same weight."""

    def _twice(self, x, times):
        for _ in range(times):
            x = nn.Conv2d.forward(self, x)
        return x

    forward = functools.partialmethod(_twice, times=2)


def _blurred_input(c: int) -> nn.Module:
    conv = nn.Conv2d(c, c, 3, padding=1)
    conv.register_forward_pre_hook(lambda m, i: (F.avg_pool2d(i[0], 5, 1, 2),))
    return conv


def _scaled_output(c: int) -> nn.Module:
    conv = nn.Conv2d(c, c, 3, padding=1)
    conv.register_forward_hook(lambda m, i, o: o * 2)
    return conv


CHANGED = {  # plain torch layers whose instance computes something else, found by a review (all were silent)
    "forward replaced on the instance": _instance_forward,
    "forward a partialmethod": lambda c: PartialForward(c, c, 3, padding=1),
}
HOOKED = {  # layers whose hooks change what they compute: were silently planned as the plain layer, now refused
    "pre-hook that blurs": _blurred_input,
    "output hook that scales": _scaled_output,
}


@pytest.mark.parametrize("name", list(CHANGED))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_layers_changed_per_instance_or_by_hooks_stream_exactly(name, dtype, tol):
    torch.manual_seed(0)
    _assert_streams_exactly(_net(CHANGED[name](3)).to(dtype), dtype, tol)


@pytest.mark.parametrize("name", list(HOOKED))
def test_layers_with_hooks_that_may_change_them_are_refused_by_name(name):
    with pytest.raises(NotStreamableError, match=r"'2' \(Conv2d\).*forward hooks.*observer_hook"):
        StreamingModule(_net(HOOKED[name](3)).double(), 16, mode="stages")(torch.randn(1, 2, 40, 36).double())


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_an_observer_hook_runs_on_every_tile_and_streams_exactly(dtype, tol):
    from tilegrad.geometry import observer_hook

    seen = []
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    conv.register_forward_hook(observer_hook(lambda m, i, o: seen.append(tuple(o.shape))))
    streamed = _assert_streams_exactly(_net(conv).to(dtype), dtype, tol)
    tiles = next(s for s in streamed.last_plan.segments if s.segment.out.target == "2").grid
    assert (
        len(seen) >= 1 + len(tiles) and (1, 3, 40, 36) in seen
    )  # the plain run, then tiles smaller than the image
    assert any(shape[2] < 40 for shape in seen)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_a_subclass_with_its_own_rule_ending_a_segment_streams_exactly(monkeypatch, dtype, tol):
    # its rule (a 3x3 window: the x3 is element-wise) is right, so it stays a leaf; it ends the first segment, whose
    # backward skips recomputing its last convolution and ran torch's convolution backward for it: gradients off by
    # 2/3 (graph.py last_convolution)
    monkeypatch.setitem(toolkit._MODULE_RULES, Tripled, lambda ctx, m, n, g: window(ctx, g, 3, 1, 1))
    torch.manual_seed(0)
    streamed = _assert_streams_exactly(_net(Tripled(3, 3, 3, padding=1)).to(dtype), dtype, tol)
    assert streamed.last_plan.segments[0].segment.out.target == "2"


class _Doubled(nn.Module):
    """A parametrization: the layer's weight (or bias) is twice the stored one."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def _parametrized(kind: str, c: int = 3) -> nn.Module:
    from torch.nn.utils import parametrizations, parametrize

    conv = nn.Conv2d(c, c, 3, padding=1)
    if kind == "weight_norm":
        return parametrizations.weight_norm(conv)
    if kind == "spectral_norm":
        # eval: no power iteration, the same weight on every call
        return parametrizations.spectral_norm(conv).eval()
    parametrize.register_parametrization(conv, "weight", _Doubled())
    parametrize.register_parametrization(conv, "bias", _Doubled())
    return conv


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "weight and bias doubled"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_a_parametrized_convolution_ending_a_segment_streams_exactly(kind, dtype, tol):
    # torch.nn.utils.parametrize computes conv.weight from other parameters on each access. The layer ends the first
    # segment, whose backward skipped recomputing it and ran torch's convolution backward on conv.weight: that
    # gradient belonged to the computed tensor, and the parameters it is computed from got none (p.grad None, no
    # error; graph.py last_convolution)
    torch.manual_seed(0)
    net = _net(_parametrized(kind)).to(dtype)
    names = [n for n, p in net.named_parameters() if n.startswith("2.")]
    assert names and all("parametrizations" in n or n == "2.bias" for n in names)
    streamed = _assert_streams_exactly(net, dtype, tol)
    assert streamed.last_plan.segments[0].segment.out.target == "2"
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in net.named_parameters() if n in names)


def test_spectral_norm_in_training_mode_is_refused_and_its_way_forward_is_exact():
    # each read of a spectral-normalised weight in training mode runs a power iteration: streamed, every tile read
    # a slightly different weight (1e-11 apart here) and advanced u and v once per tile, not once per step
    import copy

    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    net = _net(parametrizations.spectral_norm(nn.Conv2d(3, 3, 3, padding=1))).double().train()
    reference = copy.deepcopy(net)
    x = torch.randn(1, 2, 40, 36, dtype=torch.float64, requires_grad=True)
    with pytest.raises(
        NotStreamableError, match=r"'2' \(ParametrizedConv2d\).*'weight' is spectral-normalised"
    ):
        StreamingModule(net, 16, mode="stages")(x)
    # the message's way forward: one read in training mode (one power iteration, as the conventional step makes),
    # then the parametrization in eval mode while streaming
    expected_out = reference(x)
    weight = torch.randn_like(expected_out)
    (expected_out * weight).sum().backward()
    expected = [expected_out.detach(), x.grad.clone(), *(p.grad for p in reference.parameters())]
    x.grad = None
    with torch.no_grad():
        net[2].weight
    net[2].parametrizations.weight.eval()
    streamed = StreamingModule(net, 16, mode="stages")
    out = streamed(x)
    (out * weight).sum().backward()
    got = [out.detach(), x.grad, *(p.grad for p in net.parameters())]
    assert len(streamed.last_plan.segments) > 1
    for a, b in zip(got, expected, strict=True):
        assert a is not None and rel_err(a, b) <= 1e-10
    for a, b in zip(
        net.buffers(), reference.buffers(), strict=True
    ):  # u and v: one iteration, as conventional
        assert torch.equal(a, b)


class _StandardisedByModule(nn.Conv2d):
    """Weight standardisation through a BatchNorm1d layer of its own: the image does not flow into it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wbn = nn.BatchNorm1d(self.out_channels)

    def forward(self, x):
        w = self.wbn(self.weight.reshape(self.out_channels, -1).t()).t().reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _StandardisedByFunction(nn.Conv2d):
    """Weight standardisation through F.batch_norm with running buffers (``running`` False: none passed, as timm's
    ScaledStdConv2d does)."""

    def __init__(self, *args, running: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("rm", torch.zeros(self.out_channels) if running else None)
        self.register_buffer("rv", torch.ones(self.out_channels) if running else None)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), self.rm, self.rv, training=True)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding)


class _SpectralShifted(ShiftedConv):
    pass


def _spectral_traced_through() -> nn.Module:
    from torch.nn.utils import parametrizations

    return parametrizations.spectral_norm(_SpectralShifted(3, 3, 3, padding=1))


PER_TILE_SIDE_EFFECTS = {
    "batch norm module on the weight": (
        lambda: _StandardisedByModule(3, 3, 3, padding=1),
        r"'2.wbn' \(BatchNorm1d in _StandardisedByModule\).*running statistics.*once per tile",
    ),
    "F.batch_norm on the weight with running buffers": (
        lambda: _StandardisedByFunction(3, 3, 3, padding=1),
        r"batch_norm.*inside '2' \(_StandardisedByFunction\).*running_mean=None",
    ),
    "spectral norm on a layer traced through": (
        _spectral_traced_through,
        r"'2.parametrizations.weight'.*'weight' is spectral-normalised in training mode",
    ),
}


@pytest.mark.parametrize("name", list(PER_TILE_SIDE_EFFECTS))
def test_a_side_effect_on_parameters_that_would_run_once_per_tile_is_refused(name):
    # a node of parameters alone runs again with every tile: exact for its value, not for running statistics
    # updated or a power iteration advanced (streamed, the 18 tile calls of this plan updated them 18 times)
    build, message = PER_TILE_SIDE_EFFECTS[name]
    torch.manual_seed(0)
    net = _net(build()).double().train()
    with pytest.raises(NotStreamableError, match=message):
        StreamingModule(net, 16, mode="stages")(torch.randn(1, 2, 40, 36, dtype=torch.float64))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_the_same_parameter_arithmetic_without_the_side_effect_streams_exactly(dtype, tol):
    # no running buffers (timm's ScaledStdConv2d), and the batch norm layer in eval mode: exact, nothing refused
    torch.manual_seed(0)
    _assert_streams_exactly(
        _net(_StandardisedByFunction(3, 3, 3, padding=1, running=False)).to(dtype), dtype, tol
    )
    layer = _StandardisedByModule(3, 3, 3, padding=1)
    net = _net(layer).to(dtype)
    net.train()
    layer.wbn.eval()
    _assert_streams_exactly(net, dtype, tol)


def test_the_plan_follows_a_layer_switched_to_training_mode():
    # the plan cache was keyed on the wrapper's train flag only: bn.train() after a first step reused the frozen
    # BatchNorm's plan (element-wise) and normalised each tile by the running statistics
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    net = _net(bn).double()
    bn.eval()
    streamed = StreamingModule(net, 16, mode="stages")
    x = torch.randn(1, 2, 40, 36, dtype=torch.float64)
    streamed(x)
    bn.train()
    with torch.no_grad():
        expected = net(x)
    bn.running_mean.zero_()
    bn.running_var.fill_(1)
    bn.num_batches_tracked.zero_()
    with torch.no_grad():
        got = streamed(x)
    assert rel_err(got, expected) <= 1e-10


def test_the_receptive_field_is_the_subclass_one():
    """The asymmetric pad shifts the window: 2 px more reach on the left, 1 px more on top, none on the right."""
    plain = receptive_field(nn.Conv2d(3, 3, 3), 2)
    padded = receptive_field(AsymmetricPadConv(3, 3, 3), 2)
    assert padded.halo != plain.halo
    (top, bottom), (left, right) = padded.halo
    assert (top, bottom, left, right) == (1, 1, 2, 0)


def test_batch_norm_subclass_in_training_mode_is_refused_naming_it():
    """nn.BatchNorm2d in training mode streams with its statistics rewritten (statistics.py), which would drop the
    subclass's activation; traced through, its batch statistics are refused with the layer named."""
    net = _net(BatchNormAct(3)).train()
    with pytest.raises(NotStreamableError, match=r"'2'.*\(BatchNormAct\).*batch statistics"):
        StreamingModule(net, 16)(torch.randn(1, 2, 40, 36))


def test_neutral_subclasses_keep_the_rule():
    assert not overrides_computation(Quiet(3))
    assert not overrides_computation(nn.Conv2d(1, 1, 1))
    assert not overrides_computation(nn.InstanceNorm3d(2))  # torch.nn's own kin of the registered type
    assert not overrides_computation(nn.LazyConv2d(2, 3))


def test_a_rule_registered_for_the_subclass_wins(monkeypatch):
    """A user who registered the subclass's own geometry keeps it (the layer stays a leaf of the trace)."""

    class Registered(AsymmetricPadConv):
        pass

    monkeypatch.setitem(toolkit._MODULE_RULES, Registered, lambda ctx, m, n, g: window(ctx, g, 7, 1, 3))
    assert not overrides_computation(Registered(3, 3, 3))
    assert receptive_field(Registered(3, 3, 3), 2).halo == ((3, 3), (3, 3))


def test_a_subclass_of_a_refused_layer_is_refused():
    class Attention(nn.MultiheadAttention):
        def forward(self, x):
            return super().forward(x, x, x)[0]

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 4, 1)
            self.attn = Attention(4, 1)

        def forward(self, x):
            return self.attn(self.conv(x).transpose(1, 2)).transpose(1, 2)

    with pytest.raises(NotStreamableError, match="attention over all positions is global"):
        receptive_field(Tokens(), 1)


def test_an_untraceable_override_is_refused_naming_the_layer():
    class DataDependent(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x

    net = _net(DataDependent(3, 3, 3, padding=1))
    with pytest.raises(NotStreamableError, match=r"'2' \(DataDependent\).*overrides forward"):
        receptive_field(net, 2)


def test_registering_a_rule_makes_an_untraceable_override_stream():
    class DataDependent(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x

    register_geometry_rule(DataDependent, lambda ctx, m, n, g: window(ctx, g, 3, 1, 1))
    try:
        plain = receptive_field(_net(nn.Conv2d(3, 3, 3, padding=1)), 2)
        assert receptive_field(_net(DataDependent(3, 3, 3, padding=1)), 2).halo == plain.halo
    finally:
        del toolkit._MODULE_RULES[DataDependent]


def test_hooks_on_the_model_itself_are_refused_and_wrapping_it_streams_exactly():
    # torch.fx traces the root's forward, not its __call__: its own output hook was left out (error 0.36)
    torch.manual_seed(0)
    net = _net(nn.Identity()).double()
    net.register_forward_hook(lambda m, i, o: o * 2)
    x = torch.randn(1, 2, 40, 36, dtype=torch.float64)
    with pytest.raises(NotStreamableError, match=r"has forward hooks.*nn\.Sequential\(model\)"):
        StreamingModule(net, 16, mode="stages")(x)
    _assert_streams_exactly(nn.Sequential(net), torch.float64, 1e-10)
