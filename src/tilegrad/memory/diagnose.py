"""Why a model failed on the estimate's input, in words: the failing layer, what it received, and what to do.

Used by :func:`tilegrad.estimate_memory` (NOTE [ Naming the failing layer ]); the innermost running module is
recorded by :class:`tilegrad.memory.watch.ModuleWatch`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ShapeError, TilegradError

__all__ = ["Failure", "model_failed"]


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
class Failure:
    """The innermost module running when ``error`` was raised (NOTE [ Naming the failing layer ])."""

    error: BaseException
    name: str
    module: nn.Module
    input_shapes: list[tuple[int, ...]]


def _hint(failure: Failure | None, text: str, model: nn.Module, x: torch.Tensor) -> str:
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


def model_failed(
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
