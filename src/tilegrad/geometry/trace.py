"""Trace a module with ``torch.fx`` and apply the geometry rules to its graph: :func:`module_geometry`, and
:func:`receptive_field` (what users see). Every module with a registered rule is a leaf of the trace.

The tracer (:func:`trace_graph`) carries a meta-device value beside every node (NOTE [ Layouts and tile extents ] in
layout.py), so ``len(x.shape)``, branches on sizes and ``torch.jit.isinstance(x, Tensor)`` (MONAI's BasicUNet) trace
as they run; the walker (:func:`_graph_geometry`) follows which dims of each tensor are batch, channel or spatial.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ..errors import ConfigError, NotStreamableError
from .core import Geometry, ReceptiveField
from .layout import Extent, ExtentTuple, Layout, TileDependent, describe, is_spatial, standard
from .toolkit import (
    Context,
    forward_hook_count,
    function_rule,
    has_forward_hooks,
    module_rule,
    overrides_computation,
    planning_state,
    refuses,
    stateful_parametrization,
)

__all__ = [
    "ACROSS_BATCH",
    "explained",
    "module_geometry",
    "node_where",
    "propagate",
    "receptive_field",
    "trace_graph",
    "trunk_output",
]

_META = "tilegrad_meta"
ACROSS_BATCH = "tilegrad_across_batch"
"""node.meta key: set (to the layer and the reason) on a node that mixes the samples of a batch (Context.mixes_batch)."""
_UNKNOWN = object()
# Spatial extent of the example input of the meta run, per spatial rank: multiples of every stride in use, small
# enough that a model which builds CPU tensors from sizes stays cheap (NOTE [ Layouts and tile extents ]).
_EXAMPLE_EXTENT = {1: 4096, 2: 256, 3: 64}


def _meta_of(proxy: torch.fx.Proxy) -> Any:
    return proxy.node.meta.get(_META, _UNKNOWN)


class _MetaProxy(torch.fx.Proxy):
    """A proxy that answers ``len()`` from the meta run (``len(x.shape)``)."""

    def __len__(self) -> int:
        meta = _meta_of(self)
        if meta is _UNKNOWN or not hasattr(meta, "__len__"):
            return super().__len__()
        return len(meta)

    def __getattr__(self, k: str) -> _MetaAttribute:
        return _MetaAttribute(self, k)


class _MetaAttribute(torch.fx.proxy.Attribute, _MetaProxy):
    pass


def _attribute(root: nn.Module, target: str) -> Any:
    """``root.<target>`` read from the modules' own stores: fx patches ``nn.Module.__getattr__`` while tracing."""
    obj: Any = root
    for part in target.split("."):
        stores = [obj.__dict__.get(k, {}) for k in ("_parameters", "_buffers", "_modules")] + [obj.__dict__]
        store = next((d for d in stores if part in d), None)
        if store is None:
            return None
        obj = store[part]
    return obj


class _Tracer(torch.fx.Tracer):
    """fx tracer whose leaves are every module with a registered rule (torch.nn layers and custom ones), and which
    runs each node on the meta device beside the trace when given an example input."""

    def __init__(self, example: torch.Tensor | None = None):
        super().__init__()
        self._example = example
        self._placeholders = 0

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        rule = module_rule(m)
        if rule is not None and not refuses(rule) and overrides_computation(m):
            # NOTE [ Subclasses that change what a layer computes ] in toolkit.py: trace what its forward does
            return False
        return rule is not None or super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _MetaProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):  # type: ignore[no-untyped-def]
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self._example is not None and kind == "get_attr":  # parameters, buffers and tensor constants
            value = _attribute(self.root, target)
            if isinstance(value, torch.Tensor):
                node.meta[_META] = value.detach().to("meta")
        return node

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[no-untyped-def]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self._example is not None:
            meta = self._run_meta(kind, target, args, kwargs)
            if meta is not _UNKNOWN:
                proxy.node.meta[_META] = meta
        return proxy

    def _run_meta(self, kind: str, target: Any, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            self._placeholders += 1
            return self._example if self._placeholders == 1 else _UNKNOWN
        if kind == "get_attr":
            return _UNKNOWN
        missing = False

        def unwrap(a: Any) -> Any:
            nonlocal missing
            if isinstance(a, (torch.fx.Proxy, torch.fx.Node)):
                meta = a.meta.get(_META, _UNKNOWN) if isinstance(a, torch.fx.Node) else _meta_of(a)
                if meta is _UNKNOWN:
                    missing = True
                return meta
            return a

        margs = torch.fx.node.map_aggregate(args, unwrap)
        mkwargs = torch.fx.node.map_aggregate(kwargs, unwrap)
        if missing:
            return _UNKNOWN
        try:
            with torch.no_grad(), _OnMeta():
                if kind == "call_function":
                    return target(*margs, **mkwargs)
                if kind == "call_method":
                    return getattr(margs[0], target)(*margs[1:], **mkwargs)
                if kind == "call_module":
                    return _untraced_call(self.root.get_submodule(target), margs, mkwargs)
        except (
            Exception
        ):  # the meta run is best effort: an op without a meta kernel just leaves the value unknown
            return _UNKNOWN
        return _UNKNOWN

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        meta = _meta_of(obj)
        if meta is _UNKNOWN:
            return super().to_bool(obj)
        return bool(meta)

    def iter(self, obj: torch.fx.Proxy) -> Iterator[Any]:
        meta = _meta_of(obj)
        if meta is _UNKNOWN or not hasattr(meta, "__len__"):
            return super().iter(obj)
        return iter([obj[i] for i in range(len(meta))])


class _OnMeta(TorchDispatchMode):
    """Runs every op of the meta run on the meta device: parameters and buffers are read as meta copies (so an
    in-place update of a running statistic never touches the model) and factory functions allocate nothing."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        def to_meta(t: Any) -> Any:
            return t.to("meta") if isinstance(t, torch.Tensor) and not t.is_meta else t

        kwargs = {k: (torch.device("meta") if k == "device" else v) for k, v in (kwargs or {}).items()}
        return func(*tree_map(to_meta, args), **tree_map(to_meta, kwargs))


def _forward_only(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module.forward(*args, **kwargs)


@contextlib.contextmanager
def hooks_off() -> Iterator[None]:
    """Modules call ``forward`` alone while this lasts: planning runs on meta tensors must not reach the user's
    forward hooks (a hook counting calls or keeping activations would see meta tensors)."""
    patched = nn.Module.__call__
    nn.Module.__call__ = _forward_only  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__ = patched  # type: ignore[method-assign]


def _untraced_call(module: nn.Module, args: Any, kwargs: Any) -> Any:
    """Call ``module`` with fx's patch of ``nn.Module.__call__`` lifted, so its children add no nodes.

    The meta run calls ``forward`` alone, for the module and its children: planning must not call the user's
    forward hooks (a hook counting calls or keeping activations would see meta tensors; the profile in graph.py
    drops them too)."""
    patched = nn.Module.__getattr__
    nn.Module.__getattr__ = torch.fx._symbolic_trace._orig_module_getattr  # type: ignore[method-assign]
    try:
        with hooks_off():
            return _forward_only(module, *args, **kwargs)
    finally:
        nn.Module.__getattr__ = patched  # type: ignore[method-assign]


def _jit_isinstance(original: Any) -> Any:
    """``torch.jit.isinstance`` that answers for a proxy as for the tensor it stands for (MONAI's UpCat asks
    ``torch.jit.isinstance(x_e, torch.Tensor)``; on the bare proxy it says False and the skip would vanish)."""

    def patched(obj: Any, target_type: Any) -> bool:
        if isinstance(obj, torch.fx.Proxy):
            meta = _meta_of(obj)
            if meta is not _UNKNOWN:
                return original(meta, target_type)
            return target_type is torch.Tensor
        return original(obj, target_type)

    return patched


@contextlib.contextmanager
def _tracing_patches() -> Iterator[None]:
    original = torch.jit.isinstance
    torch.jit.isinstance = _jit_isinstance(original)
    try:
        yield
    finally:
        torch.jit.isinstance = original


def _example_input(module: nn.Module, ndim: int | None) -> torch.Tensor | None:
    """A meta input for the trace's meta run: channels from the first convolution or normalisation layer."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            channels, rank = m.in_channels, m.weight.dim() - 2
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            channels, rank = m.num_features, None
        elif isinstance(m, nn.GroupNorm):
            channels, rank = m.num_channels, None
        else:
            continue
        rank = ndim if ndim is not None else rank
        if rank not in _EXAMPLE_EXTENT:
            return None
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        return torch.empty(2, channels, *(_EXAMPLE_EXTENT[rank],) * rank, device="meta", dtype=dtype)
    return None


def _channels_expected(graph: torch.fx.Graph, root: nn.Module) -> Fraction | None:
    """How far off the example's channel count was: at the first module the meta run could not run, the channels
    it expects over the channels it received (ShuffleNetV2's blocks chunk their input before the first convolution).
    """
    for node in graph.nodes:
        if _META in node.meta or node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return None
        received = node.args[0].meta.get(_META)
        m = root.get_submodule(node.target)
        expected = getattr(m, "in_channels", None) or getattr(m, "num_features", None)
        expected = expected or getattr(m, "num_channels", None)
        if not isinstance(received, torch.Tensor) or received.dim() < 2 or not isinstance(expected, int):
            return None
        return Fraction(expected, received.shape[1])
    return None


def trace_graph(
    module: nn.Module, ndim: int | None = None, shape: Sequence[int] | None = None
) -> torch.fx.Graph:
    """The ``torch.fx`` graph of ``module`` (leaves: modules with a rule); node.meta["tilegrad_meta"] holds each
    node's value on an example meta input when one could be made (``ndim``: its spatial rank, else guessed from
    the first convolution; the channel count from the first convolution or normalisation, corrected once the meta
    run shows what a layer expects). ``shape``: trace on a meta input of this shape instead, so that a forward
    that branches on sizes (MONAI's UpCat pads when an odd size was halved) takes the branch the real input takes.
    """
    if forward_hook_count(module):
        # torch.fx traces the root's forward, not its __call__: its own hooks would be left out of the graph
        raise NotStreamableError(
            f"the model passed to tilegrad ({type(module).__name__}) has forward hooks or pre-hooks of its own, "
            "which tilegrad's trace of its forward would leave out; expected a model without hooks on itself. "
            "Wrap it (`nn.Sequential(model)`): hooks of the layers inside a model are traced with them"
        )
    example = _example_input(module, ndim)
    if shape is not None and example is not None:
        # the batch stays 2: with a batch of 1 a reshape that merges N into C looks local (geometry/layout.py)
        example = torch.empty((2, *shape[1:]), device="meta", dtype=example.dtype)
    for attempt in range(3):
        tracer = _Tracer(example)
        try:
            with _tracing_patches():
                graph = tracer.trace(module)
            failure = None
        except Exception as err:  # fx raises many types; re-raised below with the layer context
            graph, failure = tracer.graph, err
        output = next((n for n in graph.nodes if n.op == "output"), None)
        complete = output is not None and all(_META in a.meta for a in output.all_input_nodes)
        factor = None if example is None or complete or attempt == 2 else _channels_expected(graph, module)
        if factor is not None and (example.shape[1] * factor).denominator == 1 and factor != 1:
            channels = int(example.shape[1] * factor)
            example = example.new_empty(example.shape[0], channels, *example.shape[2:])
            continue
        if failure is None:
            return graph
        raise NotStreamableError(
            f"tilegrad could not trace {type(module).__name__}{_failed_in(tracer, module)} to work out its receptive "
            f"field: {type(failure).__name__}: {failure}. Streaming needs a forward pass without data-dependent "
            "control flow; wrap the offending part as a module and register its geometry with "
            "tilegrad.geometry.register_geometry_rule"
        ) from failure
    raise AssertionError("unreachable")  # pragma: no cover


def _failed_in(tracer: torch.fx.Tracer, root: nn.Module) -> str:
    """Where a failed trace stopped: the innermost module it was tracing through, and why it did (a subclass of a
    registered layer that overrides its forward: NOTE [ Subclasses that change what a layer computes ])."""
    stack = list(getattr(tracer, "module_stack", {}).values())
    path = stack[-1][0] if stack and isinstance(stack[-1], tuple) and stack[-1][0] else ""
    if not path:
        return ""
    try:
        layer = root.get_submodule(path)
    except AttributeError:
        return f" (in '{path}')"
    why = ""
    if overrides_computation(layer):
        rule = module_rule(layer)
        base = next((k for k in type(layer).__mro__[1:] if module_rule(k) is rule), type(layer))
        why = (
            f", traced through because it overrides forward (or a method it runs) of {base.__name__}, whose "
            "geometry rule would not describe it"
        )
    return f" (in layer '{path}' ({type(layer).__name__}){why})"


def node_where(node: torch.fx.Node, module: nn.Module | None, prefix: str = "", root: str = "") -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if node.op == "call_module":
        qualified = f"{prefix}.{node.target}" if prefix else node.target
        parents = [v for k, v in stack.items() if k != node.target]
        inside = ""
        if parents and isinstance(parents[-1], tuple) and len(parents[-1]) == 2:
            kind = parents[-1][1]
            inside = f" in {getattr(kind, '__name__', kind)}"
        return f"layer '{qualified}' ({type(module).__name__}{inside})"
    if stack:
        path = next(reversed(stack))
        path = f"{prefix}.{path}" if prefix else path
        entry = stack[next(reversed(stack))]
        kind = entry[1] if isinstance(entry, tuple) and len(entry) == 2 else None
        inside = f" inside '{path}'" + (f" ({getattr(kind, '__name__', kind)})" if kind is not None else "")
    else:
        inside = f" inside '{prefix}'" if prefix else (f" in {root}.forward" if root else "")
    if node.op == "call_method":
        return f"tensor method .{node.target}() (node '{node.name}'){inside}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"function {name} (node '{node.name}'){inside}"


_GRAPH_CACHE: dict[int, tuple[Any, tuple[tuple[bool, int], ...], int, torch.fx.Graph]] = {}


def module_geometry(module: nn.Module, ndim: int, name: str = "") -> Geometry:
    """Geometry of ``module``'s output relative to its input, for inputs with ``ndim`` spatial dims.

    Raises NotStreamableError naming the first layer that is not local (in the module's current train/eval mode);
    ``name`` is the module's qualified name in a bigger model, used in those messages.
    """
    if ndim not in (1, 2, 3):
        raise ConfigError(f"expected 1, 2 or 3 spatial dims, received ndim={ndim}")
    rule = module_rule(module)
    if (
        rule is not None and _Tracer().is_leaf_module(module, name) and not forward_hook_count(module)
    ):  # a single known layer (or a registered rule); with hooks of its own, trace_graph refuses it
        placeholder = torch.fx.Graph().placeholder("x")
        return rule(
            Context(ndim, _node_where_module(module, name), [standard(ndim)]),
            module,
            placeholder,
            [Geometry.identity(ndim)],
        )
    # a trace bakes in train/eval branches; hooks that may change a layer are refused
    modes = planning_state(module)
    cached = _GRAPH_CACHE.get(id(module))
    if cached is None or cached[0]() is not module or cached[1] != modes or cached[2] != ndim:
        try:
            graph = trace_graph(module, ndim)
        except NotStreamableError as err:
            raise explained(module, name, err) from err
        _GRAPH_CACHE[id(module)] = (weakref.ref(module), modes, ndim, graph)
    else:
        graph = cached[3]
    try:
        return _graph_geometry(module, graph, ndim, name)
    except NotStreamableError as err:
        raise explained(module, name, err) from err


def _attentions(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention layers in ``module`` (torch's, MONAI's SABlock/WindowAttention, timm's Attention), outermost
    first."""
    found = []
    for path, m in module.named_modules():
        kind = type(m).__name__
        if isinstance(m, nn.MultiheadAttention) or "Attention" in kind or kind == "SABlock":
            if (kind.endswith(("Gate", "Block")) and kind != "SABlock") or kind.startswith(
                ("Channel", "Spatial")
            ):
                continue  # attention gates (AttentionUnet) and CBAM-style attention are not over positions
            if not any(path.startswith(f"{p}.") for p, _ in found):
                found.append((path, m))
    return found


def _in(node: torch.fx.Node, paths: list[str]) -> bool:
    """Whether ``node`` runs inside one of the modules at ``paths`` (a call of it, or a step of its forward)."""
    stack = node.meta.get("nn_module_stack") or {}
    where = [str(node.target)] if node.op == "call_module" else []
    where += [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]
    return any(w == p or w.startswith(f"{p}.") for w in where for p in paths)


def _feeds(node: torch.fx.Node, paths: list[str]) -> bool:
    """Whether ``node``'s values reach one of the modules at ``paths`` (sizes read from it do not count)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if _in(n, paths):
            return True
        todo.extend(u for u in n.users if not _reads_sizes_only(u))
    return False


def _reads_sizes_only(node: torch.fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``...: what it passes on is sizes, not the tensor's values."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_ATTRIBUTES | _CONSTANT_ATTRIBUTES
    return node.op == "call_method" and (node.target == "size" or node.target in _CONSTANT_METHODS)


def explained(module: nn.Module, name: str, err: NotStreamableError) -> NotStreamableError:
    """Say why in the user's words when the first refused step feeds a global layer (attention): it is in an
    attention layer or its values reach one (a patch embedding's flatten into tokens; the refusal is quoted too). A
    refusal whose values reach no attention layer (a classifier branch beside it) is returned as it is."""
    found = _attentions(module)
    if not found:
        return err
    paths = [p for p, _ in found]
    refused = getattr(err, "tilegrad_node", None)
    if isinstance(refused, torch.fx.Node) and not _feeds(refused, paths):
        return err
    path, layer = next(
        ((p, m) for p, m in found if isinstance(refused, torch.fx.Node) and _in(refused, [p])), found[0]
    )
    where = ".".join(p for p in (name, path) if p) or type(module).__name__
    kind = type(layer).__name__
    how = (
        "each position attends to the others of a window laid on the whole image's grid (shifted and padded by "
        "the image size)"
        if "Window" in kind
        else "each position attends to every other one"
    )
    return NotStreamableError(
        f"'{where}' ({kind}) in {type(module).__name__} cannot be streamed: attention over all positions is "
        f"global ({how}), so no tile can be computed from its neighbourhood. {_before(path, name)} "
        f"(The first step tilegrad refused on the way: {err})"
    )


def _before(path: str, name: str) -> str:
    """The way forward around an attention layer at ``path``: the blocks of its outermost list that run before it."""
    parts = path.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if index is not None and index == 0 and not name:  # a child of the model itself (an nn.Sequential's '2')
        return (
            f"The layers before '{parts[0]}' are local: stream them as a trunk (model[:{parts[0]}], through "
            "tilegrad.StreamingModule or tilegrad.infer) and run the rest whole, or run the model whole."
            if int(parts[0]) > 0
            else "No convolutional part of the model runs before it, so there is nothing to stream on its own; run "
            "the model whole (tilegrad cannot tile it exactly)."
        )
    if index is None:  # not in a list of blocks: what runs before it is not known from its path
        return (
            "Stream the local layers that run before it (if any) as a trunk, through tilegrad.StreamingModule or "
            "tilegrad.infer, and run the rest whole, or run the model whole."
        )
    if int(parts[index]) == 0:
        return (
            "No convolutional part of the model runs before it, so there is nothing to stream on its own; run the "
            "model whole (tilegrad cannot tile it exactly)."
        )
    blocks = ".".join(p for p in (name, *parts[:index]) if p)
    return (
        f"The blocks before '{blocks}.{parts[index]}' are local: stream them as a trunk (an nn.Sequential of "
        f"{blocks}[:{parts[index]}] and the layers they need, through tilegrad.StreamingModule or tilegrad.infer) "
        "and run the rest whole, or run the model whole."
    )


def _node_where_module(module: nn.Module, name: str) -> str:
    return f"layer '{name}' ({type(module).__name__})" if name else f"layer ({type(module).__name__})"


@dataclass(frozen=True)
class Spatial:
    """A tensor that depends on the trunk's input: its geometry and its layout (layout.py)."""

    geometry: Geometry
    layout: Layout


_TILE_VALUES = (Extent, ExtentTuple, TileDependent)
_SHAPE_ATTRIBUTES = {"shape"}
_CONSTANT_ATTRIBUTES = {"ndim", "dtype", "device", "is_cuda", "requires_grad", "is_meta", "layout"}
_CONSTANT_METHODS = {"dim", "ndimension", "get_device", "is_contiguous", "is_floating_point", "element_size"}


def _tile_dependent(value: Any) -> bool:
    return isinstance(value, (Extent, TileDependent)) or (isinstance(value, ExtentTuple) and value.spatial)


def _scalar(node: torch.fx.Node, values: dict[torch.fx.Node, Any]) -> Any:
    """The value of a node with no spatial tensor input: sizes read earlier, values computed from them, or None."""
    args = [values.get(a) for a in node.all_input_nodes]
    if not any(_tile_dependent(a) for a in args):
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        source, index = values.get(node.args[0]), node.args[1]
        if isinstance(source, ExtentTuple) and isinstance(index, (int, slice)):
            picked = source.labels[index]
            if isinstance(index, slice):
                return ExtentTuple(tuple(picked))
            return Extent(picked) if is_spatial(picked) else None
    return TileDependent(node.name)


def _sizes(node: torch.fx.Node, layout: Layout) -> Any:
    """``x.shape`` / ``x.size()`` / ``x.size(d)`` of a spatial tensor (NOTE [ Layouts and tile extents ])."""
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dim is None:
        return ExtentTuple(tuple(layout))
    label = layout[dim] if isinstance(dim, int) and -len(layout) <= dim < len(layout) else None
    return Extent(label) if label is not None and is_spatial(label) else None


def _graph_geometry(root: nn.Module, graph: torch.fx.Graph, ndim: int, prefix: str = "") -> Geometry:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise NotStreamableError(f"{type(root).__name__}.forward takes no tensor input")
    values = _propagate(root, graph.nodes, ndim, {placeholders[0]: Geometry.identity(ndim)}, prefix)
    return _output(root, graph, values, ndim)


def trunk_output(
    root: nn.Module, graph: torch.fx.Graph, geoms: dict[torch.fx.Node, Geometry | None]
) -> Geometry:
    """The geometry of the graph's single tensor output, from :func:`propagate`'s result."""
    (output,) = [n for n in graph.nodes if n.op == "output"]
    out_arg = output.args[0]
    if not isinstance(out_arg, torch.fx.Node):
        raise NotStreamableError(
            f"{type(root).__name__} returns {type(out_arg).__name__}; a streamed trunk must return one tensor"
        )
    result = geoms.get(out_arg)
    if result is None:
        raise NotStreamableError(f"the output of {type(root).__name__} does not depend on its input")
    return result


def _output(root: nn.Module, graph: torch.fx.Graph, values: dict[torch.fx.Node, Any], ndim: int) -> Geometry:
    (node,) = [n for n in graph.nodes if n.op == "output"]
    spatial = [values[a] for a in node.all_input_nodes if isinstance(values.get(a), Spatial)]
    if not spatial:
        raise NotStreamableError(f"the output of {type(root).__name__} does not depend on its input")
    out_arg = node.args[0]
    if not isinstance(out_arg, torch.fx.Node) or not isinstance(values.get(out_arg), Spatial):
        raise NotStreamableError(
            f"{type(root).__name__} returns {type(out_arg).__name__}; a streamed trunk must return one tensor"
        )
    result = values[out_arg]
    if result.layout != standard(ndim):
        raise NotStreamableError(
            f"{type(root).__name__} returns a tensor with dims {describe(result.layout, ndim)}; a streamed "
            f"trunk returns {describe(standard(ndim), ndim)}"
        )
    return result.geometry


def propagate(
    root: nn.Module,
    nodes: Iterable[torch.fx.Node],
    ndim: int,
    seeds: dict[torch.fx.Node, Geometry],
    prefix: str = "",
) -> dict[torch.fx.Node, Geometry | None]:
    """Apply the geometry rules to ``nodes`` (in topological order), starting from the geometries in ``seeds``
    (in the standard (N, C, *spatial) layout). A node none of whose inputs is spatial (parameters, constants, nodes
    outside ``nodes`` that are not seeds: global statistics) gets None: it is the same on every tile. Raises
    NotStreamableError naming the first node that is not local."""
    values = _propagate(root, nodes, ndim, seeds, prefix)
    return {n: (v.geometry if isinstance(v, Spatial) else None) for n, v in values.items()}


def _power_iteration(name: str) -> str:
    return (
        f"its {name!r} is spectral-normalised in training mode: each read of it runs a power iteration (updating u "
        "and v), so every tile would read a slightly different weight and advance the iteration once per tile "
        f"instead of once per step. Before each streamed step read layer.{name} once in training mode, then stream "
        f"with layer.parametrizations.{name}.eval(): every tile uses that step's weight, as a conventional step does"
    )


def _side_effect_per_call(node: torch.fx.Node, root: nn.Module) -> str | None:
    """Why a node of parameters alone must not run once per tile, or None. Such a node (a weight standardised, a
    spectral norm read) is computed again with every tile, forward and in the backward's recomputation: exact for
    its value, which is the same each time, but a side effect of the call (running statistics updated, a power
    iteration advanced) would happen once per tile where a conventional step has it once."""
    if node.op == "call_module":
        owner, _, name = str(node.target).rpartition(".parametrizations.")
        if name and stateful_parametrization(root.get_submodule(owner)) == name:  # the weight read alone
            return _power_iteration(name)
        for sub in root.get_submodule(node.target).modules():
            if isinstance(sub, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)) and (
                sub.training and sub.track_running_stats
            ):
                return (
                    f"{type(sub).__name__} normalises parameters (not the image) in training mode and updates its "
                    "running statistics on each call: streamed, that would happen once per tile instead of once per "
                    "step. Put that layer in eval mode, or build it with track_running_stats=False"
                )
        return None
    functions = {F.batch_norm: ("training", False), F.instance_norm: ("use_input_stats", True)}
    if node.op != "call_function" or node.target not in functions:
        return None
    flag, default = functions[node.target]
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
    except TypeError:
        return None
    if bound.get("running_mean") is None or not bound.get(flag, default):
        return None
    return (
        f"{node.target.__name__} normalises parameters (not the image) with batch statistics and updates the running "
        "statistics it is given on each call: streamed, that would happen once per tile instead of once per step. "
        "Pass running_mean=None and running_var=None, or compute the normalised parameter outside the streamed trunk"
    )


def _propagate(
    root: nn.Module,
    nodes: Iterable[torch.fx.Node],
    ndim: int,
    seeds: dict[torch.fx.Node, Geometry],
    prefix: str = "",
) -> dict[torch.fx.Node, Any]:
    values: dict[torch.fx.Node, Any] = {n: Spatial(g, standard(ndim)) for n, g in seeds.items()}
    node = None
    try:
        for node in nodes:
            if node in seeds or node.op == "output":
                continue
            if node.op in ("placeholder", "get_attr"):
                values[node] = None
                continue
            spatial = [values[a] for a in node.all_input_nodes if isinstance(values.get(a), Spatial)]
            if not spatial:
                effect = _side_effect_per_call(node, root)
                if effect is not None:
                    module = root.get_submodule(node.target) if node.op == "call_module" else None
                    Context(ndim, node_where(node, module, prefix, type(root).__name__)).refuse(effect)
                values[node] = _scalar(
                    node, values
                )  # depends only on parameters, constants or sizes read earlier
                continue
            module = root.get_submodule(node.target) if node.op == "call_module" else None
            layouts = [s.layout for s in spatial]
            ctx = Context(ndim, node_where(node, module, prefix, type(root).__name__), layouts, values)
            if node.op == "call_function" and node.target is getattr:
                attribute = node.args[1]
                if attribute in _SHAPE_ATTRIBUTES:
                    values[node] = ExtentTuple(tuple(layouts[0]))
                    continue
                if attribute in _CONSTANT_ATTRIBUTES:
                    values[node] = None
                    continue
            if node.op == "call_method" and node.target == "size":
                values[node] = _sizes(node, layouts[0])
                continue
            if node.op == "call_method" and node.target in _CONSTANT_METHODS:
                values[node] = None
                continue
            if node.op == "call_module":
                rule = module_rule(module)
                if has_forward_hooks(
                    module
                ):  # NOTE [ Subclasses that change what a layer computes ] in toolkit.py
                    ctx.refuse(
                        "it has forward hooks or pre-hooks (register_forward_hook), which may change what it "
                        f"computes on a tile in ways the {type(module).__name__} geometry does not describe. Remove "
                        "them while streaming, or mark a hook that only watches (returns None) with "
                        "tilegrad.geometry.observer_hook: it then runs on every tile"
                    )
                stateful = stateful_parametrization(module)
                if stateful is not None:
                    ctx.refuse(_power_iteration(stateful))
                if rule is None:
                    ctx.refuse(
                        f"tilegrad does not know whether {type(module).__name__} is local; if it is, register its "
                        "geometry with tilegrad.geometry.register_geometry_rule"
                    )
            else:
                rule = function_rule(node.target)
                if rule is None:
                    ctx.refuse(
                        "tilegrad does not know whether it is local; if it is, register its geometry with "
                        "tilegrad.geometry.register_geometry_rule"
                    )
            if not getattr(rule, "tilegrad_reads_sizes", False):
                tiled = [a for a in node.all_input_nodes if _tile_dependent(values.get(a))]
                if tiled:
                    ctx.refuse(
                        f"it takes a value computed from the tile's extent (node '{tiled[0].name}', from a tensor's "
                        ".shape or .size()), which differs between a tile and the image"
                    )
            if not getattr(rule, "tilegrad_layout_aware", False) and any(
                lay != standard(ndim) for lay in layouts
            ):
                odd = next(lay for lay in layouts if lay != standard(ndim))
                ctx.refuse(
                    f"its input has dims {describe(odd, ndim)} and tilegrad knows its geometry only for "
                    f"{describe(standard(ndim), ndim)}; permute back first"
                )
            if node.target in (torch.chunk, torch.split, "chunk", "split"):
                node.meta["tilegrad_tuple"] = True
            geometry = rule(ctx, module, node, [s.geometry for s in spatial])
            if ctx.across_batch is not None:
                node.meta[ACROSS_BATCH] = f"{ctx.where} ({ctx.across_batch})"
            if (
                geometry is None
            ):  # a reduction (NOTE [ Streamed statistics ] in statistics.py): no spatial extent
                values[node] = None
                continue
            values[node] = Spatial(geometry, ctx.layout if ctx.layout is not None else layouts[0])
    except NotStreamableError as err:
        if node is not None and not hasattr(err, "tilegrad_node"):
            err.tilegrad_node = node  # type: ignore[attr-defined]  # the refused step, for explained()
        raise
    return values


def receptive_field(module: nn.Module, ndim: int = 2) -> ReceptiveField:
    """Total output stride, halo and receptive field of a trunk of local layers.

    >>> import torch.nn as nn
    >>> trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1))
    >>> rf = receptive_field(trunk, ndim=2)
    >>> rf.stride, rf.halo, rf.size
    ((Fraction(2, 1), Fraction(2, 1)), ((3, 3), (3, 3)), (8, 8))
    >>> print(rf)
    stride 2 x 2, halo 3+3 x 3+3 px, receptive field 8 x 8 px
    """
    return ReceptiveField.from_geometry(module_geometry(module, ndim))
