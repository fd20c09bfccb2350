"""The toolkit for writing geometry rules: teach tilegrad the receptive field of a layer it does not know.

A *rule* takes ``(ctx, module, node, inputs)``: a :class:`Context` (spatial rank, the layer's name for messages), the
module (None for functions and tensor methods), the ``torch.fx`` node, and the geometries of the node's spatial
inputs; it returns the geometry of the output (tilegrad/geometry/core.py) or refuses with ``ctx.refuse(why)``.
:func:`register_geometry_rule` files it under a module type (subclasses inherit it), a function or a tensor method
name. The building blocks here are the ones tilegrad's own rules (tilegrad/geometry/rules/) are written with:

* ``ctx.op(g, stride, lo, hi)``: a local op whose output j reads its input j*stride + lo ... j*stride + hi;
* ``ctx.tup(value, name)``: an int or a sequence as one entry per spatial dim;
* :func:`merge`: element-wise combination of several tensors on the same grid (additions, concatenations);
* :func:`window`: a sliding window (kernel, stride, padding, dilation), as convolutions and pooling have;
* :func:`elementwise`, :func:`pixel_shuffle`, :func:`refusing`: ready-made rules;
* :func:`layout_aware`: marks a rule that handles any layout of its input (NOTE [ Layouts and tile extents ] in
  tilegrad/geometry/layout.py); other rules only ever see tensors in the standard (N, C, *spatial) layout.

>>> import torch
>>> from torch import nn
>>> from tilegrad.geometry import receptive_field
>>> class Blur(nn.Module):  # a 5-tap box filter along every spatial axis, written without a Conv module
...     def forward(self, x):
...         return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2)
>>> def blur_rule(ctx, module, node, inputs):
...     return window(ctx, inputs, kernel=5, stride=1, padding=2)
>>> register_geometry_rule(Blur, blur_rule)
>>> print(receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), Blur()), ndim=2))
stride 1 x 1, halo 3+3 x 3+3 px, receptive field 7 x 7 px
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import ConfigError, NotStreamableError
from .core import Geometry
from .layout import Layout, standard

__all__ = [
    "Context",
    "Rule",
    "elementwise",
    "forward_hook_count",
    "function_rule",
    "has_forward_hooks",
    "layout_aware",
    "merge",
    "module_rule",
    "node_arg",
    "observer_hook",
    "overrides_computation",
    "pixel_shuffle",
    "planning_state",
    "refuses",
    "refusing",
    "register_geometry_rule",
    "shuffle",
    "window",
]

Rule = Callable[["Context", Any, torch.fx.Node, list[Geometry]], Geometry]
"""``rule(ctx, module_or_None, node, spatial_input_geometries) -> output geometry``."""

_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}


def register_geometry_rule(target: type | Callable[..., Any] | str, rule: Rule) -> None:
    """Teach tilegrad the geometry of a custom module type, function or tensor method name (a string with dots is
    the qualified name of a function or a module class, ``"torchvision.ops.stochastic_depth.stochastic_depth"``,
    ``"monai.networks.blocks.selfattention.SABlock"``: no import needed).

    ``rule(ctx, module, node, inputs)`` receives the geometries of the spatial inputs and returns the output's;
    ``ctx.op(geometry, stride, lo, hi)`` applies a local op (units of its input), ``ctx.refuse(why)`` raises
    NotStreamableError naming the layer. Subclasses of a registered module type use its rule, unless they override
    ``forward`` (or a method the registered type's forward runs): those are traced through (NOTE [ Subclasses that
    change what a layer computes ]). The building blocks
    are in :mod:`tilegrad.geometry.toolkit`.
    """
    if not callable(rule):
        raise ConfigError(
            f"a geometry rule is a callable (ctx, module, node, inputs) -> Geometry, received {type(rule).__name__}"
        )
    if not (isinstance(target, (type, str)) or callable(target)):
        raise ConfigError(
            f"register_geometry_rule takes a module type, a function or a tensor method name, received {target!r}"
        )
    if isinstance(target, type):
        _MODULE_RULES[target] = rule
    else:
        _FUNCTION_RULES[target] = rule


def module_rule(module: nn.Module | type) -> Rule | None:
    """The rule registered for ``module``'s type (or ``module`` itself, a type) or its nearest base class, by the
    class or by its qualified name, or None."""
    for klass in (module if isinstance(module, type) else type(module)).__mro__:
        rule = _MODULE_RULES.get(klass) or _FUNCTION_RULES.get(f"{klass.__module__}.{klass.__qualname__}")
        if rule is not None:
            return rule
    return None


# NOTE [ Subclasses that change what a layer computes ]
# A rule registered for a module type describes what that type's forward computes; a subclass inherits it only
# while it computes the same thing. A subclass that overrides ``forward`` (timm's BatchNormAct2d adds an activation,
# LayerNorm2d permutes to channels-last, a home-made Conv2d pads first) or a method the registered class's forward
# runs (Conv2d's ``_conv_forward``) may compute anything: its rule would describe the parent and the engine would
# plan (and, for statistics layers, rewrite) the parent's computation, a silent wrong result. Such a module is
# traced through instead (trace.py's ``_Tracer.is_leaf_module``), so the rules of the functions its forward really
# calls decide, and it streams or is refused as they say; a trace that cannot follow its forward fails with the
# layer named. Methods that do not change the result (``__init__``, ``extra_repr``, parameter initialisation, state
# dict loading, input checks) do not count, nor do torch.nn's own subclasses (the rules are written for the family,
# and the registry contract in tests/geometry/test_registry.py checks them). Two cases keep the inherited rule: a rule registered for the subclass
# itself (by class or by name), and a refusing rule (:func:`refusing`): a subclass of a refused layer is refused too.
# The same holds for one module whose ``forward`` was replaced on the instance (``conv.forward = ...``): traced
# through. Forward hooks and pre-hooks on a layer with a rule (:func:`has_forward_hooks`) may change its input or
# output too (a pre-hook that blurs, an output hook that scales), and what they do cannot be read: such a layer is
# refused by name (trace.py's ``_propagate``), unless each hook is marked :func:`observer_hook` (it only watches:
# tilegrad's own memory bookkeeping, a user's hook that records what a layer sees), which then runs on every tile.
# Hooks on modules that are traced through (containers, the subclasses above) are traced with them; hooks on the
# model itself would be left out of the trace (fx traces its forward, not its __call__) and are refused. A segment's
# last convolution runs torch's own convolution backward only for torch's own convolution classes without such hooks
# (graph.py's ``last_convolution``). A parametrized layer (``torch.nn.utils.parametrize``: weight_norm, spectral_norm)
# keeps its type's rule (its forward is the type's; its weight is computed from other parameters on every read, once
# per tile), but not that backward (it would give the gradient to the computed weight); one whose parametrization
# changes its own state on each read (spectral_norm's power iteration in training mode) is refused by name
# (:func:`stateful_parametrization`), with the way to stream it exactly.
_NEUTRAL_METHODS = frozenset(
    {
        "__init__",
        "__repr__",
        "__setstate__",
        "__getstate__",
        "extra_repr",
        "reset_parameters",
        "reset_running_stats",
        "_check_input_dim",
        "_load_from_state_dict",
        "_save_to_state_dict",
    }
)


def overrides_computation(module: nn.Module | type) -> bool:
    """True when ``module``'s type inherits its rule from a base class (not registered for the type itself) and
    overrides ``forward`` or another method the base class defines (NOTE [ Subclasses that change what a layer
    computes ]); False for a registered type itself, an unregistered one and a subclass that only adds methods or
    changes construction."""
    mro = (module if isinstance(module, type) else type(module)).__mro__
    owner = next((i for i, k in enumerate(mro) if _registered(k)), None)
    if owner is None:
        return False
    if not isinstance(module, type) and any(
        n in vars(module) for n in ("forward", "__call__", "_conv_forward")
    ):
        return (
            True  # an instance whose forward was replaced (module.forward = ...): its own type's rule is moot
        )
    base = mro[owner]
    for klass in mro[:owner]:
        if klass.__module__.startswith("torch.nn."):
            continue  # torch's own kin of the registered type (InstanceNorm2d's _get_no_batch_dim): the same family
        for name, value in vars(klass).items():
            if name in ("forward", "__call__", "_call_impl"):
                return True  # whatever it is (a function, functools.partialmethod, a descriptor)
            if name in _NEUTRAL_METHODS or not (
                callable(value)
                or isinstance(value, (property, classmethod, staticmethod, functools.partialmethod))
            ):
                continue
            if hasattr(base, name) and name not in vars(nn.Module):
                return True
    return False


def observer_hook(hook: Callable[..., None]) -> Callable[..., None]:
    """Mark a forward (pre-)hook as one that only watches (returns None, changes nothing): tilegrad's own memory
    bookkeeping (memory/watch.py), which plans while it watches. :func:`has_forward_hooks` does not count it."""
    hook.tilegrad_observer = True  # type: ignore[attr-defined]
    return hook


def forward_hook_count(module: nn.Module) -> int:
    """The forward hooks and pre-hooks registered on ``module`` itself that may change what it computes (all but
    :func:`observer_hook` ones)."""
    return _changing((*module._forward_hooks.values(), *module._forward_pre_hooks.values()))


def _changing(hooks: Sequence[Callable[..., Any]]) -> int:
    """How many of ``hooks`` are not marked :func:`observer_hook`."""
    return sum(not getattr(h, "tilegrad_observer", False) for h in hooks)


def planning_state(module: nn.Module) -> tuple[tuple[bool, int], ...]:
    """What a trace or a plan of ``module`` bakes in besides its code: every layer's train/eval flag (a BatchNorm
    frozen by .eval() is element-wise, in training a streamed statistic) and its hooks that may change it (refused)."""
    return tuple((m.training, forward_hook_count(m)) for m in module.modules())


def has_forward_hooks(module: nn.Module) -> bool:
    """True when calling ``module`` runs forward hooks or forward pre-hooks (its own or global ones) that may change
    what it computes, which its type's rule does not describe (NOTE [ Subclasses that change what a layer computes
    ])."""
    from torch.nn.modules import module as torch_module

    global_hooks = (
        *getattr(torch_module, "_global_forward_hooks", {}).values(),
        *getattr(torch_module, "_global_forward_pre_hooks", {}).values(),
    )
    return forward_hook_count(module) + _changing(global_hooks) > 0


def stateful_parametrization(module: nn.Module) -> str | None:
    """The name of the tensor of ``module`` whose parametrization changes its own state each time it is read (the
    ``torch.nn.utils.parametrizations.spectral_norm`` power iteration in training mode), or None. A tile reads it
    once per tile, forward and backward: a slightly different weight for each, and the iteration advanced once per
    tile where a conventional step advances it once."""
    parametrizations = getattr(module, "parametrizations", None)
    if not isinstance(parametrizations, nn.ModuleDict):
        return None
    for name, chain in parametrizations.items():
        if any(type(p).__name__ == "_SpectralNorm" and p.training for p in chain):
            return name
    return None


def _registered(klass: type) -> bool:
    return klass in _MODULE_RULES or f"{klass.__module__}.{klass.__qualname__}" in _FUNCTION_RULES


def refuses(rule: Rule | None) -> bool:
    """True for a rule made by :func:`refusing` (it refuses every use of its target)."""
    return bool(getattr(rule, "tilegrad_refuses", False))


def function_rule(target: Any) -> Rule | None:
    """The rule registered for a function, its qualified name or a tensor method name, or None."""
    rule = _FUNCTION_RULES.get(target) if not isinstance(target, str) or "." not in target else None
    if rule is None and not isinstance(target, str):
        qualified = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
        rule = _FUNCTION_RULES.get(qualified)
    return rule


def layout_aware(rule: Rule) -> Rule:
    """Mark ``rule`` as handling inputs in any layout (it reads ``ctx.layouts`` and may set ``ctx.layout``)."""
    rule.tilegrad_layout_aware = True  # type: ignore[attr-defined]
    return rule


class Context:
    """What a rule knows besides its inputs: the spatial rank (``ndim``), the layer's name (``where``), the layouts
    of the spatial inputs (``layouts``, one per input; NOTE [ Layouts and tile extents ]) and, through
    :meth:`value` and :meth:`meta`, what the walker knows of the node's arguments. A layout-aware rule that changes
    the layout sets ``ctx.layout``."""

    def __init__(
        self,
        ndim: int,
        where: str,
        layouts: Sequence[Layout] | None = None,
        values: dict[torch.fx.Node, Any] | None = None,
    ):
        self.ndim = ndim
        self.where = where
        self.layouts: list[Layout] = list(layouts) if layouts is not None else []
        self.layout: Layout | None = None
        self.across_batch: str | None = None
        self._values = values if values is not None else {}

    def input_layout(self, index: int = 0) -> Layout:
        """The layout of spatial input ``index`` (the standard layout when the walker gave none)."""
        return self.layouts[index] if index < len(self.layouts) else standard(self.ndim)

    def value(self, arg: Any) -> Any:
        """What the walker knows of a node argument: a spatial tensor (``Spatial``), an Extent/ExtentTuple/
        TileDependent (tilegrad/geometry/layout.py) or None for a constant; a plain argument is returned as is."""
        return self._values.get(arg) if isinstance(arg, torch.fx.Node) else arg

    def meta(self, arg: Any) -> Any:
        """The value ``arg`` had in the trace's meta run (a meta tensor, a torch.Size, an int), or None."""
        return arg.meta.get("tilegrad_meta") if isinstance(arg, torch.fx.Node) else None

    def mixes_batch(self, label: Any, what: str) -> None:
        """Record that the op acts along a dim labelled ``label`` and so mixes samples of a batch when that label
        holds the batch dim (``"N"`` or ``"NC"``): local for the image, but not for tiles stacked along the batch
        dim (NOTE [ Tile batches ] in infer.py); the walker keeps ``what`` in the node's meta."""
        if isinstance(label, str) and "N" in label:
            self.across_batch = what

    def refuse(self, why: str) -> None:
        """Raise NotStreamableError: '<where> cannot be streamed: <why>'."""
        raise NotStreamableError(f"{self.where} cannot be streamed: {why}")

    def op(
        self,
        geometry: Geometry,
        stride: Sequence[Fraction | int],
        lo: Sequence[Fraction | int],
        hi: Sequence[Fraction | int],
    ) -> Geometry:
        """Apply a local op whose output j depends on its input j*stride + lo ... j*stride + hi (per dim, in units
        of the op's input)."""
        dims = tuple(
            d.then(Fraction(s), Fraction(a), Fraction(b)) for d, s, a, b in zip(geometry.dims, stride, lo, hi)
        )
        align = tuple(math.lcm(a, d.stride.numerator) for a, d in zip(geometry.align, dims))
        return Geometry(dims, align)

    def tup(self, value: Any, name: str) -> tuple[int, ...]:
        """``value`` (an int, or a sequence of one or ``ndim`` entries) as one entry per spatial dim."""
        if isinstance(value, int):
            return (value,) * self.ndim
        value = tuple(value)
        if len(value) == 1:
            return value * self.ndim
        if len(value) != self.ndim:
            self.refuse(f"{name}={value} has {len(value)} entries but the input has {self.ndim} spatial dims")
        return value


def merge(ctx: Context, inputs: list[Geometry]) -> Geometry:
    """Element-wise combination of several spatial tensors: same stride, union of dependencies."""
    if not inputs:
        ctx.refuse("it has no spatial input")
    if len(set(ctx.layouts)) > 1:
        ctx.refuse(
            "it combines tensors whose dims are in different orders ("
            + " and ".join(sorted({str(layout) for layout in ctx.layouts}))
            + ")"
        )
    out = inputs[0]
    for other in inputs[1:]:
        if any(a.stride != b.stride for a, b in zip(out.dims, other.dims)):
            strides = [tuple(str(d.stride) for d in g.dims) for g in (out, other)]
            ctx.refuse(f"it combines tensors on different grids (strides {strides[0]} and {strides[1]})")
        out = Geometry(
            tuple(a.union(b) for a, b in zip(out.dims, other.dims)),
            tuple(math.lcm(x, y) for x, y in zip(out.align, other.align)),
        )
    return out


@layout_aware
def elementwise(ctx: Context, module: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    """The rule of point-wise ops (activations, additions, dtype casts): :func:`merge` of the inputs, in any layout."""
    return merge(ctx, inputs)


def window(
    ctx: Context, inputs: list[Geometry], kernel: Any, stride: Any, padding: Any, dilation: Any = 1
) -> Geometry:
    """A sliding window over one input, with torch's conventions (``stride`` None or () means the kernel size;
    ``padding`` may be "valid" or "same")."""
    (g,) = inputs
    k = ctx.tup(kernel, "kernel_size")
    s = ctx.tup(stride if stride not in (None, ()) else kernel, "stride")
    d = ctx.tup(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            p = (0,) * ctx.ndim
        else:  # "same": torch pads total d*(k-1), the smaller half on the left
            p = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    else:
        p = ctx.tup(padding, "padding")
    return ctx.op(
        g,
        s,
        [-pi for pi in p],
        [-pi + di * (ki - 1) for ki, di, pi in zip(k, d, p)],
    )


def shuffle(ctx: Context, g: Geometry, factor: int) -> Geometry:
    """Pixel shuffle by ``factor``: output o reads input floor(o / factor) (channels to space)."""
    r = factor
    return ctx.op(g, [Fraction(1, r)] * ctx.ndim, [Fraction(-(r - 1), r)] * ctx.ndim, [0] * ctx.ndim)


def pixel_shuffle(ctx: Context, m: nn.Module, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
    """The rule of a pixel-shuffle module with an ``upscale_factor`` attribute (nn.PixelShuffle and its N-d
    relatives such as tilegrad.models.PixelShuffle3d)."""
    (g,) = inputs
    return shuffle(ctx, g, m.upscale_factor)


def refusing(why: str) -> Rule:
    """A rule that refuses every use of its target, saying ``why`` (global pooling, attention, ...)."""

    def rule(ctx: Context, m: Any, node: torch.fx.Node, inputs: list[Geometry]) -> Geometry:
        ctx.refuse(why)
        raise AssertionError("unreachable")

    rule.tilegrad_refuses = True  # type: ignore[attr-defined]
    return rule


def node_arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a traced call, or ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
