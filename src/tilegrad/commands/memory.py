"""``tilegrad memory``: predict per-layer and peak memory of a model at an input size, and whether it fits.

Examples::

    tilegrad memory resnet34 --input 3x224x224 --batch 32 --optimizer sgd
    tilegrad memory resnet34 --input 3x8192x8192 --budget 8GiB          # suggests a streaming tile
    tilegrad memory resnet34 --input 3x8192x8192 --tile 1024 --json
    tilegrad memory my_models.py:build --input 1x128x128x128 --mode infer --plot layers.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from typing import Any

from ..dtypes import DTYPE_NAMES
from ..errors import ConfigError, NotStreamableError
from ..optim import OPTIMIZERS

__all__ = ["parse_input", "register"]


def parse_input(text: str) -> tuple[int, ...]:
    """Read ``--input``: channels then spatial extent of one sample, ``3x224x224`` or ``1x128x128x128``.

    >>> parse_input("3x224x224")
    (3, 224, 224)
    >>> parse_input("1,64,64,64")
    (1, 64, 64, 64)
    """
    parts = [p for p in re.split(r"[x,X* ]", text.strip()) if p]
    if len(parts) < 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(
            f"cannot read --input {text!r}: expected channels and spatial size of one sample as positive integers "
            "joined by 'x', e.g. 3x224x224 (2D) or 1x128x128x128 (3D); the batch goes in --batch"
        )
    return tuple(int(p) for p in parts)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "memory",
        help="predict per-layer and peak memory of a model at an input size",
        description=(
            "Predict per-layer outputs, bytes saved for backward and the peak memory of a training step (or a "
            "forward pass) without allocating anything: the model runs on meta tensors. Says whether the peak "
            "fits --budget and, if not, which streaming tile would."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    parser.add_argument(
        "model",
        help="a torchvision model name (resnet34, vgg16, densenet121, ...), a tilegrad model name, or "
        "package.module:factory / path/to/file.py:factory (a callable without arguments returning the model)",
    )
    parser.add_argument("--input", required=True, help="channels x spatial size of one sample: 3x224x224")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument(
        "--mode", choices=("train", "infer"), default="train", help="training step or forward"
    )
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    parser.add_argument(
        "--optimizer", choices=("none", *sorted(OPTIMIZERS)), default="none",
        help="optimizer state to include: sgd = momentum (1x parameters), adam/adamw = 2x (default none)",
    )  # fmt: skip
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cpu adds the scratch buffers of the CPU convolution kernels; cuda leaves out cuDNN workspaces",
    )  # fmt: skip
    parser.add_argument(
        "--tile",
        help="stream the model's trunk (the whole model if it has no global pooling or classifier) in tiles of "
        "this size: 1024 or 512x512",
    )
    parser.add_argument(
        "--budget", help="memory budget, e.g. 8GiB: say whether the peak fits, suggest a tile"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", metavar="PNG", help="write a per-layer bar chart (matplotlib)")
    parser.add_argument("--rows", type=int, default=None, help="show at most this many layer rows")
    parser.set_defaults(func=run)


def _parse_tile(text: str, ndim: int) -> int | tuple[int, ...]:
    parts = [p for p in re.split(r"[x,X ]", text.strip()) if p]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) not in (1, ndim):
        raise ConfigError(
            f"cannot read --tile {text!r}: expected one positive integer (e.g. 1024) or one per spatial dim "
            f"({ndim} here, e.g. {'x'.join(['512'] * ndim)})"
        )
    values = tuple(int(p) for p in parts)
    return values[0] if len(values) == 1 else values


@dataclasses.dataclass
class _Streamed:
    """A model with its trunk (or all of it) in a StreamingModule, ready for estimate_memory."""

    model: Any  # what to estimate: Sequential(streamed trunk, head), or the StreamingModule alone
    streaming: Any  # the StreamingModule, for its plan
    notes: list[str]
    whole: bool  # no head: the whole model is streamed


def _streamed(model: Any, tile: Any, budget: int | None, *, train: bool) -> _Streamed:
    """Stream the trunk of ``model`` (split.streamable_part: the whole model when it has no head, no global pooling,
    Flatten or Linear anywhere, as a U-Net). BatchNorm of the streamed part is frozen for training, which is said
    aloud."""
    from torch import nn

    from ..split import streamable_part
    from ..stream import StreamingModule

    notes = []
    trunk, head = streamable_part(model)
    whole = head is None
    if whole:
        notes.append(
            f"{type(model).__name__} has no global pooling or classifier (fully convolutional): the whole model "
            "is streamed"
        )
    norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    if norms and train:
        notes.append(
            f"{len(norms)} BatchNorm layers of the {'model' if whole else 'trunk'} were put in eval mode (frozen "
            "statistics) for streaming: a tile cannot see whole-image batch statistics"
        )
    streamed = StreamingModule(trunk, tile_size=tile, memory_budget=budget)
    return _Streamed(streamed if whole else nn.Sequential(streamed, head), streamed, notes, whole)


def _tile_text(tile: tuple[int, ...]) -> str:
    """The --tile text that reproduces ``tile``: one number for a square/cubic tile."""
    return str(tile[0]) if len(set(tile)) == 1 else "x".join(map(str, tile))


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that would be ignored or fail only after a long estimate."""
    import importlib.util
    from pathlib import Path

    from ..errors import MissingDependencyError

    if args.rows is not None and args.rows < 0:
        raise ConfigError(
            f"--rows must be 0 or more (how many layer rows to show; leave it out for all), received {args.rows}"
        )
    if args.mode == "infer" and args.optimizer != "none":
        raise ConfigError(
            f"--optimizer {args.optimizer} has no effect with --mode infer: a forward pass has no optimizer step "
            "and no gradients. Drop --optimizer, or use --mode train"
        )
    if args.plot:
        parent = Path(args.plot).expanduser().resolve().parent
        if not parent.is_dir():
            raise ConfigError(
                f"cannot write --plot {args.plot}: the directory {parent} does not exist; create it or choose "
                "another path"
            )
        if importlib.util.find_spec("matplotlib") is None:
            raise MissingDependencyError(
                "--plot needs matplotlib, which is not installed: pip install 'tilegrad[plot]' (or drop --plot)"
            )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..memory.estimate import estimate_memory
    from ..models.resolve import resolve_model
    from ..units import format_bytes, parse_bytes

    sample = parse_input(args.input)
    if args.batch < 1:
        raise ConfigError(f"--batch must be a positive integer, received {args.batch}")
    _check_options(args)
    shape = (args.batch, *sample)
    budget = parse_bytes(args.budget) if args.budget else None
    optimizer = None if args.optimizer == "none" else args.optimizer
    train = args.mode == "train"
    factory, label = resolve_model(args.model)
    with torch.device("meta"):
        model = factory()

    notes: list[str] = []
    target = model
    tile = None
    if args.tile:
        tile = _parse_tile(args.tile, len(sample) - 1)
        streamed = _streamed(model, tile, None, train=train)
        target, notes = streamed.model, streamed.notes
        label = f"{label} ({'streamed' if streamed.whole else 'trunk streamed'}, tile {args.tile})"
    common = {"mode": args.mode, "dtype": args.dtype, "optimizer": optimizer, "device": args.device}
    try:
        report = estimate_memory(target, shape, name=label, **common)
    except NotStreamableError as err:
        if not (args.tile and streamed.whole):
            raise
        raise NotStreamableError(
            f"{type(model).__name__} has no global pooling or classifier, so the whole model was streamed, but {err}. "
            "Streaming and tiled inference (tilegrad infer) need a model of local layers: replace that layer (e.g. "
            "BatchNorm in eval mode instead of instance or group norm), or drop --tile for the unstreamed estimate"
        ) from err

    suggestion: dict[str, Any] | None = None
    if budget is not None and report.peak_bytes > budget:
        fixed = report.parameter_bytes + report.buffer_bytes + report.input_bytes
        if train:
            fixed += report.gradient_bytes + report.optimizer_bytes
        if fixed > budget:
            suggestion = {
                "tile": None,
                "message": f"parameters, buffers, input{', gradients and optimizer state' if train else ''}"
                f" alone need {format_bytes(fixed)}: no tile size can bring this under the budget",
            }
        else:
            below = None if tile is None else max((tile,) if isinstance(tile, int) else tile)
            optimizer_bytes = report.optimizer_bytes if train else 0
            suggestion = _suggest_tile(factory, shape, budget, common, args.model, below, optimizer_bytes)

    written = None
    if args.plot:
        try:
            written = report.plot(args.plot)
        except OSError as err:
            raise ConfigError(f"cannot write --plot {args.plot}: {err.strerror or err}") from err
    if args.json:
        out = report.to_dict()
        out["cli_notes"] = notes
        if budget is not None:
            out["budget_bytes"] = budget
            out["fits"] = report.peak_bytes <= budget
            out["suggestion"] = suggestion
        print(json.dumps(out, indent=2))
        return 0

    print(report.table(max_rows=args.rows))
    for note in notes:
        print(f"note: {note}")
    if budget is not None:
        verdict = "fits" if report.peak_bytes <= budget else "does NOT fit"
        print(
            f"budget {format_bytes(budget)}: the predicted peak {format_bytes(report.peak_bytes)} {verdict}"
        )
        if suggestion is not None:
            print(suggestion["message"])
    if written is not None:
        print(f"per-layer chart written to {written}")
    return 0


def _suggest_tile(
    factory: Any,
    shape: tuple[int, ...],
    budget: int,
    common: dict,
    spec: str,
    below: int | None,
    optimizer_bytes: int,
) -> dict[str, Any]:
    """The planner's tile for ``budget``, and the full simulation of that tile as ``--tile`` runs it.

    The tile comes from :func:`tilegrad.plan_streaming`, asked as ``tilegrad plan --budget`` asks it (tile_size
    "auto"; the optimizer state, which the planner does not count, is taken off the budget first), so both commands
    name the same tile. It is then simulated exactly as ``--tile`` would run it (that fixed tile, no budget given
    to the planner), so the printed peak is what a rerun with that ``--tile`` shows; the planner's own figure is a
    quick estimate and can be off both ways, which the message says when it is. ``below``: the user's --tile, which
    did not fit.
    """
    import torch

    from ..dtypes import parse_dtype
    from ..errors import GeometryError, MemoryBudgetError
    from ..memory.estimate import estimate_memory
    from ..plan import plan_streaming
    from ..units import format_bytes

    infer = common["mode"] == "infer"
    with torch.device("meta"):
        model = factory()
    asked = (
        f"the planner (as `tilegrad infer --budget {format_bytes(budget)}` asks it)"
        if infer
        else f"the planner (`tilegrad plan --budget {format_bytes(budget)}`)"
    )
    try:
        trunk = _streamed(model, "auto", budget, train=not infer).streaming.module
        options: dict[str, Any] = {"training": False, "mode": "lean"} if infer else {}
        plan = plan_streaming(
            trunk,
            shape,
            tile_size="auto",
            memory_budget=max(1, budget - optimizer_bytes),
            dtype=parse_dtype(common["dtype"]),
            **options,
        )
    except NotStreamableError as err:
        if infer:
            message = (
                "tiled inference (tilegrad infer, tilegrad.infer) runs a fully convolutional model of local "
                f"layers tile by tile, but this one cannot be tiled: {err}"
            )
        else:
            message = f"streaming cannot help here: {err}"
        return {"tile": None, "message": message}
    except (MemoryBudgetError, GeometryError) as err:
        return {"tile": None, "message": f"no streamed tile fits: {asked} finds none. {err}"}
    tile = tuple(plan.tile_size)
    if plan.conventional or all(t >= s for t, s in zip(tile, shape[2:])):
        return {
            "tile": None,
            "message": (
                f"{asked} would run it unstreamed: its quick estimate, {format_bytes(plan.peak_bytes)}, is within "
                "the budget, but the full simulation above is not. Give a smaller --budget to the planner, or "
                "try a --tile"
            ),
            "plan": str(plan),
        }
    text = _tile_text(tile)
    if below is not None and max(tile) >= below:
        return {
            "tile": None,
            "message": f"{asked} chooses tile {text}, not smaller than --tile {below}: raise the budget",
            "plan": str(plan),
        }
    with torch.device("meta"):
        model = factory()
    streamed = _streamed(model, tile[0] if len(set(tile)) == 1 else tile, None, train=not infer)
    report = estimate_memory(streamed.model, shape, name=f"{spec} (streamed, tile {text})", **common)
    fits = report.peak_bytes <= budget
    extra = "".join(f"; {note}" for note in streamed.notes)
    if fits:
        message = (
            f"streamed with --tile {text} the predicted peak is {format_bytes(report.peak_bytes)}: it fits "
            f"({asked} chooses this tile{extra})"
        )
        if infer and streamed.whole:
            message += (
                f". To run it, `tilegrad infer` or tilegrad.infer(model, source, tile_size={text}, out=...) "
                "also writes the output tile by tile instead of holding it whole as counted here"
            )
    else:
        message = (
            f"{asked} chooses tile {text} (its quick estimate {format_bytes(plan.peak_bytes)}), but streamed with "
            f"--tile {text} the simulated peak is {format_bytes(report.peak_bytes)}: it does NOT fit. Raise the "
            "budget, reduce --batch or the input, or try a smaller --tile"
        )
        if infer and streamed.whole:
            message += (
                ". These estimates hold the whole output in memory; `tilegrad infer` / tilegrad.infer(model, "
                "source, tile_size=..., out=...) writes it tile by tile to an array on disk instead"
            )
    return {
        "tile": list(tile),
        "peak_bytes": report.peak_bytes,
        "fits": fits,
        "message": message,
        "plan": str(plan),
    }
