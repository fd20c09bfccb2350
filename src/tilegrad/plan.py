"""Planner: given a trunk, an input shape and a tile size or a memory budget, decide how to stream it.

A plan cuts the trunk into *segments* (contiguous runs of its top-level layers, when it is an ``nn.Sequential``).
Each segment is streamed tile by tile with only its own halo; the feature map between two segments (a *boundary*)
is kept whole. One segment is the leanest plan: memory is one tile's activations plus the input, the output and the
parameters, whatever the image size, but the tile must carry the whole trunk's halo. More segments mean much smaller
halos (less recomputation) in exchange for keeping the boundary maps. With no budget a fixed tile uses the leanest
plan that is not wasteful: cuts only at boundaries no larger than the input image. With a budget, the planner
predicts time and peak memory of every candidate (and of plain, unstreamed execution) and takes the fastest that
fits.

Predictions come from one pass over meta tensors (nothing is allocated): per layer, the bytes autograd saves and the
forward FLOPs, scaled linearly with the tile area.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import GeometryError, MemoryBudgetError, NotStreamableError, ShapeError
from .geometry import Geometry, compose, module_geometry
from .options import batch_tiles_option, budget_option, mode_option, require_budget, tile_size_option
from .segment import Chain, Unit, units_of
from .tiling import TileGrid, tile_grid
from .typing import Bytes
from .units import format_bytes

__all__ = ["Plan", "SegmentPlan", "Unit", "plan_streaming", "units_of"]

# Fixed cost of one tile pass, in FLOP-equivalents: Python and dispatch overhead plus first-touch page faults of
# the fresh activation buffers (about 10 ms per tile measured on a ResNet-34 segment on CPU).
_TILE_OVERHEAD_FLOPS = 1.5e9
# Transient memory inside backward (gradient buffers, convolution workspaces), in units of the largest activation;
# calibrated on a ResNet-34 training step on CPU (measured 1063 MiB = 642 MiB saved + ~6.4 x 64 MiB).
_BACKWARD_TRANSIENT = 6.5
# Live memory of a no-grad forward, in units of the largest activation (measured 1.6 on a 3D U-Net at 192^3).
_FORWARD_TRANSIENT = 2.0
# Extra room kept below a user budget for allocator slack and Python objects.
_BUDGET_SAFETY = 0.8
# With a fixed tile and no budget, how much memory beyond the lean plan faster plans may use, in units of the
# requested tile's training memory (NOTE [ Tile memory ]). Larger is faster on big images and less flat: ResNet-34,
# tile 1024, predicted at 4096 / 8192 px: 0.25 -> 1.71 / 2.31 GiB at x1.44 / x9.8 of conventional time,
# 0.5 -> 1.95 / 2.72 GiB at x1.41 / x1.9, 1.0 -> 2.47 / 3.24 GiB at x1.37 / x1.6.
_FIXED_TILE_EXTRA = 0.5


def _without_hooks(module: nn.Module) -> nn.Module:
    """Drop the user's forward hooks from a meta copy: planning must not call them (on meta tensors, at that)."""
    for m in module.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return module


def _meta_profile(units: list[Unit], input_shape: Sequence[int], dtype: torch.dtype) -> None:
    """Fill shapes, saved bytes and FLOPs of each unit from one forward over meta tensors."""
    metas = [_without_hooks(copy.deepcopy(u.module)).to("meta") for u in units]
    param_storages = {
        p.untyped_storage()._cdata for m in metas for p in itertools.chain(m.parameters(), m.buffers())
    }
    x = torch.empty(tuple(input_shape), device="meta", dtype=dtype, requires_grad=True)
    seen: set[int] = set()
    current = {"saved": 0, "peak": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in param_storages and key not in seen:
            seen.add(key)
            current["saved"] += t.untyped_storage().nbytes()
        return t

    def track(module: nn.Module, args: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            current["peak"] = max(current["peak"], output.untyped_storage().nbytes())

    for unit, meta in zip(units, metas):
        current["saved"], current["peak"] = 0, 0
        handles = [m.register_forward_hook(track) for m in meta.modules()]
        unit.in_shape = tuple(x.shape)
        try:
            with (
                torch.enable_grad(),  # what a training step saves, even when planning happens under no_grad
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
                FlopCounterMode(display=False) as fc,
            ):
                y = meta(x)
        except Exception as err:  # the user's model failed on this shape; say where
            raise GeometryError(
                f"layer '{unit.name}' ({type(unit.module).__name__}) failed on an input of shape {tuple(x.shape)}: "
                f"{type(err).__name__}: {err}"
            ) from err
        finally:
            for h in handles:
                h.remove()
        if not isinstance(y, torch.Tensor):
            raise NotStreamableError(f"layer '{unit.name}' returns {type(y).__name__}, expected one tensor")
        unit.out_shape = tuple(y.shape)
        unit.saved_bytes = current["saved"]
        unit.flops = float(fc.get_total_flops())
        unit.peak_act_bytes = max(current["peak"], y.untyped_storage().nbytes())
        x = y


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass
class SegmentPlan:
    """How one segment runs: its units, geometry, tile (in the segment's own input pixels) and grid."""

    units: list[Unit]
    geometry: Geometry
    tile: tuple[int, ...]
    grid: TileGrid
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    tile_train_bytes: int = 0
    tile_forward_bytes: int = 0
    tile_saved_bytes: int = 0  # saved for backward by one tile
    flops: float = 0.0
    keep: bool = (
        False  # NOTE [ Kept segments ] in stream.py: one tile, run as plain autograd, no recomputation
    )

    @property
    def name(self) -> str:
        names = [u.name for u in self.units]
        if len(names) == 1:
            return names[0] or "trunk"
        return f"{names[0]} .. {names[-1]}"

    @functools.cached_property
    def overlap(self) -> float:
        """Input pixels read over all tiles / input pixels: 1.0 means no recomputation of halos."""
        return self.grid.input_area / math.prod(self.in_shape[2:])

    @property
    def chain(self) -> Chain:
        return Chain(self.units)


@dataclass
class Plan:
    """A streaming plan for one input shape. ``conventional`` plans run the trunk unstreamed."""

    input_shape: tuple[int, ...]
    segments: list[SegmentPlan]
    conventional: bool
    peak_bytes: int
    forward_peak_bytes: int
    time_ratio: float
    budget: int | None = None
    notes: list[str] = field(default_factory=list)
    training: bool = True  # False: an inference plan, whose peak is the forward peak

    @property
    def tile_size(self) -> tuple[int, ...]:
        """Tile size in input-image pixels (the first segment's tile)."""
        return self.segments[0].tile

    def __str__(self) -> str:
        head = (
            f"input {'x'.join(map(str, self.input_shape))}: "
            + (
                "conventional (unstreamed)"
                if self.conventional
                else f"{len(self.segments)} segment(s), {sum(not s.keep for s in self.segments)} streamed"
            )
            + f", predicted peak {format_bytes(self.peak_bytes)}"
            + (f" (budget {format_bytes(self.budget)})" if self.budget else "")
            + f", predicted time x{self.time_ratio:.2f} of conventional"
        )
        lines = [head]
        if not self.conventional:
            for seg in self.segments:
                if seg.keep:
                    lines.append(
                        f"  {seg.name}: whole {'x'.join(map(str, seg.in_shape[2:]))} map, graph kept "
                        f"(no recomputation), {format_bytes(seg.tile_saved_bytes)} saved for backward"
                    )
                    continue
                lines.append(
                    f"  {seg.name}: tile {'x'.join(map(str, seg.tile))} px of a "
                    f"{'x'.join(map(str, seg.in_shape[2:]))} map, {len(seg.grid)} tiles, "
                    f"overlap x{seg.overlap:.2f}, "
                    + (
                        f"tile training peak {format_bytes(seg.tile_train_bytes)}"
                        if self.training
                        else f"tile forward peak {format_bytes(seg.tile_forward_bytes)}"
                    )
                )
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


@functools.lru_cache(maxsize=1024)
def _chain_geometry(geometries: tuple[Geometry | None, ...], ndim: int) -> Geometry:
    """Composed geometry of consecutive units (cached: the planner asks for the same ranges many times)."""
    geometry = Geometry.identity(ndim)
    for g in geometries:
        assert g is not None
        geometry = compose(geometry, g)
    return geometry


def _segment(
    units: list[Unit], tile_image: Sequence[int], ndim: int, dtype: torch.dtype, scale: Sequence[Fraction]
) -> SegmentPlan:
    geometry = _chain_geometry(tuple(u.geometry for u in units), ndim)
    in_shape, out_shape = units[0].in_shape, units[-1].out_shape
    tile = tuple(max(1, math.floor(t / s)) for t, s in zip(tile_image, scale))
    try:
        grid = tile_grid(geometry, in_shape[2:], out_shape[2:], tile)
    except GeometryError as err:
        minimum = getattr(err, "minimum", None)
        if minimum is None or all(s == 1 for s in scale):
            raise
        # NOTE [ Deep segments ]: the tile is given in image pixels; a segment deep in the trunk runs on a map
        # `scale` times smaller, where the same extent may not even hold its halo. Such a segment uses the
        # smallest tile its halo allows instead (its maps are small, so this costs little memory). The plan's
        # printout shows every segment's tile.
        tile = tuple(max(t, _min_tile(geometry, in_shape[2:], out_shape[2:], d)) for d, t in enumerate(tile))
        grid = tile_grid(geometry, in_shape[2:], out_shape[2:], tile)
    area_ratio = math.prod(grid.max_in_shape) / math.prod(in_shape[2:])
    saved = sum(u.saved_bytes for u in units) * area_ratio
    largest = max(u.peak_act_bytes for u in units) * area_ratio
    tile_in = _nbytes((in_shape[0], in_shape[1], *grid.max_in_shape), dtype)
    return SegmentPlan(
        units=units,
        geometry=geometry,
        tile=tuple(min(t, i) for t, i in zip(tile, in_shape[2:])),
        grid=grid,
        in_shape=in_shape,
        out_shape=out_shape,
        tile_train_bytes=int(tile_in + saved + _BACKWARD_TRANSIENT * largest),
        tile_forward_bytes=int(tile_in + _FORWARD_TRANSIENT * largest),
        tile_saved_bytes=int(saved),
        flops=sum(u.flops for u in units),
    )


def _min_tile(geometry: Geometry, in_shape: Sequence[int], out_shape: Sequence[int], axis: int) -> int:
    from .tiling import plan_dim

    dim, align = geometry.dims[axis], geometry.align[axis]
    try:
        plan_dim(dim, align, in_shape[axis], out_shape[axis], 1, axis)
    except GeometryError as err:
        return int(err.minimum)  # type: ignore[attr-defined]
    return 1


def _evaluate(
    segments: list[SegmentPlan],
    input_shape: tuple[int, ...],
    param_bytes: int,
    dtype: torch.dtype,
    input_in_memory: bool,
    input_grad: bool,
) -> tuple[int, int, float]:
    """Predicted (training peak, forward peak, time ratio) of a streamed plan.

    A kept segment's saved tensors live from its forward to its own backward: during the forward they add up, and
    in the backward (which runs the segments in reverse) those of the segments before the current one are still
    alive.
    """
    inp = _nbytes(input_shape, dtype) if input_in_memory else 0
    boundaries = [_nbytes(s.out_shape, dtype) for s in segments]
    fixed = 2 * param_bytes + inp + sum(boundaries)
    kept = [s.tile_saved_bytes if s.keep else 0 for s in segments]
    forward = 0
    backward = 0
    for k, seg in enumerate(segments):
        before = sum(kept[:k])
        work = seg.tile_saved_bytes + seg.tile_forward_bytes if seg.keep else seg.tile_forward_bytes
        forward = max(forward, before + work)
        grad_out = boundaries[k]
        grad_in = boundaries[k - 1] if k > 0 else (inp if input_grad else 0)
        backward = max(backward, before + grad_out + grad_in + seg.tile_train_bytes)
    forward = max(forward, sum(kept))
    conventional = sum(3 * s.flops for s in segments) or 1.0
    return fixed + max(forward, backward), fixed + forward, sum(_cost(s) for s in segments) / conventional


def _cost(seg: SegmentPlan) -> float:
    """Predicted time of a segment's training step, in FLOPs (a conventional step is 3x its forward)."""
    if seg.keep:
        return 3 * seg.flops
    return 4 * seg.flops * seg.overlap + len(seg.grid) * _TILE_OVERHEAD_FLOPS * 2


def _choose_keeps(
    segments: list[SegmentPlan], fits: Callable[[list[SegmentPlan]], bool], lazy_input: bool
) -> list[SegmentPlan]:
    """Keep the graphs of one-tile segments (no recomputation) while the plan still fits, the segments that save
    the most recomputation per byte first. With a lazy input the first segment is never kept: keeping it would
    read the whole image into memory."""
    out = list(segments)
    order = sorted(
        (k for k, s in enumerate(out) if len(s.grid) == 1 and not (k == 0 and lazy_input)),
        key=lambda k: -out[k].flops / max(1, out[k].tile_saved_bytes),
    )
    for k in order:
        trial = [dataclasses.replace(s, keep=True) if j == k else s for j, s in enumerate(out)]
        if fits(trial):
            out = trial
    return out


def _conventional_peak(
    units: list[Unit], input_shape: tuple[int, ...], param_bytes: int, dtype: torch.dtype
) -> int:
    saved = sum(u.saved_bytes for u in units)
    largest = max(u.peak_act_bytes for u in units)
    return 2 * param_bytes + _nbytes(input_shape, dtype) + saved + _BACKWARD_TRANSIENT * largest


def _candidate_cuts(units: list[Unit]) -> list[int]:
    """Cut points (unit indices) just before and just after each unit that changes the spatial scale."""
    cuts: set[int] = set()
    for k, unit in enumerate(units):
        if unit.in_shape[2:] != unit.out_shape[2:]:
            cuts.update({k, k + 1})
    return sorted(c for c in cuts if 0 < c < len(units))


def _scale(units: list[Unit], first: int, ndim: int, input_shape: Sequence[int]) -> tuple[Fraction, ...]:
    """Image pixels per pixel of unit ``first``'s input map."""
    shape = units[first].in_shape
    return tuple(Fraction(input_shape[2 + d], shape[2 + d]) for d in range(ndim))


def plan_streaming(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    tile_size: int | Sequence[int] | str = "auto",
    memory_budget: Bytes | None = None,
    dtype: torch.dtype = torch.float32,
    mode: str = "auto",
    input_in_memory: bool = True,
    input_grad: bool = False,
    training: bool = True,
    output_in_memory: bool = True,
    batch_tiles: int = 1,
) -> Plan:
    """Choose segments and tile sizes for ``module`` on an input of ``input_shape`` (N, C, *spatial).

    ``mode``: "lean" (one segment, memory flat in the image size), "stages" (cut at every change of scale),
    or "auto" (with a budget: the fastest plan that fits, including unstreamed execution; without: "lean" plus
    cuts at boundaries no larger than the input). ``batch_tiles`` (inference only): tiles run together in one
    forward call, as ``tilegrad.infer(batch_tiles=)`` does (NOTE [ Tile batches ] in infer.py). ``memory_budget``
    is bytes or a string such as ``"2GiB"``. Option mistakes raise :class:`tilegrad.ConfigError`; no plan under the
    budget, :class:`tilegrad.MemoryBudgetError`.
    """
    input_shape = tuple(int(s) for s in input_shape)
    ndim = len(input_shape) - 2
    tile_size = tile_size_option(tile_size)
    memory_budget = budget_option(memory_budget)
    mode = mode_option(mode)
    batch_tiles = batch_tiles_option(batch_tiles)
    require_budget(tile_size, memory_budget)
    if isinstance(tile_size, tuple) and len(tile_size) != ndim:
        raise ShapeError(
            f"tile_size {tile_size} has {len(tile_size)} entries but the input has {ndim} spatial dims "
            f"(shape {input_shape}): give one entry per spatial dim or a single int"
        )
    units = units_of(module)
    for unit in units:
        unit.geometry = module_geometry(unit.module, ndim, unit.name)
    _meta_profile(units, input_shape, dtype)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())

    requested: tuple[int, ...] | None = None
    if tile_size == "auto":
        tile_choices = _tile_candidates(input_shape[2:], units)
    else:
        requested = tuple(tile_size) if not isinstance(tile_size, int) else (tile_size,) * ndim
        # NOTE [ Tile memory ]: a fixed tile sets the memory of one tile. Segments deep in the trunk run on maps
        # many times smaller than the image, where the same extent in image pixels would hold little more than
        # the halo; they may take larger tiles as long as a tile needs no more memory than the requested one.
        tile_choices = [requested] + [
            t for t in _tile_candidates(input_shape[2:], units) if all(a > b for a, b in zip(t, requested))
        ]

    cut_points = _candidate_cuts(units)
    if mode == "lean":
        cut_sets: list[tuple[int, ...]] = [()]
    elif mode == "stages":
        cut_sets = [tuple(cut_points)]
    else:  # every combination; the first is () (the lean plan), which the implied limit below relies on
        cut_sets = [c for r in range(len(cut_points) + 1) for c in itertools.combinations(cut_points, r)]

    budget = None if memory_budget is None else int(memory_budget * _BUDGET_SAFETY)
    implied_note = ""
    best: Plan | None = None
    smallest: Plan | None = None
    errors: list[str] = []
    if memory_budget is not None and mode == "auto" and training:
        peak = _conventional_peak(units, input_shape, param_bytes, dtype)
        if peak <= budget:
            seg = _segment(units, input_shape[2:], ndim, dtype, (Fraction(1),) * ndim)
            best = Plan(input_shape, [seg], True, peak, peak, 1.0, memory_budget)
    cache: dict[tuple[int, int, tuple[int, ...]], SegmentPlan | None] = {}

    forward_rate: dict[tuple[int, int], float] = {}

    def forward_bytes_per_px(first: int, stop: int) -> float:
        """Inference peak per input pixel of a segment, from estimate_memory's allocator simulation (which
        includes CPU convolution scratch, so it errs on the safe side)."""
        if (first, stop) not in forward_rate:
            from .memory.estimate import estimate_memory

            shape = units[first].in_shape
            # a meta copy: planning must not call the user's forward hooks (as in _meta_profile)
            chain = _without_hooks(copy.deepcopy(nn.Sequential(*(u.module for u in units[first:stop])))).to(
                "meta"
            )
            report = estimate_memory(chain, shape, mode="infer", dtype=dtype)
            forward_rate[(first, stop)] = report.peak_bytes / math.prod(shape[2:])
        return forward_rate[(first, stop)]

    def segment(first: int, stop: int, tile: tuple[int, ...]) -> SegmentPlan | None:
        key = (first, stop, tile)
        if key not in cache:
            try:
                seg = _segment(units[first:stop], tile, ndim, dtype, _scale(units, first, ndim, input_shape))
                if not training:  # inference plans: simulate the forward peak instead of the rule of thumb
                    area = math.prod(seg.grid.max_in_shape)
                    # After the forward a tile's output core is copied (dtype conversion, a contiguous block for
                    # the sink) while the output is alive: three output tiles, which can exceed the forward's own
                    # peak when the output is the largest map (super-resolution).
                    out_px = area * math.prod(o / i for o, i in zip(seg.out_shape[2:], seg.in_shape[2:]))
                    sink = 3 * _nbytes(seg.out_shape[:2], dtype) * out_px
                    per_tile = max(forward_bytes_per_px(first, stop) * area, sink)
                    seg.tile_forward_bytes = int(per_tile * batch_tiles)
                cache[key] = seg
            except GeometryError as err:
                errors.append(str(err))
                cache[key] = None
        return cache[key]

    first_stops = sorted({c[0] if c else len(units) for c in cut_sets})

    def tile_cap(tile: tuple[int, ...]) -> int:
        """Memory of the requested tile in the image-reading segment where it is largest (the lean one, when the
        tile holds the whole trunk's halo)."""
        sizes = [
            seg.tile_train_bytes if training else seg.tile_forward_bytes
            for stop in first_stops
            if (seg := segment(0, stop, tile)) is not None
        ]
        return max(sizes, default=0)

    def plan_for(cuts: tuple[int, ...], budget: int | None) -> Plan | None:
        """The fastest plan with these cuts (tile per segment, kept graphs) under ``budget``, or None."""
        bounds = [0, *cuts, len(units)]
        ranges = list(itertools.pairwise(bounds))
        inp = _nbytes(input_shape, dtype) if input_in_memory else 0
        outs = [_nbytes(units[b - 1].out_shape, dtype) for _, b in ranges]
        if not output_in_memory:
            outs[-1] = 0
        fixed = (2 if training else 1) * param_bytes + inp + sum(outs)
        chosen: list[SegmentPlan] = []
        for k, (a, b) in enumerate(ranges):
            grads = outs[k] + (outs[k - 1] if k > 0 else (inp if input_grad else 0))
            options = [s for s in (segment(a, b, t) for t in tile_choices) if s is not None]
            if requested is not None and a == 0:  # the segment that reads the image takes the requested tile
                options = [s for s in (segment(a, b, requested),) if s is not None]
            if not options:
                break
            if requested is not None:
                if segment(a, b, requested) is None:
                    # the requested tile must work in every segment of a plan: never swap it silently. Other cuts
                    # (shorter segments, smaller halos) may still take it; if none does, the error says why.
                    return None
                cap = options[0].tile_train_bytes if training else options[0].tile_forward_bytes
                cap = max(cap, tile_cap(requested))
                options = [
                    s for s in options if (s.tile_train_bytes if training else s.tile_forward_bytes) <= cap
                ]
            fitting = [
                s
                for s in options
                if budget is None
                or (
                    (not training or fixed + grads + s.tile_train_bytes <= budget)
                    and fixed + s.tile_forward_bytes <= budget
                )
            ]
            pool = fitting or options
            chosen.append(
                min(
                    pool,
                    key=lambda s: (4 * s.flops * s.overlap + len(s.grid) * _TILE_OVERHEAD_FLOPS * 2, s.tile),
                )
                if fitting
                else min(pool, key=lambda s: s.tile_train_bytes)
            )
        if len(chosen) != len(ranges):
            return None
        if training:
            if budget is not None:

                def fits(trial: list[SegmentPlan]) -> bool:
                    return (
                        _evaluate(trial, input_shape, param_bytes, dtype, input_in_memory, input_grad)[0]
                        <= budget
                    )

            else:  # a fixed tile sets the memory (NOTE [ Tile memory ]): kept graphs may hold one tile's worth
                allowance = tile_cap(requested) if requested is not None else 0

                def fits(trial: list[SegmentPlan], allowance: int = allowance) -> bool:
                    return sum(s.tile_saved_bytes for s in trial if s.keep) <= allowance

            chosen = _choose_keeps(chosen, fits, lazy_input=not input_in_memory)
        peak, fwd_peak, ratio = _evaluate(
            chosen, input_shape, param_bytes, dtype, input_in_memory, input_grad
        )
        if not training:  # inference: no gradients, the forward peak is the peak
            fwd_peak = peak = fixed + max(s.tile_forward_bytes for s in chosen)
        return Plan(input_shape, chosen, False, peak, fwd_peak, ratio, memory_budget, training=training)

    # NOTE [ Tile memory ], continued: with a fixed tile and no budget, the tile sets the limit too. Any plan may
    # be chosen whose predicted peak is at most the lean plan's (one segment: tile + input + output + parameters,
    # flat in the image size) plus half the memory of one more tile (_FIXED_TILE_EXTRA); boundary maps and kept
    # graphs must fit in that allowance, so the peak stays flat in the image size apart from the input and
    # output, and the planner moves towards the lean plan as the image grows.
    if budget is None and mode == "auto" and training and requested is not None:
        lean = plan_for((), None)
        if (
            lean is None
        ):  # the tile cannot hold the whole trunk's halo: the leanest plan that takes it instead
            lean = min(
                (p for p in (plan_for(c, None) for c in cut_sets) if p is not None),
                key=lambda p: p.peak_bytes,
                default=None,
            )
        if lean is not None:
            budget = lean.peak_bytes + int(_FIXED_TILE_EXTRA * tile_cap(requested))
            implied_note = (
                f"no budget given: the {'x'.join(map(str, requested))} tile sets the limit, "
                f"{format_bytes(budget)} (the leanest plan's {format_bytes(lean.peak_bytes)} plus "
                f"{_FIXED_TILE_EXTRA:g} tile); pass memory_budget= to let it use more memory for speed"
            )
    for cuts in cut_sets:
        plan = plan_for(cuts, budget)
        if plan is None:
            continue
        if smallest is None or plan.peak_bytes < smallest.peak_bytes:
            smallest = plan
        if budget is not None and plan.peak_bytes > budget:
            continue
        if best is None or plan.time_ratio < best.time_ratio - 1e-9:
            best = plan
    if best is not None:
        if implied_note:
            best.notes.append(implied_note)
        return best
    if smallest is None:
        raise GeometryError(errors[0] if errors else "no tile size fits this trunk")
    raise MemoryBudgetError(
        f"no streaming plan fits the memory budget of {format_bytes(memory_budget or 0)} for input "
        f"{'x'.join(map(str, input_shape))}: the leanest plan found needs about {format_bytes(smallest.peak_bytes)}, "
        f"more than the {format_bytes(budget or 0)} the planner allows itself ({_BUDGET_SAFETY:.0%} of the budget; "
        f"the rest is slack for the allocator) ({smallest}). Raise the budget"
        + (", or request a smaller tile_size" if requested is not None else "")
        + (", or keep the input on disk as a lazy array" if input_in_memory else "")
        + (", or write the output to a sink on disk (out=)" if not training and output_in_memory else "")
    )


def _tile_candidates(spatial: Sequence[int], units: list[Unit]) -> list[tuple[int, ...]]:
    """Tile sizes to try: a geometric ladder (ratio 2^(1/4), multiples of 8) from 48 px up to the whole image."""
    sizes: set[int] = set()
    top = max(spatial)
    t = 48.0
    while t < top:
        sizes.add(round(t / 8) * 8)
        t *= 2**0.25
    sizes.add(top)
    return [tuple(min(s, d) for d in spatial) for s in sorted(sizes)]
