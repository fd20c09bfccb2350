"""``tilegrad infer MODEL INPUT OUTPUT``: exact tiled inference from an image file into an image file."""

from __future__ import annotations

import argparse
import copy
import glob
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ._options import add_trust_model_code

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="run a fully convolutional model over a slide or volume tile by tile, exactly",
        description=(
            "Run a fully convolutional model over INPUT (TIFF/OME-TIFF, OpenSlide formats, NIfTI, DICOM series, "
            "PNG/JPEG, zarr, .npy) tile by tile with the halo its receptive field needs, and write OUTPUT "
            "(.tif pyramid, .nii/.nii.gz with the source's affine, .zarr or .npy) tile by tile. The result equals "
            "whole-image inference: no seams, no blending. OUTPUT appears only when complete; Ctrl-C keeps the "
            "tiles written so far (as OUTPUT.partial*) for --resume."
        ),
    )
    p.add_argument(
        "model",
        help="a checkpoint saved by `tilegrad train` (its trunk, the fully convolutional part, is run on INPUT "
        "preprocessed as in training), or package.module:factory, file.py:factory, a tilegrad or torchvision "
        "model name (with --weights for trained weights)",
    )
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--tile", type=int, help="tile extent in pixels, halo included")
    size.add_argument("--budget", help="memory budget such as 2GiB: the largest tile that fits")
    p.add_argument(
        "--weights", type=Path, help="a state_dict file for a factory MODEL (loaded with weights_only=True)"
    )
    p.add_argument("--level", type=int, default=None, help="pyramid level of INPUT (0 = full resolution)")
    p.add_argument(
        "--batch-tiles", type=int, default=1, metavar="K", help="tiles per forward call (default 1)"
    )
    p.add_argument("--dtype", default="float32", help="output dtype (default float32)")
    p.add_argument(
        "--round",
        action="store_true",
        help="for an integer --dtype: round the model's output to the nearest integer and clip it to the dtype's "
        "range (without it, float output into an integer dtype is refused)",
    )
    again = p.add_mutually_exclusive_group()
    again.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT, and discard partial files of an interrupted run",
    )
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run, skipping the tiles it wrote; start one if there is none (as train "
        "--resume does)",
    )
    p.add_argument("--no-progress", action="store_true")
    add_trust_model_code(p)
    p.set_defaults(func=run)


def _is_checkpoint_spec(spec: str) -> bool:
    if ":" in spec:
        return False
    path = Path(spec)
    return path.is_file() or path.suffix.lower() in _CHECKPOINT_SUFFIXES


def _load_weights(model: Any, path: Path, label: str) -> None:
    from ..errors import CheckpointError
    from ..train.checkpoint import load_torch_file

    state = load_torch_file(path, what="weights file")
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}; --weights expects a state_dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # load_state_dict reports shape mismatches as RuntimeError
        raise CheckpointError(f"{path} does not fit {label}: {err}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit {label}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )


def _from_checkpoint(path: Path, args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(trunk, training config, label) of a `tilegrad train` checkpoint; a bare state_dict is refused."""
    import torch

    from ..errors import CheckpointError, ConfigError
    from ..train.checkpoint import FORMAT, load_torch_file, verify_checksum

    if args.weights is not None:
        raise ConfigError(
            f"MODEL {path} is a checkpoint and holds its weights already; drop --weights (or pass a factory as MODEL)"
        )
    state = load_torch_file(path)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        verify_checksum(state, path)
        from ..train.evaluate import load_trained_model

        model, config = load_trained_model(
            state, device="cpu", trust_model_code=args.trust_model_code, path=path
        )
        trunk = model.trunk.eval()
        trunk.in_channels = model.in_channels
        return trunk, config, f"{path} (trunk of {config.model})"
    weights = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if isinstance(weights, dict) and weights and all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(
            f"{path} holds only weights (a state_dict of {len(weights)} tensors) and no model spec, so the model "
            f"cannot be rebuilt from it. Pass the model's factory as MODEL and this file as --weights, e.g. "
            f"tilegrad infer my_models.py:build {args.input} {args.output} --weights {path} ..."
        )
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    raise CheckpointError(
        f"{path} is not a tilegrad checkpoint (expected a file saved by `tilegrad train`, format {FORMAT!r}; found "
        f"{found!r}). Pass a factory as MODEL, with --weights for a state_dict"
    )


class _Preprocessed:
    """A (C, *spatial) view of a training checkpoint's input: pixels scaled and normalised as in training."""

    def __init__(self, image: Any, config: Any, dtype: Any):
        from ..train.config import normalisation
        from ..train.dataset import SlideInput

        mean, std = normalisation(config)
        self._input = SlideInput(image, mean=mean, std=std, dtype=dtype)
        self.shape = tuple(image.shape)
        self.path = getattr(image, "path", None)

    def __getitem__(self, key: tuple) -> np.ndarray:
        return self._input[(0, *key)]


def run(args: argparse.Namespace) -> int:
    """Hold the lock of OUTPUT (NOTE [ One writer per output ] in tilegrad/_lock.py) for the whole run: its partial
    files and journal are this run's alone."""
    from .._lock import FileLock
    from ..errors import ConfigError

    if args.batch_tiles < 1:  # option checks first: nothing is created for a refused command
        raise ConfigError(f"--batch-tiles must be at least 1; received {args.batch_tiles}")
    for parent in args.output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot write {args.output}: {parent} is a file, not a directory")
            break
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(args.output, what="output"):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch

    from .. import infer, io
    from ..errors import ConfigError, DataError, DiskFullError, ShapeError
    from ..infer import journal_progress
    from ..models.resolve import resolve_model

    if args.batch_tiles < 1:
        raise ConfigError(f"--batch-tiles must be at least 1; received {args.batch_tiles}")
    partial = sorted(args.output.parent.glob(glob.escape(args.output.name) + ".partial*"))
    if args.output.exists() and not args.overwrite:
        raise ConfigError(f"{args.output} already exists: pass --overwrite to replace it")
    if partial and not (args.overwrite or args.resume):
        raise ConfigError(
            f"{args.output} has partial files of an interrupted run ({', '.join(p.name for p in partial)}): pass "
            "--resume to continue it, or --overwrite to start over"
        )
    if args.resume and not partial:  # as train --resume: one command for the first launch and every relaunch
        print(f"note: no interrupted run of {args.output} (no {args.output.name}.partial*): starting the run")
        args.resume = False
    level = args.level
    if _is_checkpoint_spec(args.model):
        model, config, label = _from_checkpoint(Path(args.model), args)
        mpp = config.mpp if level is None else None
        level = config.level if level is None else level
        image = io.open_image(args.input, level=level, mpp=mpp)
        if image.shape[0] != model.in_channels:
            raise DataError(
                f"{args.input} has {image.shape[0]} channel(s); {label} was trained on {model.in_channels}. Convert "
                "the image (e.g. grayscale or RGBA to RGB) first"
            )
        dtype = next(model.parameters()).dtype
        source: Any = _Preprocessed(image, config, dtype)
        print(f"{label}: running the trunk (its head pools globally); OUTPUT holds its feature maps")
    else:
        factory, label = resolve_model(args.model)
        model = factory().eval()
        if args.weights is not None:
            _load_weights(model, args.weights, label)
        image = source = io.open_image(args.input, level=level)
    try:
        dtype_out = np.dtype(args.dtype)
    except TypeError:
        raise ConfigError(f"--dtype {args.dtype!r} is not a numpy dtype (e.g. float32, uint8)") from None
    ndim = len(source.shape) - 1
    meta = copy.deepcopy(model).to("meta")  # the exact output shape, without allocating
    try:
        with torch.no_grad():
            out_meta = meta(torch.empty((1, *source.shape), device="meta"))
    except RuntimeError as err:  # e.g. 1 channel into a model that takes 3; the shape tells which
        raise ShapeError(
            f"{label} cannot run on {args.input} (read as {'x'.join(map(str, source.shape))}, channels first): "
            f"{str(err).splitlines()[0]}. Check the image's channels and size against what the model takes"
        ) from None
    if out_meta.dim() != ndim + 2:
        raise ShapeError(
            f"{label} returns shape {tuple(out_meta.shape)} for an input of {(1, *source.shape)}; "
            "infer needs a fully convolutional model (output with the same number of spatial dims)"
        )
    if out_meta.dtype.is_floating_point and dtype_out.kind in "biu" and not args.round:
        raise ConfigError(
            f"{label} returns {out_meta.dtype} values and --dtype {dtype_out} is an integer type: casting would wrap "
            f"or truncate them (-7.84 becomes 249 in uint8). Add --round to round to the nearest integer and clip "
            "to the dtype's range, use a float --dtype, or end the model with the post-processing that makes "
            "integers (e.g. labels with x.argmax(1, keepdim=True))"
        )
    out_shape = tuple(out_meta.shape[1:])
    journal = args.output.with_name(args.output.name + ".partial.tiles.json")
    # keep_partial on --resume: a resumed run refused (another model, tile size) must not delete the tiles it resumes
    sink = io.create_writer(
        args.output,
        out_shape,
        dtype_out,
        like=image,
        overwrite=args.overwrite,
        resume=args.resume,
        keep_partial=args.resume,
    )
    try:
        with sink:
            infer(
                model,
                source,
                tile_size=args.tile,
                memory_budget=args.budget,
                out=sink,
                progress=not args.no_progress,
                batch_tiles=args.batch_tiles,
                rounding=args.round,
                journal=journal,
            )
    except DiskFullError as err:  # NOTE [ A full disk ] (tilegrad/_atomic.py): keep what was computed
        done = journal_progress(journal)
        count = f"{done[0]} of {done[1]} tiles are written and kept" if done else "the partial files are kept"
        raise DiskFullError(
            err.path,
            err.needed,
            err.free,
            f"; {count} ({', '.join(str(p) for p in sink.partial_files) or 'nothing'}): once space is freed, "
            "continue with the same command plus --resume",
        ) from None
    except KeyboardInterrupt:
        done = journal_progress(journal)
        count = f"{done[0]} of {done[1]} tiles are written" if done else "no tile was recorded as written"
        kept = ", ".join(str(p) for p in sink.partial_files) or "nothing"
        print(
            f"tilegrad infer: interrupted; {count}. Kept (never under the name {args.output}): {kept}. Continue "
            "with the same command plus --resume, or start over with --overwrite",
            file=sys.stderr,
        )
        raise
    print(f"wrote {args.output} ({'x'.join(map(str, out_shape))}, {dtype_out})")
    return 0
