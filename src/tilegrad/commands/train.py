"""``tilegrad train``: train a slide classifier end to end on whole slides with slide-level labels."""

from __future__ import annotations

import argparse
import json

from ..dtypes import PARAMETER_DTYPES
from ..errors import ConfigError
from ..optim import OPTIMIZERS
from ..train.model import HEADS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a CNN on whole slides with slide-level labels (streamed, exact gradients)",
        description="Train a CNN end to end on whole slides listed in a CSV (columns image,label[,split]; paths "
        "relative to the CSV). Works under torchrun for data-parallel training: "
        "torchrun --nproc_per_node=N -m tilegrad train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("csv", help="dataset CSV with columns image,label[,split]")
    p.add_argument("--out", required=True, help="run directory: checkpoint.pt, best.pt, log.csv")
    p.add_argument("--resume", action="store_true", help="continue the run in --out if it has a checkpoint")
    p.add_argument("--val-csv", help="extra validation CSV (in addition to rows with split 'val')")
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default="resnet18",
        help="torchvision name (resnet18, densenet121, vgg16, ...), small_cnn, or package.module:factory",
    )
    m.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the model factory")
    m.add_argument(
        "--pretrained", action="store_true", help="torchvision ImageNet weights (from the local cache)"
    )
    m.add_argument("--imagenet-norm", action="store_true", help="normalise input with ImageNet mean/std")
    m.add_argument(
        "--head",
        choices=HEADS,
        default="max",
        help="the head on the trunk's output map: global max or average pooling + a linear classifier, or gated "
        "attention-MIL (tilegrad.heads.AttentionMIL; read its attention map with tilegrad saliency --attention)",
    )
    m.add_argument(
        "--head-kwargs",
        default="{}",
        help='JSON keyword arguments for --head attention, e.g. \'{"hidden": 128, "dropout": 0.25}\'',
    )
    m.add_argument("--pool", dest="head", choices=("max", "avg"), help=argparse.SUPPRESS)  # the old name
    m.add_argument(
        "--freeze-norm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep BatchNorm/InstanceNorm in eval mode with their running statistics (default; affine weights still "
        "train). --no-freeze-norm trains them with statistics of the whole slide, streamed exactly (slower)",
    )
    s = p.add_argument_group("streaming and data")
    tiling = s.add_mutually_exclusive_group()
    tiling.add_argument(
        "--tile", type=int, help="tile size in pixels (default 512 unless --budget/--no-stream)"
    )
    tiling.add_argument("--budget", help="memory budget such as 2GiB: the tile size is chosen automatically")
    tiling.add_argument(
        "--no-stream", action="store_true", help="run the trunk on the whole image (conventional)"
    )
    res = s.add_mutually_exclusive_group()
    res.add_argument("--level", type=int, help="pyramid level to read (0 = full resolution)")
    res.add_argument("--mpp", type=float, help="resolution in micrometres per pixel (nearest pyramid level)")
    s.add_argument(
        "--tissue-crop", action="store_true", help="crop each slide to its tissue (threshold mask)"
    )
    s.add_argument("--no-augment", action="store_true", help="no random flips / 90-degree rotations")
    s.add_argument(
        "--check-images",
        action="store_true",
        help="decode every image completely before training (finds damaged tiles up front; reads the dataset once)",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument(
        "--schedule",
        choices=("cosine", "step", "constant"),
        default="cosine",
        help="learning-rate schedule over epochs",
    )
    o.add_argument("--accumulate", type=int, default=1, help="slides per optimizer step (per process)")
    o.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast precision")
    o.add_argument("--dtype", choices=PARAMETER_DTYPES, default="float32", help="parameter precision")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    o.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also checkpoint every N optimizer steps inside an epoch (0: only at epoch ends)",
    )
    o.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip a slide whose loss or gradient is NaN/Inf (counted in log.csv) instead of stopping the run",
    )
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    model_kwargs = _json_object("--model-kwargs", args.model_kwargs, '{"width": 16}')
    head_kwargs = _json_object("--head-kwargs", args.head_kwargs, '{"hidden": 64}')
    tile = None if args.no_stream or args.budget else (512 if args.tile is None else args.tile)
    config = TrainConfig(
        csv=args.csv,
        out=args.out,
        val_csv=args.val_csv,
        model=args.model,
        model_kwargs=model_kwargs,
        pretrained=args.pretrained,
        imagenet_norm=args.imagenet_norm,
        head=args.head,
        head_kwargs=head_kwargs,
        tile_size=tile,
        budget=args.budget,
        level=args.level,
        mpp=args.mpp,
        tissue_crop=args.tissue_crop,
        augment=not args.no_augment,
        freeze_norm=args.freeze_norm,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        momentum=args.momentum,
        schedule=args.schedule,
        accumulate=args.accumulate,
        amp=args.amp,
        dtype=args.dtype,
        seed=args.seed,
        device=args.device,
        save_every=args.save_every,
        progress=not args.no_progress,
        check_images=args.check_images,
        skip_nonfinite=args.skip_nonfinite,
    )
    result = train(config, resume=args.resume)
    import os

    if os.environ.get("RANK", "0") == "0":
        print(
            f"done: {result.global_step} optimizer steps; checkpoint {result.checkpoint}, "
            f"log {result.out / 'log.csv'}"
        )
    return 0


def _json_object(option: str, text: str, example: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option} must be a JSON object such as '{example}': {err}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object, received {text!r}")
    return value
