"""``tilegrad saliency``: heat map of the input gradient of a trained model's prediction over a slide, or (with
``--attention``) the attention map of an attention-MIL model."""

from __future__ import annotations

import argparse

from ._options import add_checkpoint_tiling, add_trust_model_code


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
    p.add_argument(
        "--attention",
        action="store_true",
        help="for a model trained with --head attention: write its attention map (softmax over the slide, one "
        "value per trunk-output position) as OUT.npy and OUT.tiff (float32) and over a thumbnail as OUT.png",
    )
    p.add_argument("--target", type=int, help="class whose score is explained (default: the predicted class)")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, help="pyramid level (default: as in training)")
    res.add_argument("--mpp", type=float, help="resolution in micrometres per pixel")
    p.add_argument("--max-side", type=int, default=1024, help="longer side of the thumbnail and the .npy map")
    add_checkpoint_tiling(p)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT.png and OUT.npy (and OUT.tiff with --attention) if they exist",
    )
    add_trust_model_code(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..train.saliency import attention_saliency, saliency

    if args.attention:
        if args.target is not None:
            raise ConfigError(
                "--target picks the class whose gradient is drawn; the attention map is one for all classes. "
                "Leave out --target with --attention"
            )
        found = attention_saliency(
            args.checkpoint,
            args.image,
            args.out,
            level=args.level,
            mpp=args.mpp,
            max_side=args.max_side,
            device=args.device,
            tile_size=args.tile,
            budget=args.budget,
            overwrite=args.overwrite,
            trust_model_code=args.trust_model_code,
        )
        k = int(found.probabilities.argmax())
        h, w = found.map.shape
        print(
            f"P(class {k}) = {found.probabilities[k]:.4f}; wrote {found.png}, {found.npy} and {found.tiff} "
            f"(attention {h}x{w}, 1 value per {found.stride[0]:g}x{found.stride[1]:g} px, summing to 1)"
        )
        return 0

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
