"""Trace a module with ``torch.fx`` and apply the geometry rules to its graph: :func:`module_geometry`, and
:func:`receptive_field` (what users see). Every module with a registered rule is a leaf of the trace."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import ConfigError, NotStreamableError
from .core import Geometry, ReceptiveField
from .toolkit import Context, function_rule, module_rule

__all__ = ["module_geometry", "propagate", "receptive_field", "trunk_output"]


class _Tracer(torch.fx.Tracer):
    """fx tracer whose leaves are every module with a registered rule (torch.nn layers and custom ones)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_rule(m) is not None or super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module) -> torch.fx.Graph:
    try:
        return _Tracer().trace(module)
    except Exception as err:  # fx raises many types; re-raise with the layer context
        raise NotStreamableError(
            f"tilegrad could not trace {type(module).__name__} to work out its receptive field: "
            f"{type(err).__name__}: {err}. Streaming needs a forward pass without data-dependent control flow "
            "or size arithmetic; wrap the offending part as a module and register its geometry with "
            "tilegrad.geometry.register_geometry_rule"
        ) from err


def _node_where(node: torch.fx.Node, module: nn.Module | None, prefix: str = "") -> str:
    if node.op == "call_module":
        qualified = f"{prefix}.{node.target}" if prefix else node.target
        return f"layer '{qualified}' ({type(module).__name__})"
    stack = node.meta.get("nn_module_stack")
    inside = f" inside '{next(reversed(stack))}'" if stack else (f" inside '{prefix}'" if prefix else "")
    if node.op == "call_method":
        return f"tensor method .{node.target}() (node '{node.name}'){inside}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"function {name} (node '{node.name}'){inside}"


_GRAPH_CACHE: dict[int, tuple[Any, torch.fx.Graph]] = {}


def module_geometry(module: nn.Module, ndim: int, name: str = "") -> Geometry:
    """Geometry of ``module``'s output relative to its input, for inputs with ``ndim`` spatial dims.

    Raises NotStreamableError naming the first layer that is not local (in the module's current train/eval mode);
    ``name`` is the module's qualified name in a bigger model, used in those messages.
    """
    if ndim not in (1, 2, 3):
        raise ConfigError(f"expected 1, 2 or 3 spatial dims, received ndim={ndim}")
    rule = module_rule(module)
    if rule is not None:  # the whole module is a single known layer (or has a registered rule)
        placeholder = torch.fx.Graph().placeholder("x")
        return rule(
            Context(ndim, _node_where_module(module, name)), module, placeholder, [Geometry.identity(ndim)]
        )
    cached = _GRAPH_CACHE.get(id(module))
    if cached is None or cached[0]() is not module:
        graph = _trace(module)
        _GRAPH_CACHE[id(module)] = (weakref.ref(module), graph)
    else:
        graph = cached[1]
    return _graph_geometry(module, graph, ndim, name)


def _node_where_module(module: nn.Module, name: str) -> str:
    return f"layer '{name}' ({type(module).__name__})" if name else f"layer ({type(module).__name__})"


def _graph_geometry(root: nn.Module, graph: torch.fx.Graph, ndim: int, prefix: str = "") -> Geometry:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise NotStreamableError(f"{type(root).__name__}.forward takes no tensor input")
    geoms = propagate(root, graph.nodes, ndim, {placeholders[0]: Geometry.identity(ndim)}, prefix)
    return trunk_output(root, graph, geoms)


def trunk_output(root: nn.Module, graph: torch.fx.Graph, geoms: dict[torch.fx.Node, Geometry | None]) -> Geometry:
    """The geometry of the graph's single tensor output (refusing tuples and outputs that ignore the input)."""
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


def propagate(
    root: nn.Module,
    nodes: Iterable[torch.fx.Node],
    ndim: int,
    seeds: dict[torch.fx.Node, Geometry],
    prefix: str = "",
) -> dict[torch.fx.Node, Geometry | None]:
    """Apply the geometry rules to ``nodes`` (in topological order), starting from the geometries in ``seeds``.

    A node none of whose inputs has a geometry (parameters, constants, nodes outside ``nodes`` that are not
    seeds: global statistics) gets None: it is the same on every tile. Raises NotStreamableError naming the first
    node that is not local.
    """
    geoms: dict[torch.fx.Node, Geometry | None] = dict(seeds)
    for node in nodes:
        if node in seeds or node.op == "output":
            continue
        if node.op in ("placeholder", "get_attr"):
            geoms[node] = None
            continue
        inputs = [g for arg in node.all_input_nodes if (g := geoms.get(arg)) is not None]
        if not inputs:
            geoms[node] = None  # depends only on parameters/constants
            continue
        module = root.get_submodule(node.target) if node.op == "call_module" else None
        ctx = Context(ndim, _node_where(node, module, prefix))
        if node.op == "call_module":
            rule = module_rule(module)
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
        if node.target in (torch.chunk, torch.split, "chunk", "split"):
            node.meta["tilegrad_tuple"] = True
        geoms[node] = rule(ctx, module, node, inputs)
    return geoms


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
