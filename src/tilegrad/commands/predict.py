"""``tilegrad predict``: per-slide class probabilities of a trained checkpoint, written to CSV."""

from __future__ import annotations

import argparse
import math

from ._options import add_checkpoint_tiling, add_trust_model_code


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="write per-slide probabilities of a trained model to CSV",
        description="Run a checkpoint from `tilegrad train` over the slides of a CSV (column image, optional "
        "label) and write image,[label,]probability (two classes) or prob_0,prob_1,... to OUT.csv.",
    )
    p.add_argument("checkpoint", help="checkpoint.pt or best.pt from tilegrad train")
    p.add_argument("csv", help="CSV with an image column (paths relative to the CSV)")
    p.add_argument("out", help="output CSV")
    add_checkpoint_tiling(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--check-images", action="store_true", help="decode every image completely before predicting"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_trust_model_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import predict

    result = predict(
        args.checkpoint,
        args.csv,
        args.out,
        device=args.device,
        tile_size=args.tile,
        budget=args.budget,
        progress=not args.no_progress,
        check_images=args.check_images,
        overwrite=args.overwrite,
        trust_model_code=args.trust_model_code,
    )
    summary = f"wrote {len(result['probs'])} predictions to {args.out}"
    if not math.isnan(result["auc"]):
        summary += f" (AUC {result['auc']:.3f}, loss {result['loss']:.4f})"
    print(summary)
    return 0
