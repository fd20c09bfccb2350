"""``tilegrad memory``: predict per-layer and peak memory of a model at an input size, and whether it fits.

Examples::

    tilegrad memory resnet34 --input 3x224x224 --batch 32 --optimizer sgd
    tilegrad memory resnet34 --input 3x8192x8192 --budget 8GiB          # suggests a streaming tile
    tilegrad memory resnet34 --input 3x8192x8192 --tile 1024 --json
    tilegrad memory my_models.py:build --input 1x128x128x128 --mode infer --plot layers.png
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from ..errors import NotStreamableError, ShapeError, TilegradError

__all__ = ["parse_input", "register"]

_DTYPES = ("float32", "float64", "float16", "bfloat16")


def parse_input(text: str) -> tuple[int, ...]:
    """Read ``--input``: channels then spatial extent of one sample, ``3x224x224`` or ``1x128x128x128``.

    >>> parse_input("3x224x224")
    (3, 224, 224)
    >>> parse_input("1,64,64,64")
    (1, 64, 64, 64)
    """
    parts = [p for p in re.split(r"[x,X* ]", text.strip()) if p]
    if len(parts) < 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ShapeError(
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
    parser.add_argument("--dtype", choices=_DTYPES, default="float32")
    parser.add_argument(
        "--optimizer", choices=("none", "sgd", "adam", "adamw"), default="none",
        help="optimizer state to include: sgd = momentum (1x parameters), adam/adamw = 2x (default none)",
    )  # fmt: skip
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cpu adds the scratch buffers of the CPU convolution kernels; cuda leaves out cuDNN workspaces",
    )  # fmt: skip
    parser.add_argument("--tile", help="stream the model's trunk in tiles of this size: 1024 or 512x512")
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
        raise ShapeError(
            f"cannot read --tile {text!r}: expected one positive integer (e.g. 1024) or one per spatial dim "
            f"({ndim} here, e.g. {'x'.join(['512'] * ndim)})"
        )
    values = tuple(int(p) for p in parts)
    return values[0] if len(values) == 1 else values


def _streamed(model: Any, tile: Any, budget: int | None) -> tuple[Any, list[str]]:
    """(streamed trunk + head as one model, notes). BatchNorm in the trunk is frozen, which is said aloud."""
    from torch import nn

    from .. import StreamingModule, split_model

    try:
        trunk, head = split_model(model)
    except TilegradError as err:
        raise NotStreamableError(
            f"cannot split {type(model).__name__} into a streamable trunk and a head: {err}"
        ) from err
    notes = []
    norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if norms:
        for m in norms:
            m.eval()
        notes.append(
            f"{len(norms)} BatchNorm layers of the trunk were put in eval mode (frozen statistics) for streaming: "
            "a tile cannot see whole-image batch statistics"
        )
    streamed = StreamingModule(trunk, tile_size=tile, memory_budget=budget)
    return nn.Sequential(streamed, head), notes


def run(args: argparse.Namespace) -> int:
    import torch

    from ..memory.estimate import estimate_memory
    from ..memory.resolve import resolve_model
    from ..units import format_bytes, parse_bytes

    sample = parse_input(args.input)
    if args.batch < 1:
        raise ShapeError(f"--batch must be a positive integer, received {args.batch}")
    shape = (args.batch, *sample)
    budget = parse_bytes(args.budget) if args.budget else None
    optimizer = None if args.optimizer == "none" else args.optimizer
    factory, label = resolve_model(args.model)
    with torch.device("meta"):
        model = factory()

    notes: list[str] = []
    target = model
    if args.tile:
        target, notes = _streamed(model, _parse_tile(args.tile, len(sample) - 1), None)
        label = f"{label} (trunk streamed, tile {args.tile})"
    common = {"mode": args.mode, "dtype": args.dtype, "optimizer": optimizer, "device": args.device}
    report = estimate_memory(target, shape, name=label, **common)

    suggestion: dict[str, Any] | None = None
    if budget is not None and report.peak_bytes > budget and not args.tile:
        fixed = report.parameter_bytes + report.buffer_bytes + report.input_bytes
        if args.mode == "train":
            fixed += report.gradient_bytes + report.optimizer_bytes
        if fixed > budget:
            suggestion = {
                "tile": None,
                "message": f"parameters, buffers, input{', gradients and optimizer state' if args.mode == 'train' else ''}"
                f" alone need {format_bytes(fixed)}: no tile size can bring this under the budget",
            }
        else:
            suggestion = _suggest_tile(factory, shape, budget, common, label)

    if args.plot:
        report.plot(args.plot)
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
    if args.plot:
        print(f"per-layer chart written to {args.plot}")
    return 0


def _suggest_tile(
    factory: Any, shape: tuple[int, ...], budget: int, common: dict, label: str
) -> dict[str, Any]:
    """Ask the streaming planner for a tile that fits the budget, then check it with a full simulation."""
    import torch

    from ..errors import GeometryError, MemoryBudgetError
    from ..memory.estimate import estimate_memory
    from ..units import format_bytes

    with torch.device("meta"):
        model = factory()
    try:
        target, _ = _streamed(model, "auto", budget)
        report = estimate_memory(target, shape, name=label, **common)
    except NotStreamableError as err:
        return {"tile": None, "message": f"streaming cannot help here: {err}"}
    except (MemoryBudgetError, GeometryError) as err:
        return {"tile": None, "message": f"no streaming plan fits either: {err}"}
    plan = target[0].last_plan
    if plan is None or plan.conventional:
        return {"tile": None, "message": "the streaming planner found no streamed plan for this budget"}
    tile = "x".join(map(str, plan.tile_size))
    fits = report.peak_bytes <= budget
    message = (
        f"streamed with --tile {tile} (planner's choice for this budget) the predicted peak is "
        f"{format_bytes(report.peak_bytes)}: it {'fits' if fits else 'still does NOT fit; try a smaller --tile'}"
    )
    return {"tile": list(plan.tile_size), "peak_bytes": report.peak_bytes, "fits": fits, "message": message}
