"""``tilegrad demo``: synthetic whole slides, streamed full-resolution training vs 8x-downsampled training."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="end-to-end demo: synthetic slides, streamed vs downsampled training, saliency, plots (~5 min CPU)",
        description="Generate synthetic whole slides (texture from scikit-image's IHC sample) whose tiny lesions "
        "vanish when downsampled 8x; train the same small CNN streamed at full resolution and conventionally on "
        "8x-downsampled copies; print both validation AUCs and peak memory; write saliency maps and learning curves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--out",
        help="output directory (created; a previous demo's is replaced); default tilegrad-demo, or "
        "tilegrad-demo-gigapixel with --gigapixel",
    )
    p.add_argument("--quick", action="store_true", help="a much smaller run (a smoke test, not a result)")
    p.add_argument(
        "--gigapixel",
        action="store_true",
        help="the same task on a few 16384x16384 slides (268 MP each) written as pyramidal TIFFs to a temporary "
        "directory and read lazily, trained streamed with the attention head; prints the plan and seconds per "
        "megapixel, writes attention maps (slow: about an hour on 2 CPU cores)",
    )
    p.add_argument("--size", type=int, help="with --gigapixel: the slides' side in pixels (default 16384)")
    p.add_argument("--epochs", type=int, help="override the number of epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..train.demo import DemoSettings, quick_settings, run_demo

    if args.gigapixel:
        from ..train.demo import GigapixelSettings, gigapixel_quick_settings, run_gigapixel_demo

        big = gigapixel_quick_settings() if args.quick else GigapixelSettings()
        big.seed = args.seed
        if args.epochs is not None:
            big.epochs = args.epochs
        if args.size is not None:
            if args.size < big.patch or args.size % big.patch:
                raise ConfigError(
                    f"--size must be a positive multiple of {big.patch} (the tissue patch), received {args.size}"
                )
            big.size = args.size
        summary = run_gigapixel_demo(
            args.out or "tilegrad-demo-gigapixel", big, progress=not args.no_progress
        )
        print(f"demo finished in {summary['seconds']:.0f} s")
        return 0
    if args.size is not None:
        raise ConfigError("--size sets the slides of --gigapixel; the ordinary demo's slides are fixed")
    settings = quick_settings() if args.quick else DemoSettings()
    settings.seed = args.seed
    if args.epochs is not None:
        settings.epochs = args.epochs
    summary = run_demo(args.out or "tilegrad-demo", settings, progress=not args.no_progress)
    print(f"demo finished in {summary['seconds']:.0f} s")
    return 0
