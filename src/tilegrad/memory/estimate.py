"""Predict the memory of a model at any input size without allocating it: run it on meta tensors and watch.

The simulation itself is NOTE [ Simulated allocator ] in timeline.py; module bookkeeping is watch.py; what is said
when a model fails is diagnose.py.

NOTE [ Saved for backward ]
Per-layer "saved for backward" bytes come from ``torch.autograd.graph.saved_tensors_hooks`` in a separate forward
pass: every tensor autograd packs is attributed to the innermost module running at that moment. Each storage is
counted once for the whole model (an in-place ReLU saving its result shares the storage of the BatchNorm output that
the next convolution saves), and parameters, buffers and the model input are never counted as activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..dtypes import parse_dtype
from ..errors import ConfigError, TilegradError
from ..options import shape_option
from ..typing import PlanningModule
from .diagnose import model_failed
from .kernels import conv_workspace_bytes
from .report import LayerMemory, MemoryReport
from .timeline import Timeline, storage_key, unique_bytes
from .watch import ModuleWatch, tensors_of
from .workload import OptimizerSpec, default_loss, optimizer_factory, run_steps

__all__ = ["estimate_memory", "on_meta"]


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    return shape_option(input_shape, min_dims=2)  # (N, features) too: a head alone


@contextlib.contextmanager
def on_meta(
    model: nn.Module, dtype: torch.dtype
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Swap every parameter and buffer of ``model`` for a meta stand-in (``dtype`` for floating ones); restore after.

    NOTE [ Meta stand-ins ]: the swap lasts for the whole simulation, not one call, because some modules run their
    layers again inside backward (a StreamingModule recomputes each tile, checkpointing and reversible blocks
    recompute activations): those recomputations must also see meta parameters. Shared parameters get one stand-in.
    """
    originals: list[tuple[dict[str, Any], str, Any]] = []
    made: dict[int, torch.Tensor] = {}
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    buffer_names = {id(b): n for n, b in model.named_buffers()}
    try:
        for module in model.modules():
            for table, is_param in ((module._parameters, True), (module._buffers, False)):
                for key, value in list(table.items()):
                    if value is None:
                        continue
                    if id(value) not in made:
                        new_dtype = dtype if value.is_floating_point() else value.dtype
                        stand_in = torch.empty(value.shape, dtype=new_dtype, device="meta")
                        if is_param:
                            stand_in = nn.Parameter(stand_in, requires_grad=value.requires_grad)
                            params[names.get(id(value), key)] = stand_in
                        else:
                            buffers[buffer_names.get(id(value), key)] = stand_in
                        made[id(value)] = stand_in
                    originals.append((table, key, value))
                    table[key] = made[id(value)]
        yield params, buffers
    finally:
        for table, key, value in originals:
            table[key] = value


@contextlib.contextmanager
def _modes(model: nn.Module, training: bool | None) -> Iterator[None]:
    """Temporarily set train/eval flags (None leaves them as they are), restoring every module afterwards."""
    flags = {m: m.training for m in model.modules()}
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _run_model(model: nn.Module, x: torch.Tensor, label: str, watch: ModuleWatch) -> Any:
    try:
        return model(x)
    except TilegradError:
        raise  # already says what is wrong (e.g. a StreamingModule refusing a layer)
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as err:
        raise model_failed(model, x, label, err, watch) from err


def estimate_memory(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    mode: str = "train",
    dtype: torch.dtype | str = torch.float32,
    optimizer: OptimizerSpec = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    device: str = "cpu",
    name: str | None = None,
) -> MemoryReport:
    """Predict per-layer and peak memory of ``model`` on an input of ``input_shape`` without allocating it.

    ``input_shape`` is the whole batch, ``(N, C, H, W)`` or ``(N, C, D, H, W)``. ``mode="train"`` simulates a
    steady-state training step: parameters, buffers and optimizer state live throughout, then the forward pass, the
    loss, ``loss.backward()``, ``optimizer.step()`` and ``zero_grad(set_to_none=True)``; the model's train/eval
    flags are used as they are. ``mode="infer"`` simulates one forward pass under ``torch.no_grad()`` with the model
    temporarily in eval mode. Parameters and buffers are taken in ``dtype`` (like ``model.to(dtype)``).
    ``optimizer`` is None (gradients only), ``"sgd"`` (momentum: one buffer per parameter), ``"adam"`` /
    ``"adamw"`` (two), or a callable ``params -> torch.optim.Optimizer``. ``loss_fn(output) -> scalar`` defaults to
    the sum of the output. ``device`` is where the model will run: ``"cpu"`` adds the scratch buffers of the CPU
    convolution kernel PyTorch would pick in this process (NOTE [ CPU convolution workspaces ]; the choice depends on
    ``torch.get_num_threads()``); ``"cuda"`` leaves out cuDNN workspaces, which are chosen at run time. ``name``
    labels the report. The model itself is not touched: it runs with meta copies of its parameters
    swapped in for the duration of the call (NOTE [ Meta stand-ins ]), so it may live on any device, or on ``meta``
    already; do not use it from another thread meanwhile.

    A :class:`tilegrad.StreamingModule` inside the model is simulated like any other module, tile by tile, forward
    and the recomputing backward, so the report predicts the streamed peak for its tile size; its plan is listed in
    ``report.notes``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    >>> report = estimate_memory(net, (1, 3, 32, 32))
    >>> report.layers[0].output_shape, report.layers[0].output_elements
    ((1, 8, 32, 32), 8192)
    >>> report.parameter_count
    224
    >>> report.activation_bytes   # the ReLU saves its 8x32x32 float32 result; the conv saves only the input
    32768
    """
    shape = _check_shape(input_shape)
    dtype = parse_dtype(dtype)
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"expected device 'cpu' or 'cuda', received {device!r}")
    if mode not in ("train", "infer"):
        raise ConfigError(f"expected mode 'train' or 'infer', received {mode!r}")
    make_optimizer, optimizer_name = optimizer_factory(optimizer)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, received {type(model).__name__}")
    label = name or type(model).__name__
    train = mode == "train"
    loss_fn = loss_fn or default_loss

    with _modes(model, None if train else False), on_meta(model, dtype) as (params, buffers):
        trainable = [p for p in params.values() if p.requires_grad] if train else []
        state = {**params, **buffers}
        _plan_streaming_modules(model, shape, dtype, train, label)
        layers, activation_bytes = _layer_pass(model, params, buffers, shape, dtype, train, label)
        timeline, extra = _timeline_pass(
            model, state, shape, dtype, train, label, make_optimizer, loss_fn, trainable, device
        )
        streaming_notes = _streaming_notes(model)

    notes: list[str] = list(streaming_notes)
    if device == "cuda":
        notes.append("cuDNN workspaces (chosen at run time) are not included")
    return MemoryReport(
        model=label,
        input_shape=shape,
        mode=mode,
        dtype=str(dtype).removeprefix("torch."),
        optimizer=optimizer_name if train else None,
        layers=tuple(layers),
        parameter_count=sum(p.numel() for p in params.values()),
        parameter_bytes=unique_bytes(list(params.values())),
        buffer_bytes=unique_bytes(list(buffers.values())),
        gradient_bytes=unique_bytes(trainable),
        optimizer_bytes=extra["optimizer_bytes"],
        input_bytes=extra["input_bytes"],
        activation_bytes=activation_bytes,
        output_bytes=extra["output_bytes"],
        forward_peak_bytes=extra["forward_peak"],
        peak_bytes=timeline.peak,
        peak_at=timeline.peak_at,
        notes=tuple(notes),
    )


def _streaming_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that plan per input shape (tilegrad.typing.PlanningModule: StreamingModule, ...)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, PlanningModule)]


def _plan_streaming_modules(
    model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, train: bool, label: str
) -> None:
    """Let every StreamingModule make (and cache) its plan before anything is recorded.

    The planner profiles the whole trunk on meta tensors; run inside the simulation, that profile would count as
    memory of the step. A forward before the recorded passes makes the plan and leaves it cached for them. It runs
    in the grad mode of the step: the planner's profile counts what autograd saves, and under no_grad it would see
    nothing saved, so a training plan would take kept graphs for free (and the cache key does not include grad
    mode, so that plan would then be used for the training step).
    """
    if not _streaming_modules(model):
        return
    x = torch.empty(shape, dtype=dtype, device="meta")
    grad_mode = torch.enable_grad() if train else torch.no_grad()
    with grad_mode, ModuleWatch(model, label, record_outputs=False, label_nodes=False) as watch:
        output = _run_model(model, x, label, watch)
    del output


def _streaming_notes(model: nn.Module) -> list[str]:
    notes = []
    for name, module in _streaming_modules(model):
        plan = getattr(module, "last_plan", None)
        if plan is not None:
            # The plan's own "predicted peak" is the planner's rule of thumb it chooses plans by; the report's
            # PEAK is this simulation. Say which is which next to each other.
            summary = str(plan).replace("\n", ";").replace("predicted peak", "planner's quick estimate", 1)
            notes.append(
                f"streamed {name or 'model'}: {summary}; (the planner's quick estimate is the rule of thumb it "
                "chooses plans by; the PEAK above is this report's full simulation)"
            )
    return notes


def _layer_pass(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    train: bool,
    label: str,
) -> tuple[list[LayerMemory], int]:
    """One forward pass with saved-tensor hooks: per-layer rows (NOTE [ Saved for backward ])."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    excluded = {key[0] for t in (*params.values(), *buffers.values(), x) if (key := storage_key(t))}
    seen: set[int] = set()
    saved: dict[str, int] = {}
    watch = ModuleWatch(model, label, record_outputs=True, label_nodes=False)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is not None and key[0] not in excluded and key[0] not in seen:
            seen.add(key[0])
            owner = watch.stack[-1] if watch.stack else ""
            saved[owner] = saved.get(owner, 0) + key[1]
        return t

    grad_mode = torch.enable_grad() if train else torch.no_grad()
    with grad_mode, watch, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = _run_model(model, x, label, watch)

    param_owner: set[int] = set()
    modules = dict(model.named_modules())
    rows = []
    for name in watch.order:
        is_leaf = watch.leaf[name]
        if not is_leaf and not saved.get(name):
            continue
        count = 0
        for p in modules[name].parameters(recurse=False):
            if id(p) not in param_owner:
                param_owner.add(id(p))
                count += p.numel()
        calls = watch.outputs.get(name, [])
        outs = [t for call in calls for t in call]
        first = calls[0] if calls else []
        rows.append(
            LayerMemory(
                name=name,
                type=watch.types[name],
                output_shape=tuple(first[0].shape) if first else None,
                output_elements=sum(t.numel() for t in outs) if is_leaf else 0,
                output_bytes=sum(t.numel() * t.element_size() for t in outs) if is_leaf else 0,
                params=count,
                saved_bytes=saved.get(name, 0),
                calls=watch.calls[name],
                leaf=is_leaf,
            )
        )
    del output
    return rows, sum(saved.values())


def _timeline_pass(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype,
    train: bool,
    label: str,
    make_optimizer: Callable[[list[torch.Tensor]], Any] | None,
    loss_fn: Callable[[Any], torch.Tensor],
    trainable: list[torch.Tensor],
    device: str,
) -> tuple[Timeline, dict[str, int]]:
    """Simulate the workload under the allocator timeline (NOTE [ Simulated allocator ])."""
    watch = ModuleWatch(model, label, record_outputs=False, label_nodes=train)
    phase_now = {"phase": "setup"}

    def where() -> str:
        phase = phase_now["phase"]
        if phase == "forward":
            return f"forward, in {watch.where()}"
        if phase == "backward":
            node = torch._C._current_autograd_node()
            owner = watch.node_label(node) if node is not None else None
            op = node.name() if node is not None else "autograd"
            return f"backward, {op} of {watch.display(owner) if owner is not None else label}"
        return phase

    timeline = Timeline(where, conv_workspace_bytes if device == "cpu" else None)
    extra = {"optimizer_bytes": 0, "input_bytes": 0, "output_bytes": 0, "forward_peak": 0}
    opt = make_optimizer(trainable) if (train and make_optimizer is not None and trainable) else None
    steps = 2 if train else 1  # the second training step is the steady state: optimizer state already alive

    def on_phase(phase: str, step: int) -> None:
        if phase == "input" and step == steps - 1:
            timeline.reset_peak()
        if phase == "after forward" and step == steps - 1:
            extra["forward_peak"] = timeline.phase_peaks.get("forward", timeline.current)
        phase_now["phase"] = phase
        timeline.phase = phase

    def forward(x: torch.Tensor) -> Any:
        output = _run_model(model, x, label, watch)
        extra["output_bytes"] = unique_bytes(tensors_of(output))
        return output

    with timeline, watch:
        for t in state.values():
            timeline.track(t)
        seen = run_steps(
            forward,
            lambda: torch.empty(shape, dtype=dtype, device="meta"),
            train=train,
            optimizer=opt,
            params=trainable,
            loss_fn=loss_fn,
            steps=steps,
            on_phase=on_phase,
        )
    extra["input_bytes"] = seen["input_bytes"]
    if opt is not None:
        extra["optimizer_bytes"] = unique_bytes(
            [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        )
    return timeline, extra
