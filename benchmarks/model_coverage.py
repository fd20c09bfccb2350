"""Which models tilegrad streams exactly: the coverage table of docs/models.md.

Every torchvision classification and segmentation model, every network class of ``monai.networks.nets`` that can be
built from small required arguments, and one model per timm family (module), with random weights (``weights=None``,
``pretrained=False``: nothing is downloaded), in eval mode and float64, on a small input cut into several tiles:

* **streamed**: ``head(StreamingModule(trunk)(x))`` against ``model(x)``: the output, the input gradient and every
  parameter gradient (the trunk/head split of :func:`tilegrad.split.streamable_part`: ``split_model`` for a network
  with a classifier head, the whole network for a segmentation network);
* **infer**: ``tilegrad.infer(trunk, x)`` against ``trunk(x)``;
* for the streamed ones, the time of one streamed training step (forward + backward) against the conventional one,
  at this small input (an indication only: at these sizes the halo is a large part of every tile);
* otherwise the first line of the refusal (or of the crash, when tilegrad raised no TilegradError of its own).

    python benchmarks/model_coverage.py                        # every model, rewrites the table in docs/models.md
    python benchmarks/model_coverage.py --only resnet18,UNet   # these rows only (others kept as they are)
    python benchmarks/model_coverage.py --only resnet18 --print  # print the rows, leave docs/models.md alone

``rows()`` lists the rows without building anything; ``check(row)`` measures one. tests/test_model_coverage.py
re-checks a few rows of docs/models.md with ``check``, so the table cannot silently rot.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
BEGIN, END = "<!-- coverage table: begin (benchmarks/model_coverage.py) -->", "<!-- coverage table: end -->"
EXACT = 1e-10  # float64: relative to the largest magnitude of the compared tensor
# What 2 shared CPU cores can do in about 15 minutes for some 250 models in float64 (convolutions in float64 take
# PyTorch's slow path on CPU): larger models and inputs are listed with the reason they were not run. 150M
# parameters take in every torchvision CNN but ConvNeXt-Large and RegNet-Y-128GF (VGG-11-BN, 133M: 20 s a row,
# 5.6 GB resident in float64 with its gradients twice).
MAX_PARAMS = 150e6
# the input's side; grown when the halo asks for larger tiles, or to the model's minimum
SIDE = {2: 64, 3: 32}
# the input may grow up to MAX_PIXELS, or further while the trunk's forward costs at most MAX_FLOPS there (counted on
# the meta device): AlexNet and SqueezeNet are one segment (no map lies on the image grid) and need 256 px tiles, but
# their trunks are cheap (4 GFLOP at 384^2, as much as ConvNeXt-Base's at 64^2 x 1.6)
MAX_PIXELS = {2: 192**2, 3: 64**3}
MAX_FLOPS = 5e9
SECONDS = 60  # per model


@dataclass
class Row:
    """One model of the table: how to build it (cheap to create: nothing is built) and, once checked, the result."""

    source: str  # "torchvision", "torchvision.segmentation", "monai", "timm"
    name: str
    build: Callable[[], nn.Module] = field(repr=False, default=None)  # type: ignore[assignment]
    ndim: int = 2
    channels: int = 3
    setup: str = (
        ""  # the arguments the table had to choose (MONAI), or the timm model standing for its family
    )
    side: int = 0  # the smallest input side the model accepts (torchvision's min_size), 0: SIDE
    status: str = ""  # streamed exact | infer exact | NOT EXACT | refused | crash | not built | not run
    error: str = ""
    time: str = ""
    message: str = ""
    input: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.name)


# ---- the models ---------------------------------------------------------------------------------------------------


class _Out(nn.Module):
    """A torchvision segmentation model returns {"out": ...}: its tensor (``aux_loss`` is off with weights=None)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def _torchvision_rows() -> list[Row]:
    import torchvision

    rows = []
    for name in torchvision.models.list_models(module=torchvision.models):
        rows.append(Row("torchvision", name, _tv_factory(name), side=_tv_min_side(name)))
    for name in torchvision.models.list_models(module=torchvision.models.segmentation):
        rows.append(Row("torchvision.segmentation", name, _tv_factory(name, segmentation=True)))
    return rows


def _tv_min_side(name: str) -> int:
    """The smallest input side of a torchvision model (its weights' ``min_size``: Inception-v3 needs 75 px),
    rounded up to a multiple of 32; 0 when it is at most SIDE."""
    import torchvision

    weights = list(torchvision.models.get_model_weights(name))
    least = max(weights[0].meta.get("min_size", (0,))) if weights else 0
    return 32 * math.ceil(least / 32) if least > SIDE[2] else 0


def _tv_factory(name: str, segmentation: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        kwargs: dict[str, Any] = {"weights": None}
        if segmentation:
            kwargs["weights_backbone"] = None
        else:
            kwargs["num_classes"] = 10
        if name in ("googlenet", "inception_v3"):
            kwargs["init_weights"] = True  # silences the warning; same as the default without weights
        model = torchvision.models.get_model(name, **kwargs)
        return _Out(model) if segmentation else model

    return build


# Arguments a MONAI network needs and that have no default: the smallest that make a real network of its kind.
# Everything else keeps its default (norm, activation, depth, widths where they have defaults).
MONAI_FILL: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "num_classes": 2,
    "classes": 2,
    "channels": (8, 16, 32),
    "strides": (2, 2),
    "img_size": (32, 32, 32),
    "patch_size": 16,
    "in_shape": (1, 32, 32, 32),
    "out_shape": (2,),
    "latent_size": 8,
    "num_channel_initial": 8,
    "depth": 2,
}
_NO_DOWNLOAD = {"pretrained": False}  # these default to downloading weights: nothing may be downloaded here
_SENET = {"spatial_dims": 2, "in_channels": 3, "num_classes": 2, **_NO_DOWNLOAD}
MONAI_ARGS: dict[str, dict[str, Any]] = {  # per network, on top of MONAI_FILL
    "AutoEncoder": {"channels": (8, 16), "strides": (2, 2)},
    "DynUNet": {"kernel_size": (3, 3, 3), "strides": (1, 2, 2), "upsample_kernel_size": (2, 2)},
    "EfficientNetBN": {"model_name": "efficientnet-b0", "spatial_dims": 2, "in_channels": 3, **_NO_DOWNLOAD},
    "EfficientNetBNFeatures": {
        "model_name": "efficientnet-b0",
        "spatial_dims": 2,
        "in_channels": 3,
        **_NO_DOWNLOAD,
    },
    "EfficientNetEncoder": {
        "model_name": "efficientnet-b0",
        "spatial_dims": 2,
        "in_channels": 3,
        **_NO_DOWNLOAD,
    },
    "FlexUNet": {"backbone": "efficientnet-b0", "spatial_dims": 2, "in_channels": 3, **_NO_DOWNLOAD},
    "GlobalNet": {"image_size": (32, 32, 32)},
    "LocalNet": {"extract_levels": (0, 1, 2)},
    "MILModel": {**_NO_DOWNLOAD},
    "MultiScalePatchDiscriminator": {"num_d": 2, "num_layers_d": 2, "channels": 8},
    "PatchDiscriminator": {"channels": 8},
    "ResNet": {"block": "basic", "layers": (1, 1, 1, 1), "block_inplanes": (8, 16, 32, 64)},
    "ResNetEncoder": {"model_name": "resnet10", **_NO_DOWNLOAD},
    "ResNetFeatures": {"model_name": "resnet10", **_NO_DOWNLOAD},
    "SegResNetVAE": {"input_image_size": (32, 32, 32)},
    "SENet154": _SENET,
    "SEResNet50": _SENET,
    "SEResNet101": _SENET,
    "SEResNet152": _SENET,
    "SEResNeXt50": _SENET,
    "SEResNeXt101": _SENET,
    "SwinUNETR": {"feature_size": 24},
    "TorchVisionFCModel": {**_NO_DOWNLOAD},
    "VarAutoEncoder": {"channels": (8, 16), "strides": (2, 2)},
}
MONAI_INPUT: dict[str, dict[str, int]] = {  # input geometry MONAI_FILL cannot say (ndim, channels, side)
    # a torchvision model (dim=2, RGB); MONAI's default pool averages 7x7 windows and the fc reads one pixel of
    # them: 224 px, torchvision's own size
    "TorchVisionFCModel": {"ndim": 2, "channels": 3, "side": 224},
}
MONAI_SKIP = {  # classes of monai.networks.nets that are building blocks or need a whole model as an argument
    "BertAttention", "BertMixedLayer", "BertOutput", "BertPreTrainedModel", "HighResBlock", "PatchMerging",
    "PatchMergingV2", "Pooler", "ResNetBlock", "ResNetBottleneck", "NetAdapter", "TopologyConstruction",
    "TopologyInstance", "TopologySearch",
}  # fmt: skip


def _monai_classes() -> list[tuple[str, type]]:
    """(name, class) of every nn.Module class of monai.networks.nets, one name per class (its first spelling)."""
    import monai.networks.nets as nets

    seen: dict[type, str] = {}
    for name in sorted(dir(nets)):
        obj = getattr(nets, name)
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj not in seen:
            seen[obj] = name
    return sorted(((n, c) for c, n in seen.items()), key=lambda nc: nc[0].lower())


def _monai_rows() -> list[Row]:
    rows = []
    for name, cls in _monai_classes():
        if name in MONAI_SKIP:
            continue
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        required = [
            p.name for p in params if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]  # fmt: skip
        names = {p.name for p in params}
        open_ended = any(p.kind == p.VAR_KEYWORD for p in params)  # passes **kwargs on to a base class
        chosen = {k: v for k, v in MONAI_FILL.items() if k in required}
        chosen.update({k: v for k, v in MONAI_ARGS.get(name, {}).items() if k in names or open_ended})
        ndim = chosen.get("spatial_dims", _default(params, "spatial_dims", 3))
        channels = chosen.get(
            "in_channels", _default(params, "in_channels", _default(params, "n_input_channels", 1))
        )
        if "in_shape" in chosen:  # Classifier, Regressor, ...: (channels, *spatial)
            ndim, channels = len(chosen["in_shape"]) - 1, chosen["in_shape"][0]
        missing = [r for r in required if r not in chosen]
        setup = ", ".join(f"{k}={v}" for k, v in chosen.items())
        row = Row("monai", name, _monai_factory(cls, chosen), ndim=ndim, channels=channels, setup=setup)
        for key, value in MONAI_INPUT.get(name, {}).items():
            setattr(row, key, value)
        if missing:
            row.status, row.message = "not built", f"needs {', '.join(missing)} (no small default to choose)"
        rows.append(row)
    return rows


def _default(params: list[inspect.Parameter], name: str, fallback: Any) -> Any:
    for p in params:
        if p.name == name and p.default is not inspect.Parameter.empty and isinstance(p.default, int):
            return p.default
    return fallback


def _monai_factory(cls: type, kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    return lambda: cls(**kwargs)


SMALL = ("atto", "femto", "pico", "nano", "tiny", "small", "18", "b0", "mobile", "lite", "xs")


def _timm_rows() -> list[Row]:
    try:
        import timm
    except ImportError:
        return []
    return [
        Row("timm", module, _timm_factory(module))
        for module in timm.list_modules()
        if timm.list_models(module=module)
    ]


_TIMM_CHOICE: dict[str, str] = {}


def timm_model(module: str) -> str:
    """The timm model standing for a family: the one with the fewest parameters among its six shortest names that
    look small (counted on the meta device: nothing is initialised)."""
    if module not in _TIMM_CHOICE:
        import timm

        names = sorted(
            timm.list_models(module=module), key=lambda n: (not any(s in n for s in SMALL), len(n), n)
        )
        best: tuple[float, str] | None = None
        for name in names[:6]:
            try:
                with torch.device("meta"):
                    count = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
            except Exception:
                continue
            if best is None or count < best[0]:
                best = (count, name)
        _TIMM_CHOICE[module] = best[1] if best else names[0]
    return _TIMM_CHOICE[module]


def _timm_factory(module: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(timm_model(module), pretrained=False, num_classes=10)

    return build


def rows() -> list[Row]:
    """Every row of the table, nothing built: names from torchvision's and timm's registries and MONAI's classes."""
    return [*_torchvision_rows(), *_monai_rows(), *_timm_rows()]


# ---- one check ----------------------------------------------------------------------------------------------------


class _Timeout(BaseException):
    """Not an Exception: no ``except Exception`` on the way (a constructor's, tilegrad's, this script's "not built")
    may take a timeout for a failure of the model."""


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Stop the check after ``seconds``; then leave no mode behind. The alarm can fire inside a ``with
    torch.device("meta")`` or a FlopCounterMode whose exit it skips: every later row would then build its model on
    the meta device (a run once listed MONAI UNet and most timm families as "Tensor.item() cannot be called on meta
    tensors" after one row timed out)."""

    def fire(*_: Any) -> None:
        raise _Timeout(f"over {seconds} s on this machine")

    from torch.utils._python_dispatch import _len_torch_dispatch_stack, _pop_mode

    function_modes, dispatch_modes = torch._C._len_torch_function_stack(), _len_torch_dispatch_stack()
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        while torch._C._len_torch_function_stack() > function_modes:
            torch._C._pop_torch_function_stack()
        while _len_torch_dispatch_stack() > dispatch_modes:
            _pop_mode()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= 240 else text[:237] + "..."


def _rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf
    scale = b.abs().max().item() or 1.0
    return (a - b).abs().max().item() / scale


def _affordable(trunk: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether a check at this input is within what the CPU can do: at most MAX_PIXELS, or a trunk on the meta device
    whose forward costs at most MAX_FLOPS at this input."""
    if math.prod(shape[2:]) <= MAX_PIXELS[len(shape) - 2]:
        return True
    param = next(trunk.parameters(), None)
    if param is None or param.device.type != "meta":
        return False
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            trunk(torch.empty(shape, device="meta", dtype=param.dtype))
    except Exception:
        return False
    return counter.get_total_flops() <= MAX_FLOPS


def _plan(trunk: nn.Module, shape: tuple[int, ...], tile: int, tilegrad: Any) -> tuple[Any, str]:
    """(plan, mode) the check streams with: a cut at every change of scale (``mode="stages"``), or, where those
    maps do not line up (Inception-v3's unpadded stem: NOTE [ Segment windows ] in graph.py), the planner's own
    cuts (``mode="auto"``)."""
    try:
        return tilegrad.plan_streaming(
            trunk, shape, tile_size=tile, mode="stages", dtype=torch.float64
        ), "stages"
    except tilegrad.GeometryError as err:
        try:
            return tilegrad.plan_streaming(
                trunk, shape, tile_size=tile, mode="auto", dtype=torch.float64
            ), "auto"
        except tilegrad.GeometryError:
            raise err from None


def _tile(trunk: nn.Module, shape: tuple[int, ...], tile: int) -> tuple[tuple[int, ...], int, Any]:
    """An input shape and a tile giving several tiles: grow the tile to the smallest the geometry accepts, the
    input to 1.5 tiles (multiple of 32). Returns (shape, tile, plan); the plan is None when the input would be too
    large for this check (:func:`_affordable`; the caller says so)."""
    import tilegrad
    from tilegrad import GeometryError

    planned: tuple[tuple[int, ...], int, Any] | None = None
    for _ in range(8):
        if not _affordable(trunk, shape):
            return shape, tile, None
        try:
            plan, _ = _plan(trunk, shape, tile, tilegrad)
        except GeometryError as err:
            found = re.search(r"use at least (\d+)", str(err))
            if not found or planned is not None:  # a smaller tile than one that planned: keep that one
                if planned is not None:
                    return planned
                raise
            tile = int(found.group(1))
            side = max(shape[2], 32 * math.ceil(1.5 * tile / 32))
            shape = (*shape[:2], *(side,) * (len(shape) - 2))
            continue
        planned = (shape, tile, plan)
        if max(len(s.grid) for s in plan.segments) > 1:
            return planned
        tile = max(8, tile * 2 // 3)  # one tile holds the whole input: a smaller one
    if planned is not None:
        return planned
    raise tilegrad.GeometryError(f"no tile found for an input of {shape}")


def _grads(
    model: nn.Module, x: torch.Tensor, out: torch.Tensor, cotangent: torch.Tensor
) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    found = torch.autograd.grad(out, [x, *params], cotangent, allow_unused=True)
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(found, [x, *params])]


def check(row: Row, side: int | None = None) -> Row:
    """Build the model of ``row``, stream it and infer with it against the plain computation; fill the row in.

    The model is first built on the meta device (:func:`on_meta`): its size, its split and its plan (where most
    refusals happen) cost nothing there. Only a model that plans is built for real and run.
    """
    if row.status == "not built":
        return row
    import tilegrad
    from tilegrad.split import streamable_part

    row.status = row.error = row.time = row.message = row.input = ""
    if row.source == "timm":
        row.setup = timm_model(row.name)
    shape = (1, row.channels, *(side or row.side or SIDE[row.ndim],) * row.ndim)
    torch.manual_seed(0)
    try:
        with _deadline(SECONDS):
            params, refusal, found = on_meta(row, shape)
            if row.side > shape[2]:  # the model refused that size in its own forward (:func:`_accepted`)
                shape = (*shape[:2], *(row.side,) * row.ndim)
            if params is not None and params > MAX_PARAMS:
                row.status, row.message = "not run", _too_large(params)
            elif refusal is not None:
                row.status, row.message = "refused", refusal
            else:
                _check(row, shape, found, tilegrad, streamable_part)
            return row
    except _Timeout as err:
        row.status, row.message = "not run", f"stopped: {err}"
        return row


def on_meta(
    row: Row, shape: tuple[int, ...] | None = None
) -> tuple[float | None, str | None, tuple[tuple[int, ...], int, str] | None]:
    """(parameters, refusal, (input shape, tile, too slow)) of the model of ``row`` built on the meta device (no
    memory, no initialisation): the refusal is the first line of the NotStreamableError that splitting or planning
    it raises; the shape and tile are those :func:`_tile` found, and "too slow" says why that input is not run here
    ("" when it is). (None, None, None) when the model cannot be built on the meta device (a constructor that
    computes on its tensors)."""
    import tilegrad
    from tilegrad.split import streamable_part

    shape = shape or (1, row.channels, *(row.side or SIDE[row.ndim],) * row.ndim)
    try:
        with torch.device("meta"):
            meta = row.build().double().eval()
    except Exception:
        return None, None, None
    params = float(sum(p.numel() for p in meta.parameters()))
    if params > MAX_PARAMS:
        return params, None, None
    shape = _accepted(meta, shape)
    row.side = shape[2] if shape[2] > (row.side or SIDE[row.ndim]) else row.side
    try:
        trunk, _ = streamable_part(meta)
        shape, tile, plan = _tile(trunk, shape, max(16, shape[2] * 2 // 3))
        slow = "" if plan is not None else _too_slow(trunk, shape, tile)
    except tilegrad.NotStreamableError as err:
        return params, f"{type(err).__name__}: {_first_line(err)}", None
    except Exception:  # meta tensors cannot do everything: the real run says what happens
        return params, None, None
    return params, None, (shape, tile, slow)


def _accepted(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape``, or the shape with the smallest larger side (in steps of 32, up to MAX_PIXELS) on which the plain
    model runs (on its device: on the meta device nothing is computed), when it refuses ``shape`` itself: timm's
    Inception-v3, -v4 and Inception-ResNet-v2 need at least 75 px, and timm has no ``min_input_size`` for them
    (torchvision has its weights' ``min_size``, :func:`_tv_min_side`)."""
    ndim = len(shape) - 2
    side = shape[2]
    device = next(model.parameters(), torch.empty(0, device="meta")).device
    while math.prod((side,) * ndim) <= MAX_PIXELS[ndim]:
        try:
            with torch.no_grad():
                model(torch.zeros((*shape[:2], *(side,) * ndim), device=device, dtype=torch.float64))
        except Exception:  # the model's own forward: too small for it, or something the meta device cannot do
            side += 32
            continue
        return (*shape[:2], *(side,) * ndim)
    return shape  # no size it accepts here: the check says what fails at the first one


def _too_slow(trunk: nn.Module, shape: tuple[int, ...], tile: int) -> str:
    """Why the input :func:`_tile` grew to is not run: the tile its halo needs, and, for a network that is one
    segment (no map between its layers lies on the image's grid, so no cut is offered), that the halo is the whole
    network's."""
    import tilegrad
    from tilegrad.graph import TrunkGraph

    why = "its halo"
    with contextlib.suppress(Exception):
        if not TrunkGraph(trunk, shape, torch.float64, training=True).candidates:
            why = (
                "the whole network's halo: no map between its layers lies on the image's grid (a strided layer "
                "without padding), so it streams as one segment"
            )
    # the smallest tile where the image border does not clip the halo: asked on a large input (on the meta device)
    large = (*shape[:2], *(8 * max(tile, 256),) * (len(shape) - 2))
    need = tile
    try:
        tilegrad.plan_streaming(trunk, large, tile_size=8, mode="stages", dtype=torch.float64)
    except tilegrad.GeometryError as err:
        found = re.search(r"use at least (\d+)", str(err))
        need = max(tile, int(found.group(1))) if found else tile
    except Exception:
        pass
    side = 32 * math.ceil(1.5 * need / 32)
    size = "x".join(map(str, [shape[1], *(side,) * (len(shape) - 2)]))
    return f"needs tiles of {need} px ({why}), an input of {size}: too slow for this CPU check"


def _too_large(params: float) -> str:
    return f"{params / 1e6:.0f}M parameters: over {MAX_PARAMS / 1e6:.0f}M, too slow for this CPU check"


def _check(
    row: Row,
    shape: tuple[int, ...],
    found: tuple[tuple[int, ...], int, str] | None,
    tilegrad: Any,
    streamable_part: Callable,
) -> Row:
    """The real run; ``found``: the input shape and tile planned on the meta device (not planned again here)."""
    try:
        model = row.build()
    except Exception as err:
        row.status, row.message = "not built", f"{type(err).__name__}: {_first_line(err)}"
        return row
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:  # when it could not be built on the meta device
        row.status, row.message = "not run", _too_large(params)
        return row
    model = model.double().eval()
    if found is None:  # not planned on the meta device: the size the model accepts, asked of the real one
        shape = _accepted(model, shape)
        row.side = shape[2] if shape[2] > (row.side or SIDE[row.ndim]) else row.side
    try:
        trunk, head = streamable_part(model)
        if found is None:
            shape, tile, plan = _tile(trunk, shape, max(16, shape[2] * 2 // 3))
            slow = "" if plan is not None else _too_slow(trunk, shape, tile)
        else:
            shape, tile, slow = found
    except _Timeout:
        raise
    except Exception as err:
        row.status = "refused" if isinstance(err, tilegrad.TilegradError) else "crash"
        row.message = f"{type(err).__name__}: {_first_line(err)}"
        return row
    row.input = "x".join(map(str, shape[1:])) + f", tile {tile}"
    if slow:
        row.status, row.message = "not run", slow
        return row
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    stream_error = seconds = infer_error = None
    stream_why = infer_why = ""
    crashed = False
    try:
        stream_error, seconds = _streamed(model, trunk, head, x, tile, tilegrad)
    except _Timeout:
        raise
    except Exception as err:
        crashed = not isinstance(err, tilegrad.TilegradError)
        stream_why = f"{type(err).__name__}: {_first_line(err)}"
    try:
        if (
            head is None
        ):  # infer is for fully convolutional networks: a classifier's is not run (saves a plan)
            infer_error, infer_why = _infer(trunk, shape, tile, row.ndim, tilegrad)
    except _Timeout:
        raise
    except Exception as err:
        crashed = crashed or not isinstance(err, tilegrad.TilegradError)
        infer_why = f"{type(err).__name__}: {_first_line(err)}"
    parts = []
    if stream_error is not None and seconds is not None:
        parts.append(f"out {stream_error[0]:.0e}, grads {stream_error[1]:.0e}")
        row.time = f"x{seconds[1] / seconds[0]:.1f} ({seconds[1]:.2f} s / {seconds[0]:.2f} s)"
    if infer_error is not None:
        parts.append(f"infer {infer_error:.0e}")
    row.error = "; ".join(parts)
    worst = max([*(stream_error or ()), infer_error or 0.0])
    if worst > EXACT:
        row.status = "NOT EXACT"
        if stream_error is not None and max(stream_error) > EXACT:
            moved = _conditioning(model, x)
            stream_why = (
                f"the plain float64 model itself moves by out {moved[0]:.0e}, grads {moved[1]:.0e} when its "
            )
            # ill-conditioned only when the model's own sensitivity explains the difference (review: the label was
            # given to every NOT EXACT row, so a real exactness bug in these rows would have passed)
            if max(stream_error) <= 10 * max(moved):
                stream_why += "input changes by 1e-16 (relative): ill-conditioned at random init"
            else:
                stream_why += (
                    "input changes by 1e-16 (relative), far less than the streamed difference: a bug"
                )
    elif stream_error is not None:
        row.status = "streamed exact"
    elif infer_error is not None:
        row.status = "infer exact"
    else:
        row.status = "crash" if crashed else "refused"
    row.message = stream_why or (f"infer: {infer_why}" if infer_why else "")
    return row


def _conditioning(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """How far the plain model's output and gradients (as :func:`_streamed` measures them) move when its input is
    changed at the level of float64 rounding: the floor under any reordering of its sums, streamed or not."""
    out = []
    for scale in (0.0, 1e-16):
        noise = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(4))
        xk = (x * (1 + scale * noise)).detach().requires_grad_(True)
        y = model(xk)
        cotangent = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(2))
        out.append((y.detach(), _grads(model, xk, y, cotangent)))
    (y0, g0), (y1, g1) = out
    top = max((g.abs().max().item() for g in g0), default=0.0) or 1.0
    return _rel(y1, y0), max((a - b).abs().max().item() / top for a, b in zip(g1, g0))


def _infer(
    trunk: nn.Module, shape: tuple[int, ...], tile: int, ndim: int, tilegrad: Any
) -> tuple[float | None, str]:
    """(max relative error of ``tilegrad.infer``, "") or (None, why not). infer plans one segment, whose halo is
    the whole trunk's: the tile grows to what the geometry asks, the input (up to MAX_PIXELS) to 1.5 tiles, so that
    the check has at least two tiles."""
    for _ in range(6):
        try:
            tilegrad.plan_streaming(
                trunk, shape, tile_size=tile, mode="lean", training=False, dtype=torch.float64
            )
        except tilegrad.GeometryError as err:
            found = re.search(r"use at least (\d+)", str(err))
            if not found:
                raise
            tile = int(found.group(1))
            if tile >= min(shape[2:]):
                side = 32 * math.ceil(1.5 * tile / 32)
                grown = (*shape[:2], *(side,) * ndim)
                if math.prod(grown[2:]) > MAX_PIXELS[ndim]:
                    return None, (
                        f"not run: its one-segment plan needs tiles of {tile} px, an input of "
                        f"{'x'.join(map(str, grown[1:]))}: too slow for this CPU check"
                    )
                shape = grown
            continue
        break
    else:
        return None, f"not run: no one-segment plan found for an input of {'x'.join(map(str, shape[1:]))}"
    # the smallest tile of a whole-network halo has cores of a few px (AttentionUnet at 64^3: 512 tiles of 36^3,
    # 250 s): the largest tile that still cuts the input, two tiles per axis
    tile = max(tile, 8 * ((min(shape[2:]) - 1) // 8))
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return _rel(tilegrad.infer(trunk, x, tile_size=tile, progress=False), trunk(x)), ""


def _streamed(
    model: nn.Module, trunk: nn.Module, head: nn.Module | None, x: torch.Tensor, tile: int, tilegrad: Any
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(max relative error of the output, of the gradients), (conventional seconds, streamed seconds)."""
    x = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    plain = model(x)
    cotangent = torch.randn(plain.shape, dtype=plain.dtype, generator=torch.Generator().manual_seed(2))
    expected = _grads(model, x, plain, cotangent)
    t1 = time.perf_counter()
    mode = _plan(trunk, tuple(x.shape), tile, tilegrad)[1]
    streamed = tilegrad.StreamingModule(trunk, tile_size=tile, mode=mode)
    features = streamed(x)
    out = head(features) if head is not None else features
    got = _grads(model, x, out, cotangent)
    t2 = time.perf_counter()
    # on the scale of the largest gradient: a bias right before a normalisation has a gradient that is zero up to
    # rounding, and its own scale would turn that rounding into an error of 1.0
    top = max((b.abs().max().item() for b in expected if b is not None), default=0.0) or 1.0
    grad_err = max(
        math.inf if (a is None) != (b is None) else 0.0 if a is None else (a - b).abs().max().item() / top
        for a, b in zip(got, expected)
    )
    return (_rel(out, plain), grad_err), (t1 - t0, t2 - t1)


# ---- the table ----------------------------------------------------------------------------------------------------

COLUMNS = (
    "model",
    "setup",
    "input",
    "status",
    "max rel. error (float64)",
    "streamed / conventional step",
    "why",
)
SECTIONS = {
    "torchvision": "torchvision classification (`torchvision.models.list_models(module=torchvision.models)`)",
    "torchvision.segmentation": "torchvision segmentation (the `out` tensor)",
    "monai": "MONAI (`monai.networks.nets`)",
    "timm": "timm: one model per family (`timm.list_modules()`)",
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def format_table(checked: list[Row]) -> str:
    lines = [f"{len(checked)} models: {summary(checked)}.", ""]
    for source, title in SECTIONS.items():
        mine = [r for r in checked if r.source == source]
        if not mine:
            continue
        lines += [f"### {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in mine:
            cells = (f"`{r.name}`", r.setup, r.input, r.status, r.error, r.time, r.message)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def parse_table(text: str) -> list[Row]:
    """The rows of the table between the markers of docs/models.md (inverse of :func:`format_table`)."""
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    titles = {v: k for k, v in SECTIONS.items()}
    source, found = None, []
    for line in body.splitlines():
        if line.startswith("### "):
            source = titles[line[4:].strip()]
        elif line.startswith("| `"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            name, setup, shape, status, error, seconds, message = cells
            found.append(Row(source or "", name.strip("`"), setup=setup, input=shape, status=status, error=error,
                             time=seconds, message=message))  # fmt: skip
    return found


def write_doc(checked: list[Row], out: Path = DOC) -> None:
    """Replace the table between the markers of docs/models.md; write the page to ``out``."""
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    out.write_text(f"{head}{BEGIN}\n\n{format_table(checked)}\n{END}{tail}")


def summary(checked: list[Row]) -> str:
    counts: dict[str, int] = {}
    for r in checked:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _no_network() -> None:
    """Nothing may be downloaded: a constructor that tries (pretrained weights by default) fails and says so."""
    import socket

    def refuse(*_: Any, **__: Any) -> None:
        raise OSError("model_coverage.py allows no download (a constructor tried to fetch weights)")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.create_connection = refuse  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", help="comma-separated model names (torchvision/MONAI names, timm family names)"
    )
    parser.add_argument(
        "--print", action="store_true", help="print the rows instead of writing docs/models.md"
    )
    parser.add_argument(
        "--seconds",
        type=int,
        default=SECONDS,
        help=f"limit per model (default {SECONDS}; more on a loaded machine)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DOC,
        help="write the page there (a copy of docs/models.md with the new rows)",
    )
    args = parser.parse_args(argv)
    globals()["SECONDS"] = args.seconds  # check() reads it
    # one thread: on 2 cores shared with other jobs, two OpenMP threads made a float64 DenseNet step 10x slower
    torch.set_num_threads(1)
    _no_network()
    listed = rows()
    wanted = set(args.only.split(",")) if args.only else None
    if wanted:
        unknown = wanted - {r.name for r in listed}
        if unknown:
            parser.error(f"unknown model(s) {sorted(unknown)}")
    previous = (
        {r.key: r for r in parse_table(DOC.read_text())} if DOC.exists() and BEGIN in DOC.read_text() else {}
    )
    for r in previous.values():  # the timm model standing for each family, as chosen before (choosing costs)
        if r.source == "timm" and r.setup:
            _TIMM_CHOICE.setdefault(r.name, r.setup)
    done = []
    start = time.perf_counter()
    for row in listed:
        if wanted is not None and row.name not in wanted:
            done.append(previous.get(row.key, row))
            continue
        t0 = time.perf_counter()
        check(row)
        print(f"{row.source:>24} {row.name:<28} {row.status:<15} {row.error:<40} {row.time:<26} "
              f"{time.perf_counter() - t0:6.1f}s {row.message[:100]}", file=sys.stderr, flush=True)  # fmt: skip
        done.append(row)
        if not args.print:  # after every row: an interrupted run keeps what it measured
            write_doc([*done, *(previous.get(r.key, r) for r in listed[len(done) :])], args.out)
    print(f"{len(done)} rows ({summary(done)}) in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.print:
        print(format_table([r for r in done if wanted is None or r.name in wanted]))
    else:
        write_doc(done, args.out)


if __name__ == "__main__":
    main()
