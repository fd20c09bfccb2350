"""Predict the memory of a model at any input size without allocating it: run it on meta tensors and watch.

NOTE [ Simulated allocator ]
The model runs on ``device="meta"`` tensors: every op computes shapes, dtypes and strides, but no data is stored,
so ResNet-34 at 8192 x 8192 or a 3D U-Net at 512^3 runs in seconds in a few MB. A ``TorchDispatchMode`` sees every
ATen op below autograd, in forward, in the autograd engine's backward and in the optimizer step, and records each
new tensor storage with its byte size. A ``weakref.finalize`` on each storage's Python object (PyTorch keeps one
Python object per live storage) fires when the last reference from Python or C++ goes away: when Python drops a
local variable, when autograd releases a saved tensor after its backward node ran, when a gradient buffer is
accumulated and dropped. Adding sizes on allocation and subtracting them on free gives the same timeline of live
tensor bytes that a device allocator sees, op by op; its maximum is the predicted peak. Transient peaks (e.g. inside
backward, where an op's saved inputs, the gradient of its output and the gradients of its inputs are alive at once)
come out of the simulation; nothing is modelled by hand.

What it does not see: memory that kernels allocate internally outside ATen tensors (cuDNN / oneDNN workspaces,
im2col buffers of non-oneDNN CPU convolutions), allocator rounding and fragmentation, and device-specific kernel
choices (meta follows the CPU composite paths, e.g. dropout keeps a float mask).

NOTE [ Saved for backward ]
Per-layer "saved for backward" bytes come from ``torch.autograd.graph.saved_tensors_hooks`` in a separate forward
pass: every tensor autograd packs is attributed to the innermost module running at that moment. Each storage is
counted once for the whole model (an in-place ReLU saving its result shares the storage of the BatchNorm output that
the next convolution saves), and parameters, buffers and the model input are never counted as activations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import ShapeError, TilegradError
from .kernels import conv_workspace_bytes
from .report import LayerMemory, MemoryReport
from .workload import default_loss, run_steps

__all__ = ["estimate_memory"]

OptimizerSpec = str | Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None

_OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    # foreach=False: the per-parameter loop PyTorch uses on CPU. On CUDA it defaults to foreach, whose temporaries
    # span all parameters at once; pass a callable such as lambda p: torch.optim.Adam(p, foreach=True) for that.
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=False),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3, foreach=False),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, foreach=False),
}
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
        ok = len(shape) >= 2 and all(s > 0 and s == v for s, v in zip(shape, input_shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ShapeError(
            f"expected input_shape as positive integers (N, C, *spatial), e.g. (1, 3, 224, 224) or "
            f"(1, 1, 64, 64, 64); received {input_shape!r}"
        )
    return shape


def _check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise TilegradError(f"unknown dtype {dtype!r}: expected one of {', '.join(sorted(_DTYPES))}")
        return _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TilegradError(
            f"expected a floating-point torch dtype such as torch.float32, received {dtype!r}"
        )
    return dtype


def _make_optimizer(spec: OptimizerSpec) -> tuple[Callable[[list[torch.Tensor]], Any] | None, str | None]:
    if spec is None:
        return None, None
    if isinstance(spec, str):
        key = spec.lower()
        if key not in _OPTIMIZERS:
            raise TilegradError(
                f"unknown optimizer {spec!r}: expected None, one of {', '.join(sorted(_OPTIMIZERS))}, or a "
                "callable taking a list of parameters and returning a torch.optim.Optimizer"
            )
        return _OPTIMIZERS[key], key
    if callable(spec):
        return spec, getattr(spec, "__name__", type(spec).__name__)
    raise TilegradError(f"expected optimizer None, a name or a callable, received {spec!r}")


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            return name, module
    return None


def _spatial_letters(ndim: int) -> str:
    return {1: "L", 2: "H, W", 3: "D, H, W"}.get(ndim, "*spatial")


def _expects(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.modules.conv._ConvNd):
        return (
            f"layer '{name}' ({type(module).__name__}) expects input "
            f"(N, {module.in_channels}, {_spatial_letters(len(module.kernel_size))})"
        )
    return f"layer '{name}' (Linear) expects input (N, ..., {module.in_features})"


def _shape_text(shapes: Sequence[tuple[int, ...]]) -> str:
    return ", ".join(str(s) for s in shapes) if shapes else "no tensor"


# NOTE [ Naming the failing layer ]: a model that fails on the estimate's input is reported with the innermost
# module that was running when the error was raised (its type and what it received), and a hint only where the
# error itself says what is wrong. Markers of data-dependent ops on meta tensors: boolean-mask indexing and nonzero
# raise "The register_meta function for torch.nonzero() ... data-independent ...", .item() / bool() raise
# "Tensor.item() cannot be called on meta tensors"; fake/symbolic tracing raises its own exception types.
_DATA_DEPENDENT_TEXT = (
    "register_meta",
    "data-independent",
    "data-dependent",
    "data dependent",
    "item() cannot be called on meta",
    "cannot copy out of meta tensor",
    "meta device type tensor to numpy",
    "meta tensor without output_size",
)
_NO_META_KERNEL_TEXT = ("no fake impl or meta kernel", "meta' backend")


def _data_dependent_types() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for module_name, attr in (
        ("torch._subclasses.fake_tensor", "DataDependentOutputException"),
        ("torch._subclasses.fake_tensor", "DynamicOutputShapeException"),
        ("torch.fx.experimental.symbolic_shapes", "GuardOnDataDependentSymNode"),
    ):
        try:
            value = getattr(importlib.import_module(module_name), attr, None)
        except ImportError:  # pragma: no cover - private modules of other torch versions
            continue
        if isinstance(value, type) and issubclass(value, BaseException):
            found.append(value)
    return tuple(found)


_DATA_DEPENDENT_TYPES = _data_dependent_types()


@dataclasses.dataclass
class _Failure:
    """The innermost module running when ``error`` was raised (NOTE [ Naming the failing layer ])."""

    error: BaseException
    name: str
    module: nn.Module
    input_shapes: list[tuple[int, ...]]


def _hint(failure: _Failure | None, text: str, model: nn.Module, x: torch.Tensor) -> str:
    """What to do, where the error says what is wrong; empty otherwise."""
    low = text.lower()
    hints = []
    if failure is not None:
        module, name = failure.module, f"layer '{failure.name}'" if failure.name else "the model"
        spatial = failure.input_shapes[0][2:] if failure.input_shapes else ()
        where = "x".join(map(str, spatial)) if spatial else "?"
        if "more than 1 value per channel when training" in low:
            hints.append(
                f"{type(module).__name__} in training mode needs more than one value per channel for its batch "
                f"statistics and {name} receives {_shape_text(failure.input_shapes)}: use a batch of 2 or more "
                "(input_shape[0], --batch), a larger input, or estimate inference (mode='infer', --mode infer)"
            )
        elif "more than 1 spatial element when training" in low:
            hints.append(f"{name} receives a {where} map: use a larger input")
        elif "too small" in low or "kernel size can't be greater" in low:
            hints.append(
                f"the input is too small for the model: after the strided layers and poolings before it, {name} "
                f"receives a {where} map, too small for its window; use a larger input"
            )
        elif isinstance(module, nn.modules.conv._ConvNd) and failure.input_shapes:
            shape = failure.input_shapes[0]
            if len(shape) != len(module.kernel_size) + 2 or shape[1] != module.in_channels:
                hints.append(_expects(failure.name, module))
        elif (
            isinstance(module, nn.Linear)
            and failure.input_shapes
            and failure.input_shapes[0][-1] != module.in_features
        ):
            hints.append(
                f"{_expects(failure.name, module)}: the features reaching it depend on the input size unless "
                "an adaptive pooling comes first; use the input size the model was built for"
            )
    first = _first_layer(model)
    if first is not None and isinstance(first[1], nn.modules.conv._ConvNd):
        conv, expects = first[1], _expects(*first)
        wrong = x.dim() != len(conv.kernel_size) + 2 or x.shape[1] != conv.in_channels
        if wrong and not any(expects in h for h in hints):
            hints.append(f"its first layer {expects}")
    return "; ".join(hints)


def _model_failed(
    model: nn.Module, x: torch.Tensor, label: str, err: BaseException, watch: Any
) -> TilegradError:
    """The error to raise for ``model`` failing on ``x`` (NOTE [ Naming the failing layer ])."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    failure = watch.failure_of(err) if watch is not None else None
    if failure is None:
        where = ""
    elif failure.name:
        kind = type(failure.module).__name__
        where = f" in layer '{failure.name}' ({kind}, input {_shape_text(failure.input_shapes)})"
    else:
        where = f" in the forward of {label} itself (not in a submodule)"
    low = text.lower()
    if isinstance(err, _DATA_DEPENDENT_TYPES) or any(marker in low for marker in _DATA_DEPENDENT_TEXT):
        return TilegradError(
            f"{label} has data-dependent shapes: an op{where} needs tensor values (boolean-mask indexing, "
            f"nonzero, .item(), a Python branch on a tensor), which meta tensors do not have "
            f"({text.split('. ')[0].rstrip('.')}). "
            "Its memory depends on the data: measure it with tilegrad.measure_peak_memory on real inputs, or make "
            "the op data-independent (e.g. torch.where instead of a boolean mask)"
        )
    if any(marker in low for marker in _NO_META_KERNEL_TEXT):
        return TilegradError(
            f"{label} cannot be estimated on meta tensors: an op{where} has no meta implementation "
            f"({text.rstrip('.')}). Measure it with tilegrad.measure_peak_memory instead"
        )
    hint = _hint(failure, text, model, x)
    return ShapeError(
        f"{label} failed on an input of shape {tuple(x.shape)} ({str(x.dtype).removeprefix('torch.')}){where}: "
        f"{text.rstrip('.')}" + (f". Hint: {hint}" if hint else "")
    )


# ----------------------------------------------------------------------------------------------------------------
# The simulated allocator (NOTE [ Simulated allocator ])
# ----------------------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    if not isinstance(t, torch.Tensor) or t.device.type != "meta" or t.layout != torch.strided:
        return None
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


class _Timeline(TorchDispatchMode):
    """Live bytes of meta tensor storages, op by op; ``peak`` is the maximum and ``peak_at`` where it happened."""

    def __init__(self, where: Callable[[], str], workspace: Callable[[Any, tuple, dict], int] | None) -> None:
        super().__init__()
        self._workspace = workspace
        self._sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_at = ""
        self.phase_peaks: dict[str, int] = {}
        self.phase = "setup"
        self._where = where

    def track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "meta" or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        old = self._sizes.get(key)
        if old is None:
            finalizer = weakref.finalize(storage, self._free, key)
            finalizer.atexit = False
            old = 0
        self._sizes[key] = size  # a resize_ of a known storage changes its size
        self.current += size - old

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def _note(self, scratch: int = 0) -> None:
        level = self.current + scratch
        if level > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = level
        if level > self.peak:
            self.peak = level
            self.peak_at = self._where() + (" (kernel scratch)" if scratch else "")

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_at = self._where()
        self.phase_peaks = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        # Kernel scratch lives while the op runs, with its inputs and outputs (NOTE [ CPU convolution workspaces ]).
        self._note(self._workspace(func, args, kwargs) if self._workspace is not None else 0)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Module bookkeeping: a stack of running modules, per-leaf rows, autograd nodes labelled with their module
# ----------------------------------------------------------------------------------------------------------------
_NODE_LABEL = "tilegrad.memory.module"


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class _ModuleWatch:
    """Forward hooks on every module: which module is running, what leaf modules output, who made which node."""

    def __init__(self, model: nn.Module, root_name: str, *, record_outputs: bool, label_nodes: bool) -> None:
        self.names: dict[nn.Module, str] = {}
        self.leaf: dict[str, bool] = {}
        self.types: dict[str, str] = {}
        for name, module in model.named_modules():
            self.names[module] = name
            self.leaf[name] = next(iter(module.children()), None) is None
            self.types[name] = type(module).__name__
        self.root_name = root_name
        self.stack: list[str] = []
        self.order: list[str] = []
        self.outputs: dict[str, list[list[torch.Tensor]]] = {}
        self.calls: dict[str, int] = {}
        self.record_outputs = (
            record_outputs  # keeps outputs alive: only in the layer pass, never in the timeline
        )
        self.label_nodes = label_nodes
        self._boundaries: list[set[Any]] = []
        self._handles: list[Any] = []
        self._model = model
        self.failure: _Failure | None = None

    def display(self, name: str) -> str:
        return name or self.root_name

    def __enter__(self) -> _ModuleWatch:
        for module in self.names:
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, module: nn.Module, args: Any) -> None:
        name = self.names[module]
        self.stack.append(name)
        if name not in self.calls:
            self.order.append(name)
            self.calls[name] = 0
        self.calls[name] += 1
        if self.label_nodes:
            self._boundaries.append({t.grad_fn for t in _tensors(args) if t.grad_fn is not None})

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.names[module]
        if output is None:
            # Hooks with always_call=True also run while an error leaves the module, innermost module first, with
            # output None: remember that module for the error message (NOTE [ Naming the failing layer ]).
            error = sys.exc_info()[1]
            if error is not None and (self.failure is None or self.failure.error is not error):
                self.failure = _Failure(error, name, module, [tuple(t.shape) for t in _tensors(args)])
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        outs = _tensors(output)
        if self.record_outputs and self.leaf[name]:
            self.outputs.setdefault(name, []).append(outs)
        if self.label_nodes:
            # NOTE [ Autograd node labels ]: the module that made an autograd node is written into the node's own
            # ``metadata`` dict, which lives and dies with the node. Nothing here holds a node, so graphs that
            # modules build again inside backward (streamed tiles, reversible blocks, checkpoints) get labelled
            # too without being kept alive (a dict of nodes would keep their saved tensors and inflate the peak).
            boundary = self._boundaries.pop() if self._boundaries else set()
            todo = [t.grad_fn for t in outs if t.grad_fn is not None]
            while todo:
                node = todo.pop()
                if node is None or node in boundary or _NODE_LABEL in node.metadata:
                    continue
                node.metadata[_NODE_LABEL] = name
                todo.extend(next_node for next_node, _ in node.next_functions)
            del todo, boundary

    def where(self) -> str:
        return self.display(self.stack[-1]) if self.stack else self.root_name

    @staticmethod
    def node_label(node: Any) -> str | None:
        """The module that made autograd ``node`` (NOTE [ Autograd node labels ]), if it was watched."""
        return node.metadata.get(_NODE_LABEL)

    def failure_of(self, error: BaseException) -> _Failure | None:
        """The innermost module that ``error`` (or an error it was raised from) left, if one did."""
        seen = set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            if self.failure is not None and self.failure.error is error:
                return self.failure
            error = error.__cause__ or error.__context__
        return None


# ----------------------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _on_meta(
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


def _unique_bytes(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        key = _storage_key(t)
        if key is not None:
            seen[key[0]] = key[1]
    return sum(seen.values())


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


def _run_model(model: nn.Module, x: torch.Tensor, label: str, watch: _ModuleWatch) -> Any:
    try:
        return model(x)
    except TilegradError:
        raise  # already says what is wrong (e.g. a StreamingModule refusing a layer)
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError) as err:
        raise _model_failed(model, x, label, err, watch) from err


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
    dtype = _check_dtype(dtype)
    if device not in ("cpu", "cuda"):
        raise TilegradError(f"expected device 'cpu' or 'cuda', received {device!r}")
    if mode not in ("train", "infer"):
        raise TilegradError(f"expected mode 'train' or 'infer', received {mode!r}")
    make_optimizer, optimizer_name = _make_optimizer(optimizer)
    if not isinstance(model, nn.Module):
        raise TilegradError(f"expected a torch.nn.Module, received {type(model).__name__}")
    label = name or type(model).__name__
    train = mode == "train"
    loss_fn = loss_fn or default_loss

    with _modes(model, None if train else False), _on_meta(model, dtype) as (params, buffers):
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
        parameter_bytes=_unique_bytes(list(params.values())),
        buffer_bytes=_unique_bytes(list(buffers.values())),
        gradient_bytes=_unique_bytes(trainable),
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
    from ..stream import StreamingModule

    return [(name, m) for name, m in model.named_modules() if isinstance(m, StreamingModule)]


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
    with grad_mode, _ModuleWatch(model, label, record_outputs=False, label_nodes=False) as watch:
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
    excluded = {key[0] for t in (*params.values(), *buffers.values(), x) if (key := _storage_key(t))}
    seen: set[int] = set()
    saved: dict[str, int] = {}
    watch = _ModuleWatch(model, label, record_outputs=True, label_nodes=False)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
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
) -> tuple[_Timeline, dict[str, int]]:
    """Simulate the workload under the allocator timeline (NOTE [ Simulated allocator ])."""
    watch = _ModuleWatch(model, label, record_outputs=False, label_nodes=train)
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

    timeline = _Timeline(where, conv_workspace_bytes if device == "cpu" else None)
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
        extra["output_bytes"] = _unique_bytes(_tensors(output))
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
        extra["optimizer_bytes"] = _unique_bytes(
            [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        )
    return timeline, extra
