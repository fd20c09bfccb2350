"""Streamed statistics: normalisation with per-image (or per-batch) statistics and squeeze-excitation, exactly.

NOTE [ Streamed statistics ]
A layer whose output at a position depends on a statistic over all positions (InstanceNorm, GroupNorm, BatchNorm
in training mode, the global average pool of a squeeze-excitation block) is not local, but it is local *given the
statistic*. The trunk's traced graph is rewritten (``rewrite_statistics``, before the geometry rules run) so that
each such layer becomes two nodes (the layer as a module, or as the call ``F.group_norm`` / ``F.instance_norm`` /
``F.batch_norm`` with batch statistics and none kept, which a subclass's forward traced through makes: NOTE
[ Subclasses that change what a layer computes ] in geometry/toolkit.py):

* a *reduction* ``moments(x)`` or ``spatial_mean(x)``: a small tensor (per sample and group: mean and variance;
  per sample and channel: the mean). The planner makes its input ``x`` a boundary (graph.py ``forced``), so ``x``
  is the output of one segment, whose tiles' cores are disjoint and cover it (NOTE [ Disjoint cores ] in
  tiling.py). The engine (execute.py) therefore accumulates the statistic *while that segment writes its cores*:
  each core gives a partial result (count, mean, M2 in float64: Chan et al.'s pairwise update, no cancellation),
  merged into the statistic when the reduction's turn comes. No pass over the stored map, no recomputation. Only a
  reduction of the image itself reads its input again, slab by slab from the reader;
* an *apply* ``apply_norm(x, stats, weight, bias)``: element-wise given the statistic (``x * scale + shift`` with
  per-channel ``scale`` and ``shift``, as PyTorch's own CPU batch norm computes it), so it streams inside the
  segment that reads ``x`` like any other local op; the statistic enters that segment as a *global* source, read
  whole on every tile.

Nodes computed only from statistics (the excitation MLP of an SE block: 1x1 convolutions on a 1x1 map, a sigmoid)
are *global* nodes, evaluated once per step. The backward follows the same path in reverse: each tile's backward
gives the gradient of the global sources it read (summed over tiles), the global nodes push it back to the
statistic, and the reduction's share of the gradient of ``x`` is element-wise given the statistic and its gradient
(``reduction_grad``: for mean and biased variance over ``m`` positions, ``g_mean / m + 2 g_var (x - mean) / m``,
exactly the chain rule through mean and variance). The engine adds it to the gradient of ``x`` while the
producing segment runs its own backward, from the core it recomputes anyway (for the image: slab by slab from the
reader). BatchNorm in training mode updates its running statistics once per forward, from the whole batch's
statistics, as the conventional step does (unbiased variance, momentum or cumulative average).

NOTE [ Recomputed statistic inputs ]
A statistic's input ``x`` need not be stored. Where the planner's cost model finds it cheaper (plan.py
``recomputed``: typically a convolution of a map already stored or of the image, whose output is larger than its
input), ``x`` still ends a segment, which the engine runs tile by tile in the forward only to accumulate the
statistic from its cores, but no store holds it (its boundary's tier is ``"recompute"``) and no other segment reads
it: the segments that read ``x`` compute it again per tile from that segment's sources (graph.py ``segments(...,
recompute=)``: ``x`` is no stop of their cones). The backward is exact by linearity: the gradient of ``x`` is the
sum of what its readers send it directly (through ``apply_norm``'s ``x``) and what the statistic sends
(``reduction_grad``). Each reader pushes its direct share on through the recomputed nodes inside its own tiles'
backward (to their parameters and to the sources), so no gradient store of ``x`` is needed; the segment computing
``x`` then runs its backward with the statistic's share alone, ``x``'s value recomputed per tile (for a segment
ending in a convolution: that convolution once more, NOTE [ Last convolution not recomputed ] in execute.py). The
statistic's gradient is complete by then, because every reader of it comes after ``x`` in the graph. Costs the
readers' recomputation (more FLOPs, larger tiles); saves the store, its IO and its gradient's.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import NotStreamableError
from .geometry import merge, register_geometry_rule

__all__ = [
    "apply_norm",
    "is_reduction",
    "moments",
    "reduction_grad",
    "reduction_partials",
    "rewrite_statistics",
    "spatial_mean",
]

Partial = tuple[torch.Tensor, ...]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) else dtype


def _grouped(x: torch.Tensor, mode: str, groups: int) -> torch.Tensor:
    """x (N, C, *spatial) as (rows, values): one row per statistic."""
    n, c = x.shape[:2]
    if mode == "batch":
        return x.transpose(0, 1).reshape(c, -1)
    if mode == "instance":
        return x.reshape(n * c, -1)
    return x.reshape(n * groups, -1)  # group


# -- the reductions: whole-tensor reference, partial, combine ------------------------------------------------------
def moments(x: torch.Tensor, mode: str, groups: int = 1) -> torch.Tensor:
    """(2, rows): biased variance and mean of ``x`` per statistic row (the whole-map reference)."""
    return moments_combine([moments_partial(x, mode, groups)], x.dtype)


def moments_partial(x: torch.Tensor, mode: str, groups: int = 1) -> Partial:
    """(count, mean, M2) per row, in float64 for float32 data, without a float64 copy of ``x``: the mean is a sum
    accumulated in float64 (``sum(dtype=)``), M2 the biased variance times the count (PyTorch's CPU variance is a
    Welford pass with double accumulators; only its result is rounded, to one ulp of the variance). Temporaries
    the size of ``x`` are what made statistics slow: each is fresh memory whose pages fault on first touch
    (NOTE [ Heap growth under a budget ] in _allocator.py)."""
    acc = _acc(x.dtype)
    rows = _grouped(x, mode, groups)
    count = torch.tensor(float(rows.shape[1]), dtype=acc, device=rows.device)
    if rows.dtype == acc:
        var, mean = torch.var_mean(rows, dim=1, correction=0)
    else:
        mean = rows.sum(1, dtype=acc) / count
        # var's result has the data's dtype: bfloat16 / float16 would round it to 3 significant digits, so those
        # get a float32 copy (float32 data: one ulp; on CUDA the Welford pass accumulates in float32, stable)
        wide = rows if rows.element_size() >= 4 else rows.float()
        var = torch.var(wide, dim=1, correction=0).to(acc)
    return count, mean, var * count


def moments_combine(partials: Sequence[Partial], dtype: torch.dtype) -> torch.Tensor:
    counts = torch.stack([p[0] for p in partials])  # (T,)
    means = torch.stack([p[1] for p in partials])  # (T, rows)
    m2s = torch.stack([p[2] for p in partials])
    total = counts.sum()
    mean = (counts[:, None] * means).sum(0) / total
    m2 = m2s.sum(0) + (counts[:, None] * (means - mean).square()).sum(0)
    return torch.stack([mean, m2 / total]).to(dtype)


def spatial_mean(x: torch.Tensor, keepdim: bool = True) -> torch.Tensor:
    """The mean over all spatial positions: (N, C, 1, ..) or (N, C)."""
    return spatial_mean_combine([spatial_mean_partial(x)], x.dtype, x.dim() - 2, keepdim)


def spatial_mean_partial(x: torch.Tensor) -> Partial:
    flat = x.to(_acc(x.dtype)).flatten(2)
    return flat.sum(-1), torch.tensor(float(flat.shape[-1]), dtype=flat.dtype, device=flat.device)


def spatial_mean_combine(
    partials: Sequence[Partial], dtype: torch.dtype, ndim: int, keepdim: bool
) -> torch.Tensor:
    total = sum(p[1] for p in partials)
    mean = (sum(p[0] for p in partials) / total).to(dtype)
    return mean.reshape(*mean.shape, *(1,) * ndim) if keepdim else mean


_REDUCTIONS = {
    moments: (moments_partial, moments_combine),
    spatial_mean: (spatial_mean_partial, spatial_mean_combine),
}


def is_reduction(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in _REDUCTIONS


def reduction_partial(node: torch.fx.Node, x: torch.Tensor) -> Partial:
    if node.target is moments:
        return moments_partial(x, node.kwargs["mode"], node.kwargs.get("groups", 1))
    return spatial_mean_partial(x)


def reduction_partials(node: torch.fx.Node, x: torch.Tensor, limit: int = 4 * 2**20) -> list[Partial]:
    """The partial results of a reduction over ``x`` (a core or a slab of its input), slab by slab of at most
    about ``limit`` bytes, so the float64 temporaries stay small next to a tile's working set."""
    return [
        tuple(p.detach() for p in reduction_partial(node, x[(slice(None), slice(None), *box)]))
        for box in slabs(x.shape, x.element_size(), limit)
    ]


def reduction_combine(
    node: torch.fx.Node, partials: Sequence[Partial], dtype: torch.dtype, ndim: int
) -> torch.Tensor:
    if node.target is moments:
        return moments_combine(partials, dtype)
    return spatial_mean_combine(partials, dtype, ndim, node.kwargs.get("keepdim", True))


def _per_channel(t: torch.Tensor, mode: str, groups: int, n: int, c: int, ndim: int) -> torch.Tensor:
    """A per-row statistic (rows as in ``_grouped``) as a tensor that broadcasts against (N, C, *spatial)."""
    ones = (1,) * ndim
    if mode == "batch":
        return t.reshape(1, c, *ones)
    if mode == "instance":
        return t.reshape(n, c, *ones)
    return t.reshape(n, groups, 1).expand(n, groups, c // groups).reshape(n, c, *ones)


def reduction_grad(
    node: torch.fx.Node,
    x: torch.Tensor,
    stats: torch.Tensor,
    grad: torch.Tensor,
    shape: Sequence[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The gradient a reduction sends into a box ``x`` of its input (whole shape ``shape``), given its statistic
    ``stats`` over the whole input and the statistic's gradient ``grad`` (NOTE [ Streamed statistics ]). With
    ``out`` (a tensor of ``x``'s shape that the caller owns), the gradient is added into it in place and ``out``
    returned: no temporary of the box's size."""
    n, c = shape[:2]
    ndim = len(shape) - 2
    positions = math.prod(shape[2:])
    acc = _acc(x.dtype)
    if node.target is moments:
        mode, groups = node.kwargs["mode"], node.kwargs.get("groups", 1)
        count = {"batch": n * positions, "instance": positions}.get(mode, (c // groups) * positions)
        g = grad.to(acc)
        a = _per_channel(g[0] / count, mode, groups, n, c, ndim)
        b = _per_channel(2 * g[1] / count, mode, groups, n, c, ndim)
        mean = _per_channel(stats[0].to(acc), mode, groups, n, c, ndim)
        # a + b (x - mean) = b x + (a - b mean): per-channel constants in float64, one pass over x
        dtype = x.dtype if out is None else out.dtype
        shift, b = (a - b * mean).to(dtype), b.to(dtype)
        if out is None:
            return torch.addcmul(shift, x, b)
        return out.addcmul_(x, b).add_(shift)
    g = (grad.to(acc) / positions).to(x.dtype).reshape(grad.shape[0], grad.shape[1], *(1,) * ndim)
    if out is not None:
        return out.add_(g.to(out.dtype))
    return g.expand_as(x).clone()


# -- the apply step ----------------------------------------------------------------------------------------------
def apply_norm(
    x: torch.Tensor,
    stats: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    mode: str,
    groups: int = 1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Normalise ``x`` with given statistics (element-wise: it streams) and apply the affine parameters."""
    n, c = x.shape[:2]
    ndim = x.dim() - 2
    # y = x * scale + shift with per-channel scale and shift: one full-size operation forward and backward (PyTorch's
    # CPU batch norm computes it the same way)
    invstd = _per_channel(torch.rsqrt(stats[1] + eps), mode, groups, n, c, ndim)
    mean = _per_channel(stats[0], mode, groups, n, c, ndim)
    ones = (1,) * ndim
    scale = invstd if weight is None else invstd * weight.reshape(1, c, *ones)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.reshape(1, c, *ones)
    return _ScaleShift.apply(x, scale, shift)


class _ScaleShift(torch.autograd.Function):
    """``x * scale + shift`` with per-channel (or per-sample and channel) ``scale`` and ``shift``. Its backward
    reduces the gradients of ``scale`` and ``shift`` per channel without temporaries of ``x``'s size (autograd's
    addcmul forms ``grad * x`` whole, then sums it: 13.6 against 2.3 ms on a 16x44^3 tile, most of it the page
    faults of fresh memory); the values are the same sums. Only low-precision data under float32 gradients
    (autocast) is copied, to the wider dtype, for those sums."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, scale)
        ctx.shift_shape = shift.shape
        return torch.addcmul(shift, x, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale = ctx.saved_tensors
        need_x, need_scale, need_shift = ctx.needs_input_grad
        gx = grad * scale if need_x else None
        g_scale = g_shift = None
        if need_scale or need_shift:
            n, c = x.shape[:2]
            g3, x3 = grad.reshape(n, c, -1), x.reshape(n, c, -1)
            if x3.dtype != g3.dtype:  # bfloat16 data under float32 statistics: the sums in the wider dtype
                wide = torch.promote_types(x3.dtype, g3.dtype)
                g3, x3 = g3.to(wide), x3.to(wide)
            if need_scale:
                g_scale = _to_shape(torch.einsum("ncl,ncl->nc", g3, x3), scale.shape)
            if need_shift:
                g_shift = _to_shape(g3.sum(2), ctx.shift_shape)
        return gx, g_scale, g_shift


def _to_shape(per_nc: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """An (N, C) sum as the gradient of a parameter of ``shape`` (N or 1, C, 1, ...)."""
    if shape[0] == 1 and per_nc.shape[0] != 1:
        per_nc = per_nc.sum(0, keepdim=True)
    return per_nc.reshape(shape)


def update_running_stats(module: nn.Module, stats: torch.Tensor, count: int) -> None:
    """What BatchNorm's training forward does to its buffers, from the whole batch's statistics."""
    if not module.track_running_stats or module.running_mean is None:
        return
    with torch.no_grad():
        module.num_batches_tracked.add_(1)
        factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
        mean, var = stats[0], stats[1]
        unbiased = var * (count / max(count - 1, 1))
        module.running_mean.mul_(1 - factor).add_(mean.to(module.running_mean.dtype), alpha=factor)
        module.running_var.mul_(1 - factor).add_(unbiased.to(module.running_var.dtype), alpha=factor)


# -- rewriting a traced graph --------------------------------------------------------------------------------------
def _statistic_kind(module: nn.Module) -> tuple[str, int] | None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or not module.track_running_stats:
            return "batch", 1
        return None
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        if not module.training and module.track_running_stats:
            return None  # running statistics in eval mode: local
        return "instance", 1
    if isinstance(module, nn.GroupNorm):
        return "group", module.num_groups
    return None


def _spatial_dims(dims: Any, rank: int) -> bool:
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)):
        return False
    return sorted(d % rank for d in dims) == list(range(2, rank))


# the functional normalisations, each with the flag that says it uses its input's statistics (None: always)
_FUNCTIONAL_NORMS = {F.group_norm: None, F.instance_norm: "use_input_stats", F.batch_norm: "training"}


def _functional_statistic(node: torch.fx.Node) -> tuple[str, int, Any, Any, float] | None:
    """(mode, groups, weight, bias, eps) of an F.group_norm / F.instance_norm / F.batch_norm call that normalises
    with statistics of its input and keeps none (no running statistics: a traced-through subclass's forward, NOTE
    [ Subclasses that change what a layer computes ] in geometry/toolkit.py), or None: then its geometry rule decides
    (local with running statistics in eval mode, refused otherwise)."""
    flag = _FUNCTIONAL_NORMS[node.target]
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    a = bound.arguments
    if not isinstance(a["input"], torch.fx.Node) or isinstance(a["eps"], torch.fx.Node):
        return None
    if flag is not None and (
        a[flag] is not True or any(a.get(k) is not None for k in ("running_mean", "running_var"))
    ):
        return None
    if node.target is F.group_norm:
        if not isinstance(a["num_groups"], int):
            return None
        return "group", a["num_groups"], a["weight"], a["bias"], float(a["eps"])
    mode = "instance" if node.target is F.instance_norm else "batch"
    return mode, 1, a["weight"], a["bias"], float(a["eps"])


def rewrite_statistics(gm: torch.fx.GraphModule, ndim: int) -> int:
    """Replace statistics layers in ``gm``'s graph by reduction + apply nodes (NOTE [ Streamed statistics ]);
    returns how many were rewritten."""
    graph = gm.graph
    rank = ndim + 2
    count = 0
    # only statistics of what the image flows into: a normalisation or mean of parameters alone (timm's
    # ScaledStdConv2d standardises its weight with F.batch_norm(training=True) on every call) is the same for every
    # tile, computed with the tile like any other parameter arithmetic; streamed as a statistic, its input became a
    # segment that "does not depend on the image" and the whole model was refused (nfnet)
    imaged: set[torch.fx.Node] = set()
    # the nodes whose (first) input the image flows into, found before any rewrite
    of_image: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in imaged for a in node.all_input_nodes):
            imaged.add(node)
        first = node.args[0] if node.args else node.kwargs.get("input")
        if isinstance(first, torch.fx.Node) and first in imaged:
            of_image.add(node)
    for node in list(graph.nodes):
        if node not in of_image:
            continue
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            kind = _statistic_kind(module)
            if kind is not None:
                mode, groups = kind
                if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
                    raise NotStreamableError(
                        f"layer '{node.target}' ({type(module).__name__}) updates running statistics in training "
                        "mode, which tilegrad does not stream yet; use track_running_stats=False (MONAI's default) "
                        "or put the layer in eval mode"
                    )
                (x,) = node.args[:1]
                with graph.inserting_before(node):
                    stats = graph.call_function(moments, (x,), {"mode": mode, "groups": groups})
                    stats.meta["tilegrad_module"] = node.target
                    affine = getattr(module, "affine", getattr(module, "elementwise_affine", True))
                    w = (
                        graph.get_attr(f"{node.target}.weight")
                        if affine and module.weight is not None
                        else None
                    )
                    b = graph.get_attr(f"{node.target}.bias") if affine and module.bias is not None else None
                    new = graph.call_function(
                        apply_norm, (x, stats, w, b), {"mode": mode, "groups": groups, "eps": module.eps}
                    )
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                count += 1
                continue
            if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
                size = module.output_size
                sizes = (size,) if isinstance(size, int) else tuple(size)
                if all(s == 1 for s in sizes):
                    _replace(graph, node, spatial_mean, node.args[0], True)
                    count += 1
            continue
        if node.op == "call_function" and node.target in _FUNCTIONAL_NORMS:
            found = _functional_statistic(node)
            if found is not None:
                mode, groups, w, b, eps = found
                x = node.args[0] if node.args else node.kwargs["input"]
                with graph.inserting_before(node):
                    stats = graph.call_function(moments, (x,), {"mode": mode, "groups": groups})
                    stats.meta["tilegrad_source"] = f"{node.target.__name__} (node '{node.name}')"
                    new = graph.call_function(
                        apply_norm, (x, stats, w, b), {"mode": mode, "groups": groups, "eps": eps}
                    )
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                count += 1
            continue
        if node.op == "call_function" and node.target in (
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
        ):
            size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
            sizes = (size,) if isinstance(size, int) else tuple(size or ())
            if sizes and all(s == 1 for s in sizes):
                _replace(graph, node, spatial_mean, node.args[0], True)
                count += 1
            continue
        is_mean = (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean
        )
        if is_mean and len(node.args) >= 1 and isinstance(node.args[0], torch.fx.Node):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            if dims is not None and _spatial_dims(dims, rank) and "dtype" not in node.kwargs:
                _replace(graph, node, spatial_mean, node.args[0], bool(keepdim))
                count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


def _replace(
    graph: torch.fx.Graph, node: torch.fx.Node, target: Any, x: torch.fx.Node, keepdim: bool
) -> None:
    with graph.inserting_before(node):
        new = graph.call_function(target, (x,), {"keepdim": keepdim})
    new.meta["tilegrad_source"] = (
        f"{type(graph.owning_module.get_submodule(node.target)).__name__} '{node.target}'"
        if node.op == "call_module"
        else f"{getattr(node.target, '__name__', node.target)} (node '{node.name}')"
    )
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def slabs(shape: Sequence[int], itemsize: int, limit: int = 32 * 2**20) -> list[tuple[slice, ...]]:
    """Boxes that partition a map (N, C, *spatial) into slabs along its first spatial dim, each at most about
    ``limit`` bytes: how reductions read a stored boundary."""
    spatial = tuple(shape[2:])
    row = max(1, math.prod(shape[:2]) * math.prod(spatial[1:]) * itemsize)
    step = max(1, limit // row)
    rest = tuple(slice(0, n) for n in spatial[1:])
    return [(slice(a, min(a + step, spatial[0])), *rest) for a in range(0, spatial[0], step)]


def _no_geometry(ctx: Any, module: Any, node: torch.fx.Node, inputs: list) -> None:
    """A reduction's output has no spatial extent: it is the same on every tile (a global source)."""
    return None


def _apply_rule(ctx: Any, module: Any, node: torch.fx.Node, inputs: list) -> Any:
    return merge(ctx, inputs)


register_geometry_rule(moments, _no_geometry)
register_geometry_rule(spatial_mean, _no_geometry)
register_geometry_rule(apply_norm, _apply_rule)
