"""``tilegrad saliency``: heat map of the input gradient of a trained model's prediction over a slide."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "saliency",
        help="gradient of the prediction w.r.t. the slide, as a heat map over a thumbnail",
        description="Compute |d score / d pixel| through the streamed model (exact, tile by tile), write it as a "
        "heat map over a thumbnail (OUT.png) and as a low-resolution array (OUT.npy).",
    )
    p.add_argument("checkpoint", help="checkpoint.pt or best.pt from tilegrad train")
    p.add_argument("image", help="slide image")
    p.add_argument("out", help="output PNG (the array goes next to it with suffix .npy)")
    p.add_argument("--target", type=int, help="class whose score is explained (default: the predicted class)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, help="pyramid level (default: as in training)")
    res.add_argument("--mpp", type=float, help="resolution in micrometres per pixel")
    p.add_argument("--max-side", type=int, default=1024, help="longer side of the thumbnail and the .npy map")
    tiling = p.add_mutually_exclusive_group()
    tiling.add_argument("--tile", type=int, help="tile size (default: as in training)")
    tiling.add_argument("--budget", help="memory budget such as 2GiB")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.png and OUT.npy if it exists")
    p.add_argument(
        "--trust-model-code",
        action="store_true",
        help="let the checkpoint's model spec import and call code outside the known model libraries (only for "
        "checkpoints you trust; see docs/training.md)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.saliency import saliency

    result = saliency(
        args.checkpoint,
        args.image,
        args.out,
        target=args.target,
        level=args.level,
        mpp=args.mpp,
        max_side=args.max_side,
        device=args.device,
        tile_size=args.tile,
        budget=args.budget,
        overwrite=args.overwrite,
        trust_model_code=args.trust_model_code,
    )
    print(
        f"P(class {result.target}) = {result.probabilities[result.target]:.4f}; wrote {result.png} and "
        f"{result.npy} ({result.map.shape[0]}x{result.map.shape[1]}, 1 value per {result.factor}x{result.factor} px)"
    )
    return 0
