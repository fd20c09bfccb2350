"""``tilegrad plan MODEL --input 3x8192x8192 --budget 2GiB``: how tilegrad would stream a trunk, before running it."""

from __future__ import annotations

import argparse
import json
import math


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="show the streaming plan (segments, tiles, predicted peak and time) for a model and input size",
        description=(
            "Split MODEL into its streamable trunk (tilegrad.split_model: torchvision and timm classifiers, MONAI "
            "classification networks, an nn.Sequential; the whole model when it has no head) and show "
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
    p.add_argument(
        "--lazy",
        action="store_true",
        help="the image is read lazily from disk (a slide): it does not count against the budget",
    )
    p.add_argument(
        "--head",
        choices=("max", "avg", "attention"),
        help="plan with a streamed head (tilegrad.heads): the trunk's output is reduced tile by tile, never stored",
    )
    p.add_argument(
        "--tiers",
        choices=("auto", "device", "host", "disk", "recompute"),
        default="auto",
        help="where boundary tensors between segments live (default: the device while they fit, then disk; "
        "statistic inputs recomputed by their readers where that is faster; recompute: every statistic input)",
    )
    p.add_argument(
        "--scratch-dir",
        help="directory for boundary tensors on disk; its free space is compared with the plan's disk bytes",
    )
    p.add_argument(
        "--train-norm",
        action="store_true",
        help="normalisation layers in training mode (batch statistics over the whole image, streamed), as "
        "`tilegrad train --no-freeze-norm` runs them; default: eval mode (running statistics), as --freeze-norm",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models.resolve import resolve_model
    from ..plan import plan_streaming
    from ..split import streamable_part
    from ..units import format_bytes
    from .memory import parse_input

    factory, label = resolve_model(args.model)
    model = factory().eval()
    trunk, _ = streamable_part(
        model
    )  # a model without a head (a U-Net) is planned whole, as `tilegrad memory` does
    if args.train_norm:
        from ..train.model import NORM_TYPES

        for m in trunk.modules():
            if isinstance(m, NORM_TYPES):
                m.train()
    shape = (args.batch, *parse_input(args.input))
    head = None
    if args.head is not None:
        from ..heads import AttentionMIL, GlobalPool
        from ..plan import TrunkGraph

        channels = TrunkGraph(trunk, shape, torch.float32, training=True)
        features = channels.shape(channels.output)[1]
        head = AttentionMIL(features) if args.head == "attention" else GlobalPool(args.head)
    plan = plan_streaming(
        trunk,
        shape,
        tile_size=args.tile if args.tile else "auto",
        memory_budget=args.budget,  # bytes or a string such as 2GiB
        mode=args.mode,
        input_in_memory=not args.lazy,
        head=head,
        tiers=args.tiers,
    )
    free = _free_bytes(args.scratch_dir) if plan.disk_bytes else None
    if args.json:
        scratch = {"scratch_dir": _scratch_path(args.scratch_dir), "scratch_free_bytes": free}
        if free is not None and free < 0:
            scratch["scratch_free_bytes"] = None
            scratch["scratch_problem"] = "does not exist or cannot be read"
        print(json.dumps({"model": label, **plan.to_dict(), **scratch}, indent=2))
    else:
        print(f"{label}:")
        print(plan)
        pixels = math.prod(shape[2:]) * shape[0] / 1e6
        seconds = plan.time_ratio * plan.conventional_seconds
        print(
            f"memory per tier: device {format_bytes(plan.peak_bytes)} (peak), host {format_bytes(plan.host_bytes)}, "
            f"disk {format_bytes(plan.disk_bytes)}; predicted {seconds / pixels:.3g} s per megapixel per step "
            "(cost model, NOTE [ Cost model ] in plan.py)"
        )
        if free is not None and free < 0:
            print(
                f"warning: the scratch directory {_scratch_path(args.scratch_dir)} does not exist or cannot be read; "
                f"the plan needs {format_bytes(plan.disk_bytes)} there: create it, or pass --scratch-dir a directory "
                "with enough free space"
            )
        elif free is not None and free < plan.disk_bytes:
            print(
                f"warning: the scratch directory {_scratch_path(args.scratch_dir)} has {format_bytes(free)} free, "
                f"the plan needs {format_bytes(plan.disk_bytes)}: pass --scratch-dir on a larger disk"
            )
    return 0


def _scratch_path(scratch_dir: str | None) -> str:
    import tempfile

    return scratch_dir or tempfile.gettempdir()


def _free_bytes(scratch_dir: str | None) -> int:
    """Free bytes in the scratch directory, or -1 when it does not exist or cannot be read."""
    import os

    try:
        stat = os.statvfs(_scratch_path(scratch_dir))
    except OSError:
        return -1
    return stat.f_bavail * stat.f_frsize
