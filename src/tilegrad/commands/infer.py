"""``tilegrad infer MODEL INPUT OUTPUT``: exact tiled inference from an image file into an image file."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="run a fully convolutional model over a slide or volume tile by tile, exactly",
        description=(
            "Run a fully convolutional model over INPUT (TIFF/OME-TIFF, OpenSlide formats, NIfTI, DICOM series, "
            "PNG/JPEG, zarr, .npy) tile by tile with the halo its receptive field needs, and write OUTPUT "
            "(.tif pyramid, .nii/.nii.gz with the source's affine, .zarr or .npy) tile by tile. The result equals "
            "whole-image inference: no seams, no blending."
        ),
    )
    p.add_argument(
        "model", help="package.module:factory, file.py:factory, a tilegrad or torchvision model name"
    )
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--tile", type=int, help="tile extent in pixels, halo included")
    size.add_argument("--budget", help="memory budget such as 2GiB: the largest tile that fits")
    p.add_argument("--weights", type=Path, help="a state_dict file (loaded with weights_only=True)")
    p.add_argument("--level", type=int, default=None, help="pyramid level of INPUT (0 = full resolution)")
    p.add_argument("--dtype", default="float32", help="output dtype (default float32)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import infer, io
    from ..errors import CheckpointError, ShapeError
    from ..memory.resolve import resolve_model

    factory, label = resolve_model(args.model)
    model = factory().eval()
    if args.weights is not None:
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for bad files
            raise CheckpointError(
                f"cannot load weights from {args.weights}: {type(err).__name__}: {err}"
            ) from err
        state = state.get("model", state) if isinstance(state, dict) else state
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{args.weights} does not fit {label}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
            )
    source = io.open_image(args.input, level=args.level)
    ndim = len(source.shape) - 1
    meta = copy.deepcopy(model).to("meta")  # the exact output shape, without allocating
    with torch.no_grad():
        out_meta = meta(torch.empty((1, *source.shape), device="meta"))
    if out_meta.dim() != ndim + 2:
        raise ShapeError(
            f"{label} returns shape {tuple(out_meta.shape)} for an input of {(1, *source.shape)}; "
            "infer needs a fully convolutional model (output with the same number of spatial dims)"
        )
    out_shape = tuple(out_meta.shape[1:])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with io.create_writer(args.output, out_shape, np.dtype(args.dtype), like=source) as sink:
        infer(
            model,
            source,
            tile_size=args.tile,
            memory_budget=args.budget,
            out=sink,
            progress=not args.no_progress,
        )
    print(f"wrote {args.output} ({'x'.join(map(str, out_shape))}, {args.dtype})")
    return 0
