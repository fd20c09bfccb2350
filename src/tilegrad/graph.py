"""A trunk as a traced graph, profiled once on meta tensors, and cut into segments at any set of its tensors.

NOTE [ Segments over a graph ]
The planner (plan.py) no longer cuts only between the children of an ``nn.Sequential``: it cuts the ``torch.fx``
graph of the trunk at a set of tensors, the *boundaries*. Each boundary is computed by one *segment*: the cone of
nodes that lead to it from the boundaries before it (its *sources*; the image is the first source). A U-Net's skip
tensor that a cut separates from the decoder that reads it is simply one more source of the decoder's segment, so
encoder and decoder can be streamed at their own tile sizes with their own small halos. A segment has one output;
nodes that two segments both need (rare with the candidate cuts below) are computed in both.

Candidate cuts are the tensors around changes of scale (the input and the output of strided convolutions, pooling,
upsampling): the maps there are the smallest of their stage, and cutting there is what splits a network's halo
into the small halos of its stages. Within a stage, the outputs of blocks with branches (residual adds) that every
path goes through are candidates too: a stage of many blocks at one scale (ResNet-34's layer3, six blocks) has a
halo of its own worth splitting, and such a cut has one tensor crossing it. A tensor that an in-place operation later modifies is never a boundary (the
value stored would not be the one the rest of the graph sees).

NOTE [ Segment windows ]
All geometry of a segment is measured in *image* pixels. Each source is seeded with its own scale (image pixels
per source pixel: 1 for the image, 4 after two stride-2 layers, 1/2 after an upsampling) and the rules propagate
through the segment's nodes (geometry/trace.py ``propagate``), so the segment's output has one geometry relative
to the image frame whatever the number of sources. A tile is then a *window* of the image frame: the tile grid
(tiling.py) picks windows whose origins and extents are multiples of the alignment of every tensor of the
segment, and each source is read at ``window / scale``. Every tensor inside the segment therefore covers the same
window, and a concatenation of an upsampled decoder map with its skip sees two maps of the same size, as on the
whole image. This needs every source and every merge point to sit on its scale's grid: its map has ``size`` pixels
with ``|size * scale - image size| < scale``, i.e. exactly ``image / scale`` pixels or that rounded up or down, as
the strided layers of a network make them on an image whose size is not a multiple of the network's stride (a
150 px image: 75, 38, 19, 10, 5 px after five stride-2 convolutions with padding; 37 after a 2x2 pooling of 75).
Why the rounded maps are exact too: a window's start is a multiple of every scale in the segment, so every tensor
of a tile starts on its own pixel grid; an interior window's stop is a multiple of the scales as well and lies
inside every map (no multiple of ``scale`` lies between ``floor(image / scale) * scale`` and the image size); and
the last window of an axis runs to each map's own end (``source_box`` clips at its size). A tile is then the whole
computation on a suffix of the maps that starts on their grids, and strided layers (convolutions, pooling with or
without ``ceil_mode``) give such a suffix the output sizes and values of the whole map from that start on. A cut
set that breaks this is not offered (``TrunkGraph.segments`` raises).
A segment with one source needs less: whatever the source's size (unpadded convolutions leave a map many pixels
short of the image, as in Inception-v3's stem), a window clipped at the source's end still starts on its grid and
reads every pixel its outputs need, and no second source can disagree about where the map ends. So block outputs
off their grid are cut candidates too (``candidates``), and a cut set that makes one of them a source of a segment
with several sources raises and is skipped by the planner (``mode="stages"`` also tries its cuts on the grid only,
so it has a plan wherever it had one before).

NOTE [ Whole pieces ]
A statistic's input is a forced cut (NOTE [ Streamed statistics ] in statistics.py), so a network with a
normalisation after every convolution (BatchNorm in training mode) is cut into one segment per convolution, and deep
in the trunk, where the maps are small, most of them run in one tile. Streaming buys nothing there and costs a
boundary store per convolution (on disk when the budget is tight) and the statistics' own passes. The planner
(plan.py ``wholes``) therefore turns a run of consecutive one-tile segments into one *whole piece*
(``TrunkGraph.whole``): the cone of the run's last output over the run's sources, statistics included, run on the
whole map with its graph kept from the forward to its backward (NOTE [ Kept segments ] in execute.py). Inside it a
normalisation is the layer itself (``Segment.native_layers``: BatchNorm updates its running statistics as in the
conventional step) and a squeeze-excitation pool a mean over the whole map, so autograd does the backward's
reductions; its saved bytes are the layers', not the rewritten reductions'. A run is not one piece
when a tensor or a statistic it keeps inside is read by a segment after it, nor when a statistic is inside two pieces
(each would call the layer, and BatchNorm update its running statistics, once) (``whole_conflict``): a statistic of one
of the piece's sources that a streamed segment also reads is computed twice, once inside and once accumulated from
the source's cores; BatchNorm's running statistics are updated once, by the layer inside the piece (the engine
skips its update for that reduction node; a module called twice is still updated once per call).
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from .errors import GeometryError, NotStreamableError
from .geometry import DimGeometry, Geometry
from .geometry.toolkit import has_forward_hooks, overrides_computation
from .geometry.trace import explained, node_where, propagate, trace_graph, trunk_output
from .statistics import apply_norm, is_reduction, rewrite_statistics

__all__ = ["Segment", "TrunkGraph", "last_convolution"]

_INPLACE_FUNCTIONS = {
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ior,
    operator.iand,
}


def _mutated(node: torch.fx.Node, root: nn.Module) -> torch.fx.Node | None:
    """The node an in-place operation writes into (its first argument), or None."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    if node.op == "call_module":
        inplace = bool(getattr(root.get_submodule(node.target), "inplace", False))
    elif node.op == "call_method":
        inplace = node.target.endswith("_") and not node.target.endswith("__")
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        inplace = (
            node.target in _INPLACE_FUNCTIONS
            or (name.endswith("_") and not name.endswith("__"))  # torch.relu_, F.relu_
            or _inplace_argument(node)
        )
    else:
        inplace = False
    return node.args[0] if inplace else None


def _inplace_argument(node: torch.fx.Node) -> bool:
    """Whether a function is called with ``inplace=True``, by keyword or by position (``F.relu(x, True)``)."""
    if "inplace" in node.kwargs:
        return bool(node.kwargs["inplace"])
    signature = _signature(node.target)
    if signature is None or "inplace" not in signature.parameters:
        return False
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:  # arguments it would not take: its own error when it runs
        return False
    return bool(bound.arguments.get("inplace", False))


# ops whose result may share memory with their first argument (a view, or the argument itself when nothing changes:
# ``x.contiguous()``, ``x.float()``, nn.Identity, dropout in eval mode): an in-place write into the result writes
# into the argument
_ALIASING_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "contiguous", "permute", "transpose", "t",
    "squeeze", "unsqueeze", "expand", "expand_as", "narrow", "movedim", "chunk", "split", "unbind", "float",
    "double", "half", "bfloat16", "to", "type", "type_as", "detach", "__getitem__",
}  # fmt: skip
# of those, the ones that always give all of their argument unchanged (``_alias_kind``: "same")
_SAME_TENSOR_FUNCTIONS = {torch.detach, F.dropout, F.dropout2d, F.dropout3d, F.alpha_dropout}
_SAME_TENSOR_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd)
_ALIASING_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose,
    torch.narrow, torch.movedim, torch.chunk, torch.split, torch.unbind, *_SAME_TENSOR_FUNCTIONS,
}  # fmt: skip
_ALIASING_MODULES = (nn.Flatten, nn.Unflatten, *_SAME_TENSOR_MODULES)


def _may_alias(node: torch.fx.Node, root: nn.Module) -> bool:
    """Whether ``node``'s result may share memory with its first argument."""
    if node.op == "call_method":
        return node.target in _ALIASING_METHODS
    if node.op == "call_function":
        return node.target in _ALIASING_FUNCTIONS
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _ALIASING_MODULES)
    return False


def _in_place_writes(
    nodes: Iterable[torch.fx.Node], root: nn.Module
) -> Iterator[tuple[torch.fx.Node, list[torch.fx.Node]]]:
    """Each node of ``nodes`` (in graph order) that writes in place, with the tensors it writes into, nearest first:
    its first argument, then, while that is the result of an op that may alias its own argument (a view, an
    alias: ``x.view(...).relu_()``, ``x.contiguous().add_(y)``), that argument. The one walk of the alias map that
    :func:`_written` and :func:`_functionalize` share (NOTE [ In-place writes ]); lazy, so a caller may rewrite the
    graph after each node before the walk reads the next."""
    base: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in nodes:
        if n.args and isinstance(n.args[0], torch.fx.Node) and _may_alias(n, root):
            base[n] = n.args[0]
        chain = []
        target = _mutated(n, root)
        while target is not None:
            chain.append(target)
            target = base.get(target)
        if chain:
            yield n, chain


def _written(nodes: Iterable[torch.fx.Node], root: nn.Module) -> set[torch.fx.Node]:
    """The tensors ``nodes`` (in graph order) write into in place: directly (ReLU(inplace=True)) or through a view or
    alias (then ``x`` and every alias between, a conversion's copy included: the cautious answer)."""
    return {t for _, chain in _in_place_writes(nodes, root) for t in chain}


_SAME_TENSOR_METHODS = {
    "contiguous", "float", "double", "half", "bfloat16", "to", "type", "type_as", "detach", "view_as", "reshape_as",
}  # fmt: skip


def _alias_kind(node: torch.fx.Node, root: nn.Module) -> str:
    """How ``node`` (an aliasing op) relates to its argument, as eager mode runs it on the traced shapes: ``"same"``
    (the tensor itself or a view of all of it in the same shape: ``x.contiguous()`` of a contiguous ``x``,
    ``x.float()`` of a float32 ``x``, ``x.view(x.shape)``, nn.Identity, dropout in eval), ``"copy"`` (a new tensor:
    a dtype conversion, ``contiguous()`` of a permuted view) or ``"view"`` (part of it, or reshaped)."""
    value, arg = (getattr(n, "meta", {}).get("tilegrad_meta") for n in (node, node.args[0]))
    if not isinstance(value, torch.Tensor) or not isinstance(arg, torch.Tensor):
        return "view"  # unknown: the cautious answer
    if node.op == "call_method" and node.target in _SAME_TENSOR_METHODS:
        if value.dtype != arg.dtype or (node.target == "contiguous" and not arg.is_contiguous()):
            return "copy"
        return "same" if value.shape == arg.shape else "view"
    if node.op == "call_method" and node.target in ("view", "reshape"):
        return "same" if value.shape == arg.shape else "view"
    if node.op == "call_function" and node.target in _SAME_TENSOR_FUNCTIONS:
        return "same"
    if node.op == "call_module" and isinstance(root.get_submodule(node.target), _SAME_TENSOR_MODULES):
        return "same"
    return "view"


def _functionalize(graph: torch.fx.Graph, root: nn.Module) -> None:
    """NOTE [ In-place writes ]: make every in-place write a link of the graph.

    ``x.add_(1)`` as a statement (its result unused) changes ``x`` for the layers after it, but nothing in the graph
    says so: the segment that computes the layers after it (the cone of its output, NOTE [ Segment windows ]) would
    not contain the write and read the unchanged ``x``. So every later reader of a tensor written in place reads the
    in-place node instead (the same values, as in eager mode); a tensor written through an alias
    (``x.contiguous().add_(1)``) likewise, when the alias is all of it in the same shape. A tensor written through
    a partial or reshaped view and read again afterwards is refused: its later readers would need a scatter the
    graph does not express."""
    order = {n: k for k, n in enumerate(graph.nodes)}
    for n, chain in _in_place_writes(list(graph.nodes), root):
        whole, through = True, None
        for k, target in enumerate(chain):
            later = [u for u in target.users if order[u] > order[n]]
            if whole:
                for u in later:
                    u.replace_input_with(target, n)
            elif later:
                raise NotStreamableError(
                    f"node '{n.name}' writes in place into '{target.name}' through a part or reshaped view of it "
                    f"('{through.name}'), and '{later[0].name}' reads it afterwards; tilegrad cannot follow such a "
                    "write: assign the result instead (x = x + ... rather than an in-place op on a view)"
                )
            kind = _alias_kind(target, root) if k + 1 < len(chain) else "copy"
            if kind == "copy":  # eager mode wrote into a new tensor: what it was made from is unchanged
                break
            whole, through = whole and kind == "same", target


@functools.cache
def _signature(function: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without one
        return None


@dataclass
class NodeProfile:
    """What one node costs on the whole image: output shape, forward FLOPs, bytes autograd saves for backward."""

    shape: tuple[int, ...] | None
    flops: float = 0.0
    saved: int = 0
    out_bytes: int = 0
    value: Any = None  # a value that is not a tensor (a size read from a shape), on the whole image
    alias: bool = False  # the output is an input or a view of one (eval dropout, identity): no new memory


class _Profiler(torch.fx.Interpreter):
    """Runs a meta copy of the graph node by node, recording each node's FLOPs and saved bytes."""

    def __init__(self, gm: torch.fx.GraphModule, training: bool):
        super().__init__(gm)
        self.training = training
        self.profiles: dict[str, NodeProfile] = {}
        self._params = {t.untyped_storage()._cdata for t in (*gm.parameters(), *gm.buffers())}
        self._seen: set[int] = set()
        self._current: NodeProfile | None = None
        self.failed_at: torch.fx.Node | None = None  # the node running when the model's own forward raised

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self._params and key not in self._seen and self._current is not None:
            self._seen.add(key)
            self._current.saved += t.untyped_storage().nbytes()
        return t

    def run_node(self, n: torch.fx.Node) -> Any:
        prof = NodeProfile(None)
        self._current = prof
        grad = torch.enable_grad() if self.training else torch.no_grad()
        with (
            grad,
            torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t),
            FlopCounterMode(display=False) as fc,
        ):
            self.failed_at = n
            out = super().run_node(n)
            self.failed_at = None
        prof.flops = float(fc.get_total_flops())
        if isinstance(out, torch.Tensor):
            prof.shape = tuple(out.shape)
            prof.out_bytes = out.numel() * out.element_size()
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            ins = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            prof.alias = any(out.untyped_storage()._cdata == a.untyped_storage()._cdata for a in ins)
        elif _constant(out):
            prof.value = out
        self.profiles[n.name] = prof
        return out


def _seed(scale: Sequence[Fraction]) -> Geometry:
    """Geometry of a source whose pixel i covers image pixels [i*s, i*s + s - 1] (NOTE [ Segment windows ])."""
    dims = tuple(DimGeometry(Fraction(s), Fraction(0), max(Fraction(0), Fraction(s) - 1)) for s in scale)
    return Geometry(dims, tuple(Fraction(s).numerator for s in scale))


@dataclass
class Segment:
    """One segment: the nodes that compute ``out`` from ``sources`` (NOTE [ Segments over a graph ])."""

    graph: TrunkGraph
    out: torch.fx.Node
    sources: list[torch.fx.Node]
    nodes: list[torch.fx.Node]
    geometry: Geometry  # of the output, in image pixels (NOTE [ Segment windows ])
    flops: float
    saved_bytes: int  # on the whole image
    largest_bytes: int  # largest single tensor inside, on the whole image
    source_bytes: int
    # indices into sources + globals of the tensors the segment writes in place, directly or through a view
    inplace_sources: frozenset[int] = field(default_factory=frozenset)
    globals: list[torch.fx.Node] = field(
        default_factory=list
    )  # statistics it reads whole (NOTE [ Streamed statistics ])
    whole: bool = False  # NOTE [ Whole pieces ]: runs on the whole map, its statistics computed inside

    @property
    def name(self) -> str:
        first = next((n for n in self.nodes if n.op == "call_module"), self.nodes[0])
        last = self.out
        label = lambda n: n.target if n.op == "call_module" else n.name  # noqa: E731
        return label(last) if first is last else f"{label(first)} .. {label(last)}"

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.graph.shape(self.out)

    def scale(self, node: torch.fx.Node) -> tuple[Fraction, ...]:
        return self.graph.scale(node)

    @functools.cached_property
    def module(self) -> nn.Module:
        """A GraphModule computing the output from the sources (in order); shares the trunk's submodules."""
        g = self.graph
        if self.sources == [g.input] and self.out is g.output and (self.whole or not g.rewritten):
            return g.root
        new = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for k, s in enumerate(self.sources):
            env[s] = new.placeholder(f"source_{k}")
        for k, s in enumerate(self.globals):
            env[s] = new.placeholder(f"global_{k}")
        native = self.native_layers if self.whole else {}
        for n in self.nodes:
            if n in native:  # NOTE [ Whole pieces ]: the layer itself on the whole map
                if native[n] is not None:
                    env[n] = new.call_module(native[n], (env[n.args[0]],))
                continue
            env[n] = new.node_copy(n, lambda a: env[a])
        new.output(env[self.out])
        return torch.fx.GraphModule(g.gm, new)

    @functools.cached_property
    def native_layers(self) -> dict[torch.fx.Node, str | None]:
        """The reduction + apply pairs among the segment's nodes that are one layer of the trunk (a normalisation
        rewritten by ``rewrite_statistics``): apply node -> the layer's module path, reduction node -> None.

        A whole piece (NOTE [ Whole pieces ]) calls such a layer itself on the whole map instead of the pair, so the
        layer computes its statistics and updates its running ones as in the conventional step; the engine then
        leaves those reductions to it. Computed once per segment (its nodes do not change)."""
        members = set(self.nodes)
        out: dict[torch.fx.Node, str | None] = {}
        for r in self.nodes:
            path = r.meta.get("tilegrad_module")
            users = list(r.users)
            if (
                path is None
                or not users
                or any(
                    u not in members
                    or u.target is not apply_norm
                    or u.args[1] is not r
                    or u.args[0] is not r.args[0]
                    for u in users
                )
            ):
                continue
            out[r] = None
            out.update({u: path for u in users})
        return out


class TrunkGraph:
    """A trunk traced with torch.fx and profiled on meta tensors for one input shape (N, C, *spatial)."""

    def __init__(
        self, module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype, training: bool = True
    ):
        self.root = module
        self.input_shape = tuple(int(s) for s in input_shape)
        self.ndim = len(self.input_shape) - 2
        self.dtype = dtype
        try:
            graph = trace_graph(module, self.ndim, self.input_shape)
        except NotStreamableError as err:
            raise explained(module, "", err) from err
        self.gm = torch.fx.GraphModule(module, graph)
        graph = self.gm.graph
        _functionalize(graph, module)
        self.gm.recompile()
        self.rewritten = rewrite_statistics(self.gm, self.ndim) > 0
        self.nodes = list(graph.nodes)
        self.index = {n: k for k, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if not placeholders:
            raise NotStreamableError(f"{type(module).__name__}.forward takes no tensor input")
        self.input = placeholders[0]
        try:
            self.geoms = propagate(module, self.nodes, self.ndim, {self.input: Geometry.identity(self.ndim)})
        except NotStreamableError as err:  # in the user's words when it is attention's doing
            raise explained(module, "", err) from err
        (out_node,) = [n for n in self.nodes if n.op == "output"]
        self.output: torch.fx.Node = out_node.args[0]
        self._refuse_global_output()
        self.geometry = trunk_output(module, graph, self.geoms)
        # NOTE [ Streamed statistics ]: reductions, the nodes computed from them alone, and their inputs (forced cuts)
        self.reductions = [n for n in self.nodes if is_reduction(n)]
        self.global_set: set[torch.fx.Node] = set()
        for n in self.nodes:
            if n in self.reductions or (
                self.geoms.get(n) is None and any(a in self.global_set for a in n.all_input_nodes)
            ):
                self.global_set.add(n)
        self.global_nodes = [n for n in self.nodes if n in self.global_set and n not in self.reductions]
        self.forced = frozenset(r.args[0] for r in self.reductions if r.args[0] is not self.input)
        self.profiles = self._profile(training)
        self._by_sources: dict[tuple[torch.fx.Node, tuple[torch.fx.Node, ...]], Segment | GeometryError] = {}
        self._segment_lists: dict[tuple[frozenset, frozenset], tuple[Segment, ...]] = {}
        self.param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())

    def _refuse_global_output(self) -> None:
        """A trunk whose output is a global statistic (it ends in global pooling) has no map to tile."""
        stack, seen = [self.output], set()
        while stack:
            n = stack.pop()
            if n in seen or not isinstance(n, torch.fx.Node):
                continue
            seen.add(n)
            if is_reduction(n):
                if self.geoms.get(self.output) is None:
                    where = n.meta.get("tilegrad_source") or n.meta.get("tilegrad_module") or n.name
                    raise NotStreamableError(
                        f"{type(self.root).__name__} ends in a global reduction, {where}: its output is one value "
                        "per image, not a map to tile. Stream the part before it (tilegrad.split_model) and pass "
                        "the pooling as a streamed head (StreamingModule(trunk, head=tilegrad.heads.GlobalPool(...)))"
                    )
                return
            if self.geoms.get(n) is None:
                stack.extend(n.all_input_nodes)

    # -- profile ------------------------------------------------------------------------------------------------
    def _profile(self, training: bool) -> dict[torch.fx.Node, NodeProfile]:
        meta = copy.deepcopy(self.gm)
        for m in meta.modules():  # planning must not call the user's hooks
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        meta = meta.to("meta")
        x = torch.empty(self.input_shape, device="meta", dtype=self.dtype, requires_grad=training)
        prof = _Profiler(meta, training)
        try:
            prof.run(x)
        except Exception as err:
            at = prof.failed_at
            module = self.gm.get_submodule(at.target) if at is not None and at.op == "call_module" else None
            where = f", in {node_where(at, module, root=type(self.root).__name__)}" if at is not None else ""
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise GeometryError(
                f"{type(self.root).__name__} failed on an input of shape {self.input_shape}{where}: "
                f"{type(err).__name__}: {first}. This is the model's own forward: called whole on an input of this "
                f"size it fails the same way; give it an input size it accepts{self._accepted_size(meta, training)}"
            ) from err
        by_name = {n.name: n for n in self.nodes}
        return {by_name[k]: v for k, v in prof.profiles.items()}

    def _accepted_size(self, meta: torch.fx.GraphModule, training: bool) -> str:
        """' (it runs on <shape>)': the first of the input's spatial sizes times 2, 4, 8 on which the traced graph
        runs (on meta tensors: nothing is computed), or ''."""
        for factor in (2, 4, 8):
            shape = (*self.input_shape[:2], *(factor * s for s in self.input_shape[2:]))
            x = torch.empty(shape, device="meta", dtype=self.dtype)
            try:
                _Profiler(meta, False).run(x)
            except Exception:  # still too small for it (or something the meta device cannot do): not a hint
                continue
            return f" (its traced graph runs on {shape}, {factor}x larger)"
        return ""

    def shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        shape = self.profiles[node].shape
        assert shape is not None
        return shape

    def scale(self, node: torch.fx.Node) -> tuple[Fraction, ...]:
        """Image pixels per pixel of ``node`` (its stride in the image frame)."""
        return tuple(d.stride for d in self.geoms[node].dims)

    def on_grid(self, node: torch.fx.Node) -> bool:
        """Whether the node's map covers the image on its scale's grid, its size ``image / scale`` rounded either way
        (NOTE [ Segment windows ])."""
        shape = self.profiles[node].shape
        if self.geoms.get(node) is None or shape is None or len(shape) != self.ndim + 2:
            return False
        return all(abs(n * s - i) < s for n, s, i in zip(shape[2:], self.scale(node), self.input_shape[2:]))

    # -- cuts -------------------------------------------------------------------------------------------------
    @functools.cached_property
    def candidates(self) -> list[torch.fx.Node]:
        """Tensors where a cut may go, in topological order (NOTE [ Segments over a graph ]): the stage cuts and
        the block outputs."""
        cands = set(self.stage_candidates) | set(
            self._usable(self._block_outputs(self._ancestors(self.output)), off_grid=True)
        )
        return sorted(cands, key=self.index.__getitem__)

    @functools.cached_property
    def stage_candidates(self) -> list[torch.fx.Node]:
        """The candidates around changes of scale, in topological order (NOTE [ Segments over a graph ])."""
        cands: set[torch.fx.Node] = set()
        for n in self.nodes:
            if self.geoms.get(n) is None or n.op in ("placeholder", "output"):
                continue
            spatial_inputs = [a for a in n.all_input_nodes if self.geoms.get(a) is not None]
            if any(self.scale(a) != self.scale(n) for a in spatial_inputs):
                cands.add(n)
                cands.update(spatial_inputs)
        return sorted(self._usable(cands, off_grid=True), key=self.index.__getitem__)

    def _usable(self, cands: Iterable[torch.fx.Node], off_grid: bool = False) -> list[torch.fx.Node]:
        """The tensors a cut may store: on the image's path to the output, not modified in place, on their grid
        unless ``off_grid`` (a block output off its grid, e.g. after unpadded convolutions, may be cut where it is
        the only source of the segments that read it; a cut set that makes it one of several raises,
        NOTE [ Segment windows ])."""
        mutated = _written(self.nodes, self.root)
        ancestors = self._ancestors(self.output)
        return [
            n
            for n in cands
            if n is not self.input
            and n is not self.output
            and n in ancestors
            and n not in mutated
            and n not in self.forced
            and (off_grid or self.on_grid(n))
        ]

    def _block_outputs(self, ancestors: set[torch.fx.Node]) -> list[torch.fx.Node]:
        """Tensors that close a block with branches (a residual add, a concatenation) and that every path from the
        image to the output goes through (NOTE [ Segments over a graph ]): a cut there has one tensor crossing it,
        and it splits a stage's halo where the stage has no change of scale (ResNet-34's layer3: six blocks at one
        scale)."""
        inputs = self._descendants(self.input)
        spatial = [
            n
            for n in self.nodes
            if n in inputs
            and n in ancestors
            and n.op not in ("placeholder", "output")
            and self.geoms.get(n) is not None
            and n not in self.global_set
        ]
        position = {n: k for k, n in enumerate(spatial)}  # topological, as self.nodes
        reach = 0  # the furthest position an edge from an earlier node lands on
        merged = False  # a node with several inputs since the last block output
        out = []
        for k, n in enumerate(spatial):
            if reach <= k and merged:  # no edge jumps over n: every path goes through it
                out.append(n)
                merged = False
            reach = max([reach, *(position[u] for u in n.users if u in position)])
            merged = merged or sum(a in position for a in n.all_input_nodes) > 1
        return out

    def _descendants(self, node: torch.fx.Node) -> set[torch.fx.Node]:
        return _closure(node, lambda n: n.users)

    def _ancestors(self, node: torch.fx.Node) -> set[torch.fx.Node]:
        return _closure(node, lambda n: n.all_input_nodes)

    def segments(
        self, cuts: Iterable[torch.fx.Node], recompute: Iterable[torch.fx.Node] = ()
    ) -> list[Segment]:
        """The segments of a cut set, in topological order; raises GeometryError if a window would not line up.
        ``recompute``: statistic inputs (forced cuts) that their readers recompute instead of reading them from a
        store (NOTE [ Recomputed statistic inputs ] in statistics.py): each still ends a segment, which computes
        its statistics, but is no source of any other."""
        return list(self._segments(frozenset(cuts), frozenset(recompute) & self.forced))

    def _segments(
        self, cuts: frozenset[torch.fx.Node], recompute: frozenset[torch.fx.Node] = frozenset()
    ) -> tuple[Segment, ...]:
        # cached on the graph, not by functools.lru_cache: that cache is the class's and kept every planning
        # call's TrunkGraph alive (about 0.7 MiB per tilegrad.infer call on MONAI UNet 16-32-64, measured)
        key = (cuts, recompute)
        if key not in self._segment_lists:
            all_cuts = cuts | self.forced
            stops = (set(all_cuts) - recompute) | {self.input}
            outs = sorted(set(all_cuts) | {self.output}, key=self.index.__getitem__)
            self._segment_lists[key] = tuple(self._segment(out, stops) for out in outs)
        return self._segment_lists[key]

    def _cone(
        self, out: torch.fx.Node, stops: set[torch.fx.Node], globals_apart: bool
    ) -> tuple[set[torch.fx.Node], set[torch.fx.Node], set[torch.fx.Node]]:
        """(members, sources, globals) of the nodes ``out`` is computed from, the walk ending at ``stops`` (the
        sources) and, with ``globals_apart``, at the statistics and global nodes (read whole, not computed)."""
        members: set[torch.fx.Node] = set()
        sources: set[torch.fx.Node] = set()
        globals_: set[torch.fx.Node] = set()
        stack = [out]
        while stack:
            n = stack.pop()
            if n in members or n in sources or n in globals_:
                continue
            if globals_apart and n in self.global_set:
                globals_.add(n)
                continue
            if n in stops and n is not out:
                sources.add(n)
                continue
            members.add(n)
            stack.extend(n.all_input_nodes)
        return members, sources, globals_

    def _segment(self, out: torch.fx.Node, stops: set[torch.fx.Node]) -> Segment:
        members, sources, globals_ = self._cone(out, stops, globals_apart=True)
        nodes = sorted(members, key=self.index.__getitem__)
        srcs = sorted(sources, key=self.index.__getitem__)
        # the walk above depends only on ``out`` and the stops it meets (its sources): one Segment per pair, shared
        # by every cut set that contains it, so the planner profiles it once (NOTE [ Planning cost ] in plan.py)
        return self._cached((out, tuple(srcs)), lambda: self._new_segment(out, nodes, srcs, globals_))

    def _cached(self, key: tuple, build: Callable[[], Segment]) -> Segment:
        """The segment of ``key``, built once; a GeometryError is kept too and raised again for every cut set that
        meets the same segment."""
        if key not in self._by_sources:
            try:
                self._by_sources[key] = build()
            except GeometryError as err:
                self._by_sources[key] = err
        seg = self._by_sources[key]
        if isinstance(seg, GeometryError):
            raise seg
        return seg

    def whole(self, run: Sequence[Segment]) -> Segment:
        """NOTE [ Whole pieces ]: one segment computing what the consecutive segments ``run`` compute, run on the
        whole map with its statistics inside; raises GeometryError when the run is not one piece (a boundary
        between its segments is read after it, or a statistic inside is read outside)."""
        inner = {s.out for s in run[:-1]}
        stops = {src for s in run for src in s.sources} - inner
        key = (run[-1].out, tuple(sorted(stops, key=self.index.__getitem__)), "whole")
        return self._cached(key, lambda: self._whole(run[-1].out, stops, inner))

    def _whole(self, out: torch.fx.Node, stops: set[torch.fx.Node], inner: set[torch.fx.Node]) -> Segment:
        members, sources, _ = self._cone(out, stops, globals_apart=False)  # its statistics inside
        missing = inner - members
        if missing:
            raise GeometryError(
                f"{sorted(m.name for m in missing)} not on the path to {out.name}: not one piece"
            )
        for n in members:
            if n is not out and (n in inner or n in self.global_set):
                outside = [u.name for u in n.users if u not in members]
                if outside:
                    raise GeometryError(
                        f"{n.name} is read outside the piece ending at {out.name} ({outside})"
                    )
        nodes = sorted(members, key=self.index.__getitem__)
        srcs = sorted(sources, key=self.index.__getitem__)
        seg = self._new_segment(out, nodes, srcs, set())
        # what the layers save, not what the rewritten reductions save (the native layers make no such copies)
        seg.saved_bytes = sum(self.profiles[n].saved for n in nodes if not is_reduction(n))
        seg.whole = True
        return seg

    def _new_segment(
        self,
        out: torch.fx.Node,
        nodes: list[torch.fx.Node],
        srcs: list[torch.fx.Node],
        globals_: set[torch.fx.Node],
    ) -> Segment:
        if not any(self.geoms.get(s) is not None for s in srcs):
            raise GeometryError(f"segment ending at {out.name} does not depend on the image")
        seeds = {s: _seed(self.scale(s)) for s in srcs}
        geoms = propagate(self.root, nodes, self.ndim, seeds)
        geometry = geoms[out]
        assert geometry is not None
        if len(srcs) > 1:
            # sources and merge points of several sources sit on their grid (NOTE [ Segment windows ])
            for n in [s for s in srcs if s is not self.input] + nodes:
                spatial = [a for a in n.all_input_nodes if geoms.get(a) is not None]
                if (n in srcs or len(spatial) > 1) and not self.on_grid(n):
                    raise GeometryError(f"node {n.name} does not sit on its scale's grid; no cut through it")
        profs = [self.profiles[n] for n in nodes]
        globs = sorted(globals_, key=self.index.__getitem__)
        written = _written(nodes, self.root)
        inplace = frozenset(k for k, s in enumerate(srcs + globs) if s in written)
        return Segment(
            graph=self,
            out=out,
            sources=srcs,
            nodes=nodes,
            geometry=geometry,
            flops=sum(p.flops for p in profs),
            saved_bytes=sum(p.saved for p in profs),
            largest_bytes=max((p.out_bytes for p in profs), default=0),
            source_bytes=sum(self.profiles[s].out_bytes for s in srcs if s is not self.input)
            + (_nbytes(self.input_shape, self.dtype) if self.input in srcs else 0),
            inplace_sources=inplace,
            globals=globs,
        )

    def inside_pieces(self, segments: Sequence[Segment]) -> set[torch.fx.Node]:
        """The nodes the whole pieces among ``segments`` compute themselves (NOTE [ Whole pieces ]): their members,
        less the statistics the engine streams anyway because a streamed segment reads them too."""
        inside = {n for s in segments if s.whole for n in s.nodes}
        return inside - self.streamed_globals(segments) if inside else inside

    def streamed_globals(self, segments: Sequence[Segment]) -> set[torch.fx.Node]:
        """The statistics and global nodes the engine computes between segments: those the streamed segments read,
        and the ones they are computed from (NOTE [ Whole pieces ]: a whole piece computes its own)."""
        stack = [n for s in segments if not s.whole for n in s.globals]
        return _closure(stack, lambda n: [a for a in n.all_input_nodes if a in self.global_set])

    def whole_conflict(self, segments: Sequence[Segment]) -> str | None:
        """Why these segments cannot run together (a tensor a whole piece keeps inside is another segment's source,
        or a statistic it computes inside from such a tensor is read by a streamed segment), or None."""
        outs = {s.out for s in segments} | {self.input}
        for s in segments:
            lost = [src.name for src in s.sources if src not in outs]
            if lost:
                return f"{s.name} reads {lost}, which a whole piece keeps inside"
        seen: set[torch.fx.Node] = set()
        for s in segments:
            if s.whole:  # a layer called in two pieces would update its running statistics twice
                twice = [n.name for n in s.nodes if n in self.global_set and n in seen]
                if twice:
                    return f"{twice} inside two whole pieces"
                seen.update(s.nodes)
        shared = self.streamed_globals(segments)
        for s in segments:
            if s.whole:
                members = set(s.nodes)
                for r in shared & members:
                    if is_reduction(r) and r.args[0] in members:
                        return f"{r.name} of {r.args[0].name}, inside {s.name}, is read by a streamed segment"
        return None

    @functools.cache  # noqa: B019
    def global_module(self, node: torch.fx.Node) -> tuple[nn.Module, list[torch.fx.Node]]:
        """A module computing a global node from the global nodes it reads (NOTE [ Streamed statistics ])."""
        new = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        inputs: list[torch.fx.Node] = []

        def visit(n: torch.fx.Node) -> Any:
            if n in env:
                return env[n]
            if n in self.global_set and n is not node:
                inputs.append(n)
                env[n] = new.placeholder(f"global_{len(inputs)}")
                return env[n]
            value = self.profiles[n].value if n in self.profiles else None
            if n not in self.global_set and value is not None:
                # a size read from a map's shape (MONAI's squeeze-excitation: ``pool(x).view(b, c)`` with
                # ``b, c = x.shape[:2]``): the whole map's, a constant for the statistic, not the map itself
                env[n] = value
                return value
            for a in n.all_input_nodes:
                visit(a)
            written = _mutated(n, self.root)
            if written is not None and written in inputs:
                # in place on a leaf (SiLU(inplace=True)): on a copy
                env[written] = new.call_method("clone", (env[written],))
            env[n] = new.node_copy(n, lambda a: env[a])
            return env[n]

        new.output(visit(node))
        return torch.fx.GraphModule(self.gm, new), inputs

    def source_box(self, source: torch.fx.Node, window: tuple[slice, ...]) -> tuple[slice, ...]:
        """The box of ``source`` a window of the image frame reads (NOTE [ Segment windows ])."""
        if source is self.input:
            return window
        out = []
        for w, s, n in zip(window, self.scale(source), self.shape(source)[2:]):
            start = Fraction(w.start) / s
            stop = math.ceil(Fraction(w.stop) / s)
            if start.denominator != 1:  # pragma: no cover - guaranteed by the seeds' alignment
                raise GeometryError(f"window {w} does not start on the grid of scale {s}")
            out.append(slice(int(start), min(n, stop)))
        return tuple(out)


def zero_padded_torch_conv(conv: nn.Module) -> bool:
    """Whether ``conv`` is an ``nn.Conv2d``/``nn.Conv3d`` itself with zero padding given in numbers: the layers whose
    float32 forward the engine runs on oneDNN below PyTorch's cutoff, and the planner prices so (NOTE [ Small-tile
    convolutions on oneDNN ] in execute.py)."""
    return (
        type(conv) in (nn.Conv2d, nn.Conv3d)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def last_convolution(seg: Segment) -> torch.fx.Node | None:
    """The segment's output node if it is a zero-padded convolution module called on one tensor (the convolution
    whose recomputation the engine's backward skips: NOTE [ Last convolution not recomputed ] in execute.py). Only
    torch's own convolution classes, without hooks, whose weight and bias are their own parameters: the engine runs
    torch's convolution backward for it on ``conv.weight`` and gives the weight gradient to that parameter."""
    n = seg.out
    if n.op != "call_module" or len(n.args) != 1 or n.kwargs or not isinstance(n.args[0], torch.fx.Node):
        return None
    conv = seg.graph.gm.get_submodule(n.target)
    if (
        not isinstance(conv, nn.modules.conv._ConvNd)
        # a subclass with a rule of its own (timm's ScaledStdConv2d once was one: its forward standardises the
        # weight) computes something other than torch's convolution, whose backward the engine would run for it
        or type(conv).__module__ != nn.modules.conv.__name__
        or overrides_computation(conv)
        or has_forward_hooks(conv)
        or not _own_parameters(conv)
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
    ):
        return None
    return n


def _own_parameters(conv: nn.Module) -> bool:
    """Whether ``conv.weight`` and ``conv.bias`` are parameters of the layer itself. A parametrized layer
    (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm``, ``spectral_norm``) computes its weight from
    other parameters on each access, in a class of ``torch.nn.utils.parametrize``: the weight gradient of torch's
    convolution backward belongs to that computed tensor, not to a parameter, and was silently dropped."""
    own = conv._parameters
    return all(
        own.get(name) is getattr(conv, name)
        and (own.get(name) is None or isinstance(own[name], nn.Parameter))
        for name in ("weight", "bias")
    )


def _closure(
    node: torch.fx.Node | Iterable[torch.fx.Node], step: Callable[[torch.fx.Node], Iterable[torch.fx.Node]]
) -> set[torch.fx.Node]:
    """``node`` (or several) and every node reached by repeated ``step`` (users: descendants; inputs: ancestors)."""
    seen: set[torch.fx.Node] = set()
    stack = [node] if isinstance(node, torch.fx.Node) else list(node)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(step(n))
    return seen


def _constant(value: Any) -> bool:
    """A plain value (a size, a tuple of sizes) that a global node may read as a constant."""
    if isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, (tuple, list, torch.Size)) and all(_constant(v) for v in value)


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
