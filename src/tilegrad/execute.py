"""Exact streamed execution of a plan (tilegrad/plan.py): every segment tile by tile, boundaries in their tiers.

NOTE [ Streamed execution ]
One ``torch.autograd.Function`` runs a whole plan. Forward: the segments in topological order; each tile reads its
sources' boxes (NOTE [ Segment windows ] in graph.py) from their stores, runs the segment without a graph, crops
its core (NOTE [ Valid region ]) and writes it into the store of the segment's output (or, for the last segment,
into the output tensor or the streamed head's reduction: NOTE [ Streamed heads ] in heads.py). Backward: the
segments in reverse; each tile is recomputed with a graph and the gradient of its core (read from the output's
gradient store, or derived from the head's partial results) is pushed through it; the gradients of its sources are
added into their gradient stores at the tile's boxes (overlapping boxes add up), parameter gradients are summed
over tiles (NOTE [ Disjoint cores ] in tiling.py). A boundary's gradient is complete when every segment reading it
has run its backward, which reverse topological order guarantees; its store is freed right after its producer's
backward. Activation stores live through the whole step (the planner's memory sweep charges them so, NOTE
[ Boundary lifetime ] in plan.py): a producer's backward may read its own output's store (NOTE [ Last convolution
not recomputed ]) and a second backward (``retain_graph=True``) reads them all again; they are freed when the
step's graph is. In inference a store is freed after its last reader's forward.

NOTE [ Tile order ]
In a training step the segments alternate the order of their tiles (plan.py, ``reversed_tiles``): the forward of
the first segment runs its grid in reverse raster order, of the second in raster order, and so on, and each
segment's backward runs the reverse of its own forward. A pass over a boundary file then starts where the previous
pass over it ended (a reader reads the map from the last tiles its producer wrote, a producer's backward reads its
gradient from the last boxes its reader's backward added into, a backward's recomputation reads its sources from
where its forward stopped), so when a map is larger than the page cache, the part the cache still holds is read
first instead of being evicted before the scan reaches it (an LRU cache under scans in one direction misses
everywhere: NOTE [ Page cache ] in plan.py prices both). Two ends are fixed: the first segment's backward runs in
raster order (a GradientSink receives the input's gradient boxes in raster order), and so does the forward of a
last segment feeding a streamed head (its partials are merged in raster order: ties of GlobalPool("max") resolve
as on the whole map); with an odd number of segments and a head, the last boundary is then scanned twice in one
direction; a plan of one segment with a head runs both its forward and its backward in raster order. (A later
segment that also reads the image hands the sink boxes of its own, after the first segment's.) The order changes only the order of floating-point sums (gradients of overlapping boxes, parameter
gradients, statistics' partials). Inference keeps raster order (sinks and infer.py's resumable journal).

NOTE [ Last convolution not recomputed ]
The backward of a convolution needs its input and the gradient of its output, never its output. When a segment
ends in a convolution (nn.ConvNd or nn.ConvTransposeNd with zero padding: in a network cut at every normalisation
that is almost every segment, and its most expensive layer), each tile's backward recomputes only the part before
it, with a graph, and calls the convolution's backward (``aten.convolution_backward``, the function autograd's own
node calls) on that input with the core's gradient placed in a zero map of the tile's output shape. What the
output's value is needed for (the gradient a statistic of it sends, NOTE [ Streamed statistics ]) is read from the
output's store, which holds exactly what the forward wrote. Not under autocast, not for a streamed head's input.

NOTE [ Small-tile convolutions on oneDNN ]
PyTorch runs a float32 CPU convolution on oneDNN only above a size (for 3D, N*C*D*H > 20480 of its input, or a
batch above 1); below it, the native unfold kernel (``Slow3d``), which a tile's box reaches where the whole image
does not (plan.py, NOTE [ Cost model ]). For the forward that kernel is 3-6x slower per output than oneDNN at the
same box (measured, 160^3 UNet's tiles: 1->16 at 64^3 82 against 19 ns per output, 16->32 at 32^3 1576 against
266, 32->64 at 22^3 3407 against 972; the 1->16 results bit-identical, the others within float32 rounding). So the
engine runs each segment through a copy of its graph whose plain convolutions (``nn.Conv2d``/``nn.Conv3d``, zero
padding, no hooks) call ``_conv_forward``: ``aten.mkldnn_convolution`` (the op PyTorch's own dispatch calls above
the cutoff) when PyTorch would pick an unfold kernel for a float32 CPU input outside autocast, else the layer's own
convolution. Its gradient is autograd's for that op, ``convolution_backward``, which still selects by size: the
backward stays on the unfold kernel below the cutoff (no oneDNN backward is exposed), and the cost model charges
``SLOW_CONV`` to the backward's passes only. The forward, the backward's recomputation and a statistic's recomputed
input all go through the same function, so they agree with what the forward stored.

NOTE [ Kept segments ]
A segment the plan runs in one tile keeps its graph from the forward to its own backward (run whole with autograd
on detached sources): nothing is recomputed, at the price of the bytes autograd saves. The graph is dropped right
after that backward, so while the earlier segments run theirs only the graphs of the segments before them are
alive (plan.py's memory sweep counts them so); a second backward (retain_graph=True) recomputes the segment as a
one-tile streamed segment from its sources' stores, which live as long as the step. A whole piece (NOTE [ Whole
pieces ] in graph.py) is such a segment that computes its statistics inside: the engine neither accumulates nor
combines those only it reads, and autograd takes their gradients (one a streamed segment also reads is streamed
as well, its running statistics updated once, by the layer inside the piece).

NOTE [ IO overlap ]
Scratch files and a lazy input are read and written by the CPU (page-cache copies, TIFF decoding): done between
tiles on the main thread, that work ran while the intra-op threads waited (measured at 8192^2, ResNet-34 under 2
GiB: the main thread ran alone 15% of the step, disk and input IO about 27 s of its 493 CPU s). A segment whose plan
has ``io_bytes`` (plan.py, ``_Planner.overlapped``: the extra working set fits the budget) hands that IO to one
background thread (``_Overlap``) that runs it in submission order: while tile i computes, the sources of tile i+1
that come from a scratch file or the lazy input are read, and the output core of tile i-1 (forward) or its sources'
gradients (backward) are written or added into their scratch files. One thread in order keeps every store's reads,
writes and adds in the sequential order (an add is a read-modify-write: NOTE [ Storage tiers ] in boundary.py), so
the results are bit for bit those of the sequential loop; the main thread never touches those stores while the
segment runs (it reads its output's stores, the thread its sources'), and the thread is drained at the end of each
segment, before anything else reads what it wrote. At most one tile's sources read ahead and one tile's writes
behind are alive beside the tile (the forward waits for the previous core's write before it hands over the next;
``io_bytes``, ``io_forward_bytes``: the boxes read ahead plus the output core
written behind in the forward, or the sources' gradients added behind in the backward). The thread
runs its torch copies on one OpenMP thread (its own team would compete with the compute's). An error in the thread
is raised on the main thread (the same exception, at the next hand-over or at the segment's end); pending work is
cancelled and the scratch files removed as on any error.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import math
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ._allocator import trim_heap
from ._autocast import autocast_state, replay_autocast
from .boundary import DiskStore, Scratch, TensorStore
from .graph import last_convolution, zero_padded_torch_conv
from .plan import Plan, SegmentPlan, reversed_tiles
from .statistics import reduction_combine, reduction_grad, reduction_partials, slabs, update_running_stats

__all__ = ["Execution", "Reader", "run_plan", "segment_runner"]


_SLOW_CONV = {torch._C._ConvBackend.Slow2d, torch._C._ConvBackend.Slow3d}


def _conv_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """A zero-padded convolution, on oneDNN where PyTorch would pick its unfold kernel for a float32 CPU input
    (NOTE [ Small-tile convolutions on oneDNN ])."""
    if (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and torch._C._select_conv_backend(
            x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
        )
        in _SLOW_CONV
    ):
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(), weight, bias, padding, stride, dilation, groups
        )
    conv = torch.nn.functional.conv3d if x.dim() == 5 else torch.nn.functional.conv2d
    return conv(x, weight, bias, stride, padding, dilation, groups)


def _plain_conv(conv: nn.Module) -> bool:
    """Whether ``conv`` computes exactly ``_conv_forward`` of its weight and bias: an ``nn.Conv2d``/``nn.Conv3d``
    itself, zero padding given in numbers, no hooks, no forward of its own (NOTE [ Small-tile convolutions on
    oneDNN ])."""
    hooks = nn.modules.module
    return (
        zero_padded_torch_conv(conv)
        and not conv._forward_hooks
        and not conv._forward_pre_hooks
        and "forward" not in vars(conv)
        and not hooks._global_forward_hooks
        and not hooks._global_forward_pre_hooks
    )


def _conv_module(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """``conv(x)``, as ``_conv_forward`` when the layer is a plain convolution at the time of the call (NOTE
    [ Small-tile convolutions on oneDNN ]): a hook registered later still runs."""
    if not _plain_conv(conv):
        return conv(x)
    args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    return _conv_forward(x, conv.weight, conv.bias, *args)


def _hooked(module: nn.Module) -> bool:
    """Whether any module in ``module`` has a hook (running its trace instead would skip those of inner modules)."""
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        for m in module.modules()
    )


def segment_runner(sp: SegmentPlan) -> nn.Module:
    """The module a segment's tiles call: its chain with the plain convolutions on ``_conv_forward`` (NOTE
    [ Small-tile convolutions on oneDNN ]); what the planner's memory and time models price. ``tilegrad.infer``'s
    one-segment loop calls it too."""
    chain = sp.chain
    g = sp.segment.graph
    if (
        chain is g.root
        and not g.rewritten
        and not isinstance(chain, torch.fx.GraphModule)
        and not _hooked(chain)
    ):
        chain = g.gm  # the one-segment plan of a trunk computes it as its trace does (graph.py)
    runner = _onednn_convs(chain)
    return sp.chain if runner is g.gm else runner


def _onednn_convs(module: nn.Module) -> nn.Module:
    """A copy of a segment's GraphModule whose ``nn.Conv2d``/``nn.Conv3d`` layers are called through
    ``_conv_module`` (NOTE [ Small-tile convolutions on oneDNN ]); the module itself when there is none (or it is not
    a GraphModule)."""
    if not isinstance(module, torch.fx.GraphModule):
        return module
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(module.graph, env))
    changed = False
    for n in list(graph.nodes):
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs:
            continue
        if type(module.get_submodule(n.target)) not in (nn.Conv2d, nn.Conv3d):
            continue
        with graph.inserting_before(n):
            new = graph.call_function(_conv_module, (n.args[0], graph.get_attr(n.target)))
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        changed = True
    if not changed:
        return module
    return torch.fx.GraphModule(module, graph)


class Reader:
    """Reads input boxes from a tensor or a lazy array, as tensors on the module's device and dtype."""

    def __init__(self, source: Any, device: torch.device, dtype: torch.dtype):
        self.source = source
        self.device = device
        self.dtype = dtype
        self.is_tensor = isinstance(source, torch.Tensor)
        self.shape = tuple(int(s) for s in source.shape)

    def read(self, box: tuple[slice, ...]) -> torch.Tensor:
        key = (slice(None), slice(None), *box)
        if self.is_tensor:
            block = self.source[key]
            if not block.is_floating_point() and self.dtype.is_floating_point:
                # integer pixels as values, like an integer array's below
                block = block.to(device=self.device, dtype=self.dtype)
            return block
        block = np.asarray(self.source[key])
        if block.dtype.kind in "uib" and self.dtype.is_floating_point:
            # float64 for a float64 model: float32 would round integers above 2**24
            block = block.astype(np.float64 if self.dtype == torch.float64 else np.float32)
        return torch.from_numpy(np.ascontiguousarray(block)).to(device=self.device, dtype=self.dtype)


def _one_omp_thread() -> None:
    """Initializer of the IO thread (NOTE [ IO overlap ]): its own OpenMP parallel regions on one thread. PyTorch
    sets a new thread's OpenMP thread count on its first parallel operation, so one runs first; the count is the
    calling thread's own (OpenMP's nthreads-var), the compute threads keep theirs."""
    torch.ones(1).add_(1)
    try:
        with open("/proc/self/maps") as fh:
            paths = {
                line.split()[-1]
                for line in fh
                if "libgomp" in line and line.rstrip().endswith((".so", ".so.1"))
            }
    except OSError:
        return
    for path in sorted(paths):
        try:
            ctypes.CDLL(path).omp_set_num_threads(1)
        except (OSError, AttributeError):
            continue


class _Overlap:
    """One background thread running a segment's scratch-file and lazy-input IO in submission order
    (NOTE [ IO overlap ])."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="tilegrad-io", initializer=_one_omp_thread
        )
        self.futures: collections.deque[concurrent.futures.Future] = collections.deque()
        self.last_write: concurrent.futures.Future | None = None  # the forward's last output core handed over

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        while self.futures and self.futures[0].done():  # an error of finished work is raised here
            self.futures.popleft().result()
        future = self.pool.submit(fn, *args)
        self.futures.append(future)
        return future

    def drain(self) -> None:
        """Wait for everything handed over; raise the first error."""
        self.last_write = None
        while self.futures:
            self.futures[0].result()
            self.futures.popleft()

    def cancel(self) -> None:
        """On an error: drop what has not started, wait for what has (its error is not the one to report)."""
        for f in self.futures:
            f.cancel()
        concurrent.futures.wait(self.futures)
        self.futures.clear()
        self.last_write = None

    def close(self) -> None:
        self.cancel()
        self.pool.shutdown(wait=True)


def _bar(show: bool | None, total: int, what: str) -> Any:
    show = show if show is not None else (total > 16 and sys.stderr.isatty())
    if not show or total <= 1:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"tilegrad {what}", unit="tile", leave=False)


class Execution:
    """The state of one streamed step: stores, kept graphs, head partials (NOTE [ Streamed execution ])."""

    def __init__(
        self,
        plan: Plan,
        reader: Reader,
        *,
        head: nn.Module | None = None,
        sink: Any = None,
        scratch_dir: Any = None,
        progress: bool | None = None,
        writer: Any = None,
    ):
        assert plan.graph is not None
        self.writer = writer
        self.plan = plan
        self.graph = plan.graph
        self.reader = reader
        self.device, self.dtype = reader.device, reader.dtype
        self.head = head
        self.sink = sink
        self.scratch_dir = scratch_dir
        self.progress = progress
        self.tiers = {b.name: b for b in plan.boundaries}
        self.stores: dict[Any, Any] = {}
        self.grads: dict[Any, Any] = {}
        self.kept: dict[int, tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]] = {}
        self.partials: list[tuple[torch.Tensor, ...]] = []
        self.head_graph: tuple[list[torch.Tensor], torch.Tensor] | None = None
        self.autocast = autocast_state(self.device.type)
        self.consumers: dict[Any, list[int]] = {}
        for k, sp in enumerate(plan.segments):
            for s in sp.segment.sources:
                self.consumers.setdefault(s, []).append(k)
        self.scratch = None
        self.overlap: _Overlap | None = None  # NOTE [ IO overlap ]
        # NOTE [ Streamed statistics ]: reductions and global nodes run between the segments, in graph order
        index = self.graph.index
        # a whole piece computes its statistics itself (NOTE [ Whole pieces ] in graph.py)
        inside = self.graph.inside_pieces([sp.segment for sp in plan.segments])
        # reductions of layers a whole piece calls itself (Segment.native_layers): the layer updates its running
        # statistics there, so the engine does not when a streamed segment needs the same statistic too
        self.native = {
            r
            for sp in plan.segments
            if sp.segment.whole
            for r, p in sp.segment.native_layers.items()
            if not p
        }
        items = [(index[sp.segment.out], "segment", k) for k, sp in enumerate(plan.segments)]
        items += [(index[r], "reduction", r) for r in self.graph.reductions if r not in inside]
        items += [(index[n], "global", n) for n in self.graph.global_nodes if n not in inside]
        self.items = [(kind, what) for _, kind, what in sorted(items, key=lambda e: e[0])]
        self.values: dict[Any, Any] = {}
        # reductions of a segment's output, accumulated from its cores; their gradients, added in its backward
        self.reads: dict[Any, list[Any]] = {}
        for r in self.graph.reductions:
            if r.args[0] is not self.graph.input and r not in inside:
                self.reads.setdefault(r.args[0], []).append(r)
        self.red_parts: dict[Any, list[Any]] = {}
        self.pending: dict[Any, list[tuple[Any, torch.Tensor]]] = {}
        self.tails: dict[int, Any] = {}  # NOTE [ Last convolution not recomputed ]
        self.runners: dict[int, nn.Module] = {}  # NOTE [ Small-tile convolutions on oneDNN ]
        self.g_out_buf: torch.Tensor | None = None  # its output-gradient map, within one segment
        self.kept_glob: dict[Any, Any] = {}
        self.gglob: dict[Any, torch.Tensor] = {}

    # -- stores ---------------------------------------------------------------------------------------------
    def _store(self, node: Any, tier: str, zero: bool) -> Any:
        """A store for ``node``'s map (or its gradient) in ``tier`` (NOTE [ Storage tiers ] in boundary.py)."""
        shape = self.graph.shape(node)
        if tier == "disk" and self.device.type != "meta":
            if self.scratch is None:  # free space is checked here, when the run starts, not when planning
                self.scratch = Scratch(self.scratch_dir, self.plan.disk_bytes).__enter__()
            return DiskStore(
                shape, self.dtype, self.scratch, f"{node.name}{'' if not zero else '.grad'}", self.device
            )
        if tier == "host" and self.device.type == "cuda":
            return TensorStore(shape, self.dtype, "cpu", zero=zero, compute_device=self.device)
        return TensorStore(shape, self.dtype, self.device, zero=zero)

    def read(self, node: Any, window: tuple[slice, ...], k: int) -> torch.Tensor:
        box = self.graph.source_box(node, window)
        if node is self.graph.input:
            return self.reader.read(box)
        # only read: a source the segment writes into in place is copied first (_args), so a one-tile segment
        # reads the whole map without a copy (NOTE [ Storage tiers ] in boundary.py)
        return self.stores[node].read(box, shared=True)

    def close(self) -> None:
        if self.overlap is not None:  # before the files it reads and writes are closed
            self.overlap.close()
            self.overlap = None
        self.kept.clear()
        self.g_out_buf = None
        self.red_parts.clear()
        self.pending.clear()
        self.kept_glob.clear()
        self.values.clear()
        self.gglob.clear()
        self.head_graph = None
        self.partials = []
        for store in (*self.stores.values(), *self.grads.values()):
            store.close()
        self.stores.clear()
        self.grads.clear()
        if self.scratch is not None:
            self.scratch.__exit__(None, None, None)
            self.scratch = None

    # -- NOTE [ IO overlap ] -----------------------------------------------------------------------------------
    def _overlap_for(self, sp: SegmentPlan) -> _Overlap | None:
        """The IO thread, if this segment's plan runs its IO beside its tiles."""
        if not (sp.io_bytes or sp.io_forward_bytes) or self.device.type == "meta":
            return None
        if self.overlap is None:
            self.overlap = _Overlap()
        return self.overlap

    def _in_background(self, node: Any) -> bool:
        """Whether reads of ``node`` go to the IO thread: a scratch file, or the lazy input."""
        if node is self.graph.input:
            return not self.reader.is_tensor
        return isinstance(self.stores.get(node), DiskStore)

    def _read_ahead(
        self, io: _Overlap | None, sp: SegmentPlan, window: tuple[slice, ...] | None, k: int
    ) -> concurrent.futures.Future | None:
        """The sources of the next tile read by the IO thread: a future of {source index: box}."""
        if io is None or window is None:
            return None
        todo = [(j, s) for j, s in enumerate(sp.segment.sources) if self._in_background(s)]
        if not todo:
            return None
        return io.submit(lambda: {j: self.read(s, window, k) for j, s in todo})

    def _write_behind(
        self,
        io: _Overlap | None,
        store: Any,
        box: tuple[slice, ...],
        value: torch.Tensor,
        add: bool,
        one_behind: bool = False,
    ) -> None:
        """A write (or an add) into a store; into a scratch file by the IO thread when there is one, with the
        value made contiguous here, so the tile's whole output does not stay alive for a view of its core.
        ``one_behind`` (the forward's output core): the previous tile's write is waited for first, so at most one
        core is behind, as the plan counts (``io_forward_bytes``)."""
        if io is None or not isinstance(store, DiskStore):
            (store.add if add else store.write)(box, value)
            return
        if one_behind and io.last_write is not None:
            io.last_write.result()
        future = io.submit(store.add if add else store.write, box, value.contiguous())
        if one_behind:
            io.last_write = future

    def _sources(
        self,
        sp: SegmentPlan,
        window: tuple[slice, ...],
        k: int,
        grad: list[bool],
        ahead: concurrent.futures.Future | None = None,
    ) -> list[torch.Tensor]:
        """The tile's inputs: each source's box of ``window`` (those in ``ahead`` read by the IO thread), then the
        global statistics it reads whole; ``grad`` has one flag per entry."""
        out = []
        seg = sp.segment
        got = ahead.result() if ahead is not None else {}
        for j, s in enumerate(seg.sources):
            t = (got.pop(j) if j in got else self.read(s, window, k)).detach()
            if grad[j]:
                t.requires_grad_(True)
            out.append(t)
        for j, s in enumerate(seg.globals, start=len(seg.sources)):
            out.append(_leaf(self.values[s], grad[j]))
        return out

    def _order(self, k: int, training: bool) -> list[int]:
        """NOTE [ Tile order ]: the grid indices of segment ``k``'s tiles in the order its forward runs them (its
        backward runs them in reverse)."""
        order = list(range(len(self.plan.segments[k].grid)))
        flip = reversed_tiles(len(self.plan.segments), self.head is not None)[k][0]
        return order[::-1] if training and flip else order

    def _backward_places(self, k: int) -> Iterable[int]:
        """NOTE [ Tile order ]: the places in segment ``k``'s forward order (``_order``) of the tiles its backward
        runs, in the order it runs them: the reverse of its forward, unless both run the same way (the first
        segment's backward stays in raster order)."""
        count = len(self.plan.segments[k].grid)
        forward, backward = reversed_tiles(len(self.plan.segments), self.head is not None)[k]
        return range(count) if forward == backward else reversed(range(count))

    def _runner(self, sp: SegmentPlan) -> nn.Module:
        key = id(sp.segment)
        if key not in self.runners:
            self.runners[key] = segment_runner(sp)
        return self.runners[key]

    @staticmethod
    def _args(sp: SegmentPlan, srcs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The segment's arguments: a source its first layer modifies in place (ReLU(inplace=True)) is copied,
        under the caller's grad mode, so the leaf whose gradient is taken stays untouched."""
        inplace = sp.segment.inplace_sources
        return [t.clone() if j in inplace else t for j, t in enumerate(srcs)]

    # -- NOTE [ Last convolution not recomputed ] ----------------------------------------------------------------
    def _tail(self, sp: SegmentPlan) -> tuple[nn.Module, nn.Module] | None:
        """(module computing the input of the segment's last convolution from its sources, that convolution), or
        None when the segment does not end in one it can skip."""
        key = id(sp.segment)
        if key in self.tails:
            return self.tails[key]
        self.tails[key] = None
        chain = sp.chain
        # the planner's test (graph.py), so that what it predicts (NOTE [ Tile memory ] in plan.py) is what runs
        if not isinstance(chain, torch.fx.GraphModule) or last_convolution(sp.segment) is None:
            return None
        (out_node,) = [n for n in chain.graph.nodes if n.op == "output"]
        conv_node = out_node.args[0]
        if (
            not isinstance(conv_node, torch.fx.Node)
            or conv_node.op != "call_module"
            or len(conv_node.args) != 1
        ):
            return None
        conv = chain.get_submodule(conv_node.target)
        if not isinstance(conv, nn.modules.conv._ConvNd):
            return None
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        graph.graph_copy(chain.graph, env)
        graph.output(env[conv_node.args[0]])
        prefix = torch.fx.GraphModule(chain, graph)
        prefix.graph.eliminate_dead_code()
        prefix.recompile()
        self.tails[key] = (_onednn_convs(prefix), conv)
        return self.tails[key]

    @staticmethod
    def _conv_out_shape(conv: Any, x: torch.Tensor) -> tuple[int, ...]:
        size = []
        for d, n in enumerate(x.shape[2:]):
            k, s, p, dil = conv.kernel_size[d], conv.stride[d], conv.padding[d], conv.dilation[d]
            if conv.transposed:
                size.append((n - 1) * s - 2 * p + dil * (k - 1) + conv.output_padding[d] + 1)
            else:
                size.append((n + 2 * p - dil * (k - 1) - 1) // s + 1)
        return (x.shape[0], conv.out_channels, *size)

    def _tail_backward(
        self, sp: SegmentPlan, tile: Any, srcs: list[torch.Tensor], inputs: list[torch.Tensor], wanted: dict
    ) -> tuple[list[Any], list[tuple[nn.Parameter, torch.Tensor]]]:
        """One tile's backward with the last convolution not recomputed: (gradients of ``inputs``, the
        convolution's parameter gradients)."""
        prefix, conv = self._tail(sp)  # type: ignore[misc]
        seg = sp.segment
        with torch.enable_grad():
            z = prefix(*self._args(sp, srcs))
        nd = z.dim() - 2
        value = None
        if seg.out in self.pending and seg.out in self.stores:
            value = self.stores[seg.out].read(tile.outputs)
        elif seg.out in self.pending:  # NOTE [ Recomputed statistic inputs ]: not stored, the conv again
            with torch.no_grad():  # as the forward computed it (NOTE [ Small-tile convolutions on oneDNN ])
                value = _conv_module(z.detach(), conv)[(slice(None), slice(None), *tile.crop)]
        g_core = self._out_grad(seg.out, tile.outputs, value, z.dtype)
        # one buffer for the segment's tiles, as large as the largest tile's map so far, zeroed again on reuse: a
        # fresh map per tile paid its pages' first touch every time (NOTE [ Heap growth under a budget ] in
        # _allocator.py), and one map per tile shape kept up to 2^ndim of them alive at once (interior and last
        # tiles of each axis), more than the plan counts
        shape = self._conv_out_shape(conv, z)
        numel = math.prod(shape)
        buf = self.g_out_buf
        if buf is None or buf.numel() < numel or buf.dtype != z.dtype or buf.device != z.device:
            buf = self.g_out_buf = None  # the smaller one goes before the larger one comes
            buf = self.g_out_buf = torch.empty(numel, dtype=z.dtype, device=z.device)
        g_out = buf[:numel].view(shape).zero_()
        g_out[(slice(None), slice(None), *tile.crop)] = g_core
        bias = conv.bias
        gz, gw, gb = torch.ops.aten.convolution_backward(
            g_out, z.detach(), conv.weight, [conv.out_channels] if bias is not None else None,
            list(conv.stride), list(conv.padding), list(conv.dilation), conv.transposed,
            list(conv.output_padding) if conv.transposed else [0] * nd, conv.groups,
            [z.requires_grad, id(conv.weight) in wanted, bias is not None and id(bias) in wanted],
        )  # fmt: skip
        del g_out
        conv_grads = [(p, g) for p, g in ((conv.weight, gw), (bias, gb)) if p is not None and g is not None]
        if not z.requires_grad:
            return [None] * len(inputs), conv_grads
        return list(torch.autograd.grad([z], inputs, [gz], allow_unused=True)), conv_grads

    # -- statistics (NOTE [ Streamed statistics ] in statistics.py) --------------------------------------------------
    def _slab_source(self, node: Any) -> Any:
        return self.reader if node is self.graph.input else self.stores[node]

    def _accumulate(self, node: Any, core: torch.Tensor) -> None:
        """The partial results of the reductions reading ``node`` over one core of it."""
        for r in self.reads.get(node, ()):
            self.red_parts.setdefault(r, []).extend(reduction_partials(r, core))

    def forward_reduction(self, r: Any, training: bool) -> None:
        x = r.args[0]
        shape = self.graph.shape(x)
        if x is self.graph.input:  # the image itself: slab by slab from the reader
            parts = [
                p
                for box in slabs(shape, torch.empty((), dtype=self.dtype).element_size(), 4 * 2**20)
                for p in reduction_partials(r, self.reader.read(box))
            ]
        else:  # accumulated from the cores of the segment that computed x
            parts = self.red_parts.pop(r)
        stats = reduction_combine(r, parts, self.dtype, len(shape) - 2)
        # by node, not by module: a module called twice (shared) is updated once per call, as conventional
        path = r.meta.get("tilegrad_module")
        if path is not None and r not in self.native:
            module = self.graph.gm.get_submodule(path)
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
                update_running_stats(module, stats.detach(), shape[0] * math.prod(shape[2:]))
        self.values[r] = stats.detach()

    def forward_global(self, node: Any, training: bool) -> None:
        module, inputs = self.graph.global_module(node)
        args = [_leaf(self.values[i], training) for i in inputs]
        if training:
            with torch.enable_grad():
                out = module(*args)
            self.kept_glob[node] = (args, out)
        else:
            out = module(*args)
        self.values[node] = out.detach() if isinstance(out, torch.Tensor) else out

    def _global_grad(self, node: Any, g: torch.Tensor) -> None:
        self.gglob[node] = g if node not in self.gglob else self.gglob[node] + g

    def backward_global(self, node: Any, wanted: dict[int, Any], add_param_grads: Any) -> None:
        if node not in self.gglob or node not in self.kept_glob:
            return
        args, out = self.kept_glob[node]
        module, inputs = self.graph.global_module(node)
        params = [p for p in module.parameters() if id(p) in wanted]
        leaves = [(i, a) for i, a in zip(inputs, args) if isinstance(a, torch.Tensor) and a.requires_grad]
        gs = torch.autograd.grad(
            out, [a for _, a in leaves] + params, self.gglob.pop(node), allow_unused=True, retain_graph=True
        )
        for (i, _), gi in zip(leaves, gs):
            if gi is not None:
                self._global_grad(i, gi)
        add_param_grads(params, gs[len(leaves) :])

    def backward_reduction(self, r: Any, input_grad: bool, grad_in: torch.Tensor | None) -> None:
        if r not in self.gglob:
            return
        gstats = self.gglob.pop(r)
        x = r.args[0]
        g = self.graph
        if x is not g.input:  # added while x's segment runs its backward (_out_grad)
            self.pending.setdefault(x, []).append((r, gstats))
            return
        if not input_grad and self.sink is None:
            return
        shape = g.shape(x)
        for box in slabs(shape, torch.empty((), dtype=self.dtype).element_size(), 4 * 2**20):
            if self.sink is not None:
                self.sink.add(box, reduction_grad(r, self.reader.read(box), self.values[r], gstats, shape))
            elif grad_in is not None:
                out = grad_in[(slice(None), slice(None), *box)]
                reduction_grad(r, self.reader.read(box), self.values[r], gstats, shape, out=out)

    def _out_grad(
        self, node: Any, box: tuple[slice, ...], value: torch.Tensor | None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The gradient of a segment's output ``node`` at ``box`` (in ``dtype``, else the value's), whose value
        there is ``value`` (needed only when a reduction reads the node): from its gradient store, plus what the
        reductions that read it send (NOTE [ Streamed statistics ])."""
        dtype = dtype or (value.dtype if value is not None else self.dtype)
        grad = self.grads[node].read(box).to(dtype) if node in self.grads else None
        pending = self.pending.get(node, ())
        if pending and isinstance(self.grads.get(node), _Whole):
            grad = grad.clone()  # a view of the caller's gradient: the terms below are added in place
        for r, gstats in pending:
            assert value is not None
            shape = self.graph.shape(node)
            if grad is None:
                grad = reduction_grad(r, value.to(self.dtype), self.values[r], gstats, shape).to(dtype)
            else:
                reduction_grad(r, value.to(self.dtype), self.values[r], gstats, shape, out=grad)
        if grad is None:
            sizes = tuple(b.stop - b.start for b in box)
            grad = torch.zeros(self.graph.shape(node)[:2] + sizes, dtype=dtype, device=self.device)
        return grad

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, training: bool) -> torch.Tensor:
        segs = self.plan.segments
        last = len(segs) - 1
        out: torch.Tensor | None = None
        bar = _bar(self.progress, sum(len(sp.grid) for sp in segs), "forward")
        try:
            for kind, what in self.items:
                if kind == "reduction":
                    self.forward_reduction(what, training)
                    continue
                if kind == "global":
                    self.forward_global(what, training)
                    continue
                k = what
                sp = segs[k]
                seg = sp.segment
                nin = len(seg.sources) + len(seg.globals)
                b = self.tiers.get(seg.out.name)
                if k < last and b.tier != "recompute":  # NOTE [ Recomputed statistic inputs ]: no store
                    self.stores[seg.out] = self._store(seg.out, b.tier, zero=False)
                whole = tuple(slice(0, n) for n in self.graph.input_shape[2:])
                grid = list(sp.grid)
                tiles = [None] if (sp.keep and training) else [grid[i] for i in self._order(k, training)]
                io = self._overlap_for(sp)  # NOTE [ IO overlap ]
                ahead = None
                for i, tile in enumerate(tiles):
                    window = whole if tile is None else tile.inputs
                    if tile is None:  # NOTE [ Kept segments ]
                        srcs = self._sources(sp, window, k, [True] * nin)
                        with torch.enable_grad():
                            y = self._runner(sp)(*self._args(sp, srcs))
                            if k == last and self.head is not None:  # the head's partial joins the kept graph
                                kept_out: Any = tuple(self.head.partial(y))
                            else:
                                kept_out = (y,)
                        self.kept[k] = (srcs, kept_out)
                        core, outputs = y.detach(), tuple(slice(0, n) for n in y.shape[2:])
                        if k == last and self.head is not None:
                            self.partials.append(tuple(p.detach() for p in kept_out))
                            del srcs, y, core
                            continue
                    else:
                        srcs = self._sources(sp, window, k, [False] * nin, ahead)
                        nxt = tiles[i + 1] if i + 1 < len(tiles) else None
                        ahead = self._read_ahead(io, sp, None if nxt is None else nxt.inputs, k)
                        y = self._runner(sp)(*self._args(sp, srcs))
                        if k == last and self.writer is not None:  # inference into a sink (infer.py)
                            self.writer(tile, y)
                            del srcs, y
                            if bar is not None:
                                bar.update(1)
                            continue
                        core = y[(slice(None), slice(None), *tile.crop)]
                        outputs = tile.outputs
                    if k < last:
                        self._accumulate(seg.out, core.to(self.dtype))
                        if seg.out in self.stores:
                            self._write_behind(
                                io,
                                self.stores[seg.out],
                                outputs,
                                core.to(self.dtype),
                                add=False,
                                one_behind=True,
                            )
                    elif self.head is not None:
                        self.partials.append(tuple(p.detach() for p in self.head.partial(core)))
                    else:
                        if out is None:
                            out = torch.empty(self.graph.shape(seg.out), dtype=core.dtype, device=core.device)
                        out[(slice(None), slice(None), *outputs)] = core
                    del srcs, y, core
                    if not training:  # no segment-wide reuse to keep (NOTE [ Heap growth under a budget ])
                        trim_heap(self.device)
                    if bar is not None:
                        bar.update(1 if tile is not None else len(sp.grid))
                if io is not None:  # what it wrote is read by the next segments
                    io.drain()
                trim_heap(self.device)  # NOTE [ Heap growth under a budget ] in _allocator.py
                if not training:  # free what no later segment reads
                    for s in seg.sources:
                        if s in self.stores and max(self.consumers[s]) <= k:
                            self.stores.pop(s).close()
        except BaseException:
            if self.overlap is not None:  # NOTE [ IO overlap ]: nothing more runs beside a failed step
                self.overlap.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
        if self.writer is not None:
            return None  # type: ignore[return-value]
        if self.head is not None:
            leaves = [
                tuple(p.detach().requires_grad_(p.is_floating_point()) for p in ps) for ps in self.partials
            ]
            with torch.enable_grad():
                result = self.head.combine(leaves)
            self.head_graph = ([p for ps in leaves for p in ps if p.requires_grad], result)
            return result.detach()
        assert out is not None
        return out

    # -- backward -------------------------------------------------------------------------------------------
    def backward(
        self, grad_out: torch.Tensor, params: list[nn.Parameter], input_grad: bool
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        segs = self.plan.segments
        last = len(segs) - 1
        g = self.graph
        wanted = {id(p): p for p in params}
        pgrads: dict[int, torch.Tensor] = {}
        owned: set[int] = set()  # sums this step allocated, added into in place

        def add_param_grads(ps: list[nn.Parameter], gs: Any) -> None:
            # summed over tiles in place: one new tensor per parameter and step, not one per tile (RegNet-Y spent
            # ~1.4 s of a step allocating sums); autograd's own result is never written into (it may alias)
            for p, gp in zip(ps, gs):
                if gp is None:
                    continue
                key = id(p)
                if key not in pgrads:
                    pgrads[key] = gp
                elif key in owned:
                    pgrads[key].add_(gp)
                else:
                    pgrads[key] = pgrads[key] + gp
                    owned.add(key)

        grad_partials: list[tuple[torch.Tensor | None, ...]] = []
        if self.head is not None:
            assert self.head_graph is not None
            leaves, result = self.head_graph
            head_params = [p for p in self.head.parameters() if id(p) in wanted]
            gs = torch.autograd.grad(
                result, [*leaves, *head_params], grad_out, allow_unused=True, retain_graph=True
            )
            add_param_grads(head_params, gs[len(leaves) :])
            it = iter(gs[: len(leaves)])
            for ps in self.partials:
                grad_partials.append(tuple(next(it) if p.is_floating_point() else None for p in ps))
        else:
            self.grads[segs[-1].segment.out] = _Whole(grad_out)
        grad_in = None
        if input_grad and self.sink is None:
            grad_in = torch.zeros(g.input_shape, dtype=self.dtype, device=self.device)
        bar = _bar(self.progress, sum(len(sp.grid) for sp in segs if not sp.keep), "backward")
        try:
            for kind, what in reversed(self.items):
                if kind == "reduction":
                    self.backward_reduction(what, input_grad, grad_in)
                    continue
                if kind == "global":
                    self.backward_global(what, wanted, add_param_grads)
                    continue
                k = what
                sp = segs[k]
                seg = sp.segment
                module = sp.chain
                seg_params = [p for p in module.parameters() if id(p) in wanted]
                if k == last and self.head is not None:  # the head's per-position layers act inside partial()
                    seg_params += [p for p in self.head.parameters() if id(p) in wanted]
                need = [(s is not g.input) or input_grad or self.sink is not None for s in seg.sources]
                need += [_differentiable(self.values[s]) for s in seg.globals]
                for j, s in enumerate(seg.sources):
                    if need[j] and s is not g.input and s not in self.grads:
                        b = self.tiers[s.name]
                        self.grads[s] = self._store(s, b.grad_tier, zero=True)
                if k in self.kept:  # NOTE [ Kept segments ]: its graph is dropped after this backward
                    srcs, kept_out = self.kept.pop(k)
                    if k == last and self.head is not None:
                        pairs = [
                            (p, gp)
                            for p, gp in zip(kept_out, grad_partials[0])
                            if gp is not None and p.requires_grad
                        ]
                        outs, grads = [p for p, _ in pairs], [gp for _, gp in pairs]
                    else:
                        (y,) = kept_out
                        outs = [y]
                        grads = [self._out_grad(seg.out, tuple(slice(0, n) for n in y.shape[2:]), y.detach())]
                    inputs = [t for t, n in zip(srcs, need) if n] + seg_params
                    gs = torch.autograd.grad(outs, inputs, grads, allow_unused=True, retain_graph=True)
                    whole = tuple(slice(0, n) for n in g.input_shape[2:])
                    self._add_source_grads(seg, need, whole, gs, grad_in)
                    add_param_grads(seg_params, gs[sum(need) :])
                    # every local that reaches the graph goes (y, pairs: the outputs; inputs: the sources), or the
                    # graph outlives its backward and stays alive through the earlier segments' (NOTE [ Kept segments ])
                    del srcs, kept_out, outs, grads, gs, inputs
                    y = pairs = None
                else:
                    tail = (
                        not (k == last and self.head is not None)
                        and not self.autocast[0]
                        and self._tail(sp) is not None
                    )
                    # a whole piece recomputed (a second backward: NOTE [ Kept segments ]) must not update its
                    # layers' running statistics again
                    buffers = [(b, b.clone()) for b in module.buffers()] if seg.whole else []
                    grid = list(sp.grid)
                    order = self._order(k, True)
                    io = self._overlap_for(sp)  # NOTE [ IO overlap ]
                    places = list(self._backward_places(k))
                    ahead = None
                    # t: the tile's place in the forward (the index of its head partial)
                    for i, t in enumerate(places):
                        tile = grid[order[t]]
                        srcs = self._sources(sp, tile.inputs, k, need, ahead)
                        nxt = grid[order[places[i + 1]]].inputs if i + 1 < len(places) else None
                        ahead = self._read_ahead(io, sp, nxt, k)
                        inputs = [s for s, n in zip(srcs, need) if n] + seg_params
                        if inputs and tail:  # NOTE [ Last convolution not recomputed ]
                            gs, conv_grads = self._tail_backward(sp, tile, srcs, inputs, wanted)
                            self._add_source_grads(seg, need, tile.inputs, gs, grad_in, io)
                            add_param_grads(seg_params, gs[sum(need) :])
                            add_param_grads([p for p, _ in conv_grads], [g for _, g in conv_grads])
                            del gs, conv_grads
                        elif inputs:
                            with torch.enable_grad(), replay_autocast(self.device.type, self.autocast):
                                y = self._runner(sp)(*self._args(sp, srcs))
                                core = y[(slice(None), slice(None), *tile.crop)]
                                if k == last and self.head is not None:
                                    parts = self.head.partial(core)
                                    pairs = [
                                        (p, gp)
                                        for p, gp in zip(parts, grad_partials[t])
                                        if gp is not None and p.requires_grad
                                    ]
                                    outs, grads = [p for p, _ in pairs], [gp for _, gp in pairs]
                                else:
                                    outs = [core]
                                    grads = [self._out_grad(seg.out, tile.outputs, core.detach())]
                            gs = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
                            self._add_source_grads(seg, need, tile.inputs, gs, grad_in, io)
                            add_param_grads(seg_params, gs[sum(need) :])
                            del y, core, outs, grads, gs
                            parts = pairs = None  # the last tile's graph must not outlive its backward
                        del srcs, inputs
                        if bar is not None:
                            bar.update(1)
                    if io is not None:  # the gradients it added are read by the earlier segments
                        io.drain()
                    for b, saved in buffers:
                        b.copy_(saved)
                    del buffers
                trim_heap(self.device)
                # what this segment's backward completes
                self.pending.pop(seg.out, None)
                self.g_out_buf = None
                done = self.grads.pop(seg.out, None)
                if done is not None:
                    done.close()
        except BaseException:
            if self.overlap is not None:  # NOTE [ IO overlap ]: nothing more runs beside a failed step
                self.overlap.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
        return grad_in, [pgrads.get(id(p)) for p in params]

    def _add_source_grads(
        self,
        seg: Any,
        need: list[bool],
        window: tuple[slice, ...],
        gs: Any,
        grad_in: torch.Tensor | None,
        io: _Overlap | None = None,
    ) -> None:
        g = self.graph
        i = 0
        for s, n in zip([*seg.sources, *seg.globals], need):
            if not n:
                continue
            gsrc = gs[i]
            i += 1
            if gsrc is None:
                continue
            if s in g.global_set:
                self._global_grad(s, gsrc)
                continue
            box = g.source_box(s, window)
            if s is g.input:
                if self.sink is not None:
                    self.sink.add(box, gsrc)
                elif grad_in is not None:
                    grad_in[(slice(None), slice(None), *box)] += gsrc
            else:
                self._write_behind(io, self.grads[s], box, gsrc.to(self.dtype), add=True)


def _differentiable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _leaf(value: Any, grad: bool) -> Any:
    """A global value as a segment's or a global node's input: a detached tensor (a leaf whose gradient is taken,
    if ``grad`` and it is floating point), or a plain value (a size read from a statistic's shape) as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach()
    return value.requires_grad_(True) if grad and _differentiable(value) else value


class _Whole:
    """The gradient of the trunk's output, a whole tensor, as a read-only store."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def read(self, box: tuple[slice, ...]) -> torch.Tensor:
        return self.t[(slice(None), slice(None), *box)]

    def close(self) -> None:
        self.t = None  # type: ignore[assignment]


class _StreamFunction(torch.autograd.Function):
    """The whole plan as one autograd node (NOTE [ Streamed execution ]); parameters are its inputs, so autograd
    routes their gradients (and sums them with other uses) as usual."""

    @staticmethod
    def forward(ctx: Any, ex: Execution, x: torch.Tensor | None, anchor: Any, *params: Any) -> torch.Tensor:
        ctx.ex = ex
        ctx.params = params
        ctx.has_x = x is not None
        # NOTE [ Boundary lifetime ]: the stores, kept graphs and head partials live as long as this marker, which
        # autograd frees with the graph: after a backward without retain_graph, or when the output is dropped
        # unused. A second backward (retain_graph=True) finds them again.
        marker = torch.empty(0)
        weakref.finalize(marker, ex.close)
        ctx.save_for_backward(x if x is not None else torch.empty(0), marker)
        return ex.forward(training=True)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        ex: Execution = ctx.ex
        x, _marker = ctx.saved_tensors
        if ctx.has_x:
            ex.reader = Reader(x.detach(), ex.device, ex.dtype)
        wanted = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:]) if need]
        grad_in, pgrads = ex.backward(grad_out, wanted, input_grad=ctx.needs_input_grad[1])
        it = iter(pgrads)
        out = [next(it) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, grad_in, None, *out)


def run_plan(
    plan: Plan,
    module: nn.Module,
    x: Any,
    *,
    training: bool,
    head: nn.Module | None = None,
    sink: Any = None,
    scratch_dir: Any = None,
    progress: bool | None = None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Run ``plan`` on ``x`` (a tensor or a lazy array); with ``training`` the result is on the autograd graph."""
    lazy = not isinstance(x, torch.Tensor)
    reader = Reader(x, device, dtype)
    ex = Execution(plan, reader, head=head, sink=sink, scratch_dir=scratch_dir, progress=progress)
    if not training:
        try:
            with torch.no_grad():
                return ex.forward(training=False)
        finally:
            ex.close()
    params = [p for p in module.parameters() if p.requires_grad]
    if head is not None:
        params += [p for p in head.parameters() if p.requires_grad]
    anchor = torch.zeros((), requires_grad=True) if sink is not None else None
    try:
        return _StreamFunction.apply(ex, None if lazy else x, anchor, *params)
    except BaseException:
        ex.close()
        raise
