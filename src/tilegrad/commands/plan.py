"""``tilegrad plan MODEL --input 3x8192x8192 --budget 2GiB``: how tilegrad would stream a trunk, before running it."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="show the streaming plan (segments, tiles, predicted peak and time) for a model and input size",
        description=(
            "Split MODEL into its streamable trunk (torchvision ResNet/VGG/DenseNet, an nn.Sequential, or the whole "
            "model when it has no head) and show "
            "how tilegrad would stream it at the given input size: segments, tile per segment, number of tiles, "
            "predicted training peak and predicted time relative to conventional backprop. Nothing is allocated."
        ),
    )
    p.add_argument("model", help="torchvision or tilegrad model name, or package.module:factory")
    p.add_argument("--input", required=True, help="C x H x W or C x D x H x W, e.g. 3x8192x8192")
    p.add_argument("--batch", type=int, default=1)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--tile", type=int, help="tile extent in input pixels, halo included")
    size.add_argument("--budget", help="memory budget such as 2GiB: the fastest plan that fits")
    p.add_argument("--mode", choices=("auto", "lean", "stages"), default="auto")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.resolve import resolve_model
    from ..plan import plan_streaming
    from ..split import streamable_part
    from .memory import parse_input

    factory, label = resolve_model(args.model)
    model = factory().eval()
    trunk, _ = streamable_part(
        model
    )  # a model without a head (a U-Net) is planned whole, as `tilegrad memory` does
    shape = (args.batch, *parse_input(args.input))
    plan = plan_streaming(
        trunk,
        shape,
        tile_size=args.tile if args.tile else "auto",
        memory_budget=args.budget,  # bytes or a string such as 2GiB
        mode=args.mode,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "model": label,
                    "input": list(shape),
                    "conventional": plan.conventional,
                    "peak_bytes": plan.peak_bytes,
                    "time_ratio": plan.time_ratio,
                    "segments": [
                        {"layers": s.name, "tile": list(s.tile), "tiles": len(s.grid), "overlap": s.overlap}
                        for s in plan.segments
                    ],
                },
                indent=2,
            )
        )
    else:
        print(f"{label}:")
        print(plan)
    return 0
