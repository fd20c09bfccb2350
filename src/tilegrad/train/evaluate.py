"""Running a trained slide classifier: class probabilities and metrics (:func:`evaluate`, used for validation by
the loop), rebuilding a model from a checkpoint (:func:`load_trained_model`) and per-slide predictions to CSV
(:func:`predict`)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_write_csv
from .._lock import FileLock
from ..errors import CheckpointError, ConfigError, DataError
from ..models.resolve import needs_trust
from .checkpoint import load_checkpoint
from .config import TrainConfig, autocast, config_from_dict, normalisation, resolve_device
from .dataset import SlideRecord, nonfinite_message, read_slide_csv, slide_input
from .distributed import DistContext
from .model import SlideClassifier, build_model

__all__ = ["evaluate", "load_trained_model", "predict", "progress_bar"]


@torch.no_grad()
def evaluate(
    model: SlideClassifier,
    records: Sequence[SlideRecord],
    *,
    config: TrainConfig,
    device: torch.device,
    ctx: DistContext | None = None,
    progress: bool = False,
    desc: str = "predict",
) -> dict[str, Any]:
    """Class probabilities of every slide, and (when labelled) the mean cross-entropy loss and the AUC.

    With several processes each evaluates every world_size-th slide and the results are gathered on all.
    """
    ctx = ctx or DistContext()
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    norm = normalisation(config)
    mine = list(range(ctx.rank, len(records), ctx.world_size))
    results = []
    boxes: dict[Path, Any] = {}
    with progress_bar(total=len(mine), desc=desc, unit="slide", enabled=progress and ctx.is_main) as bar:
        for i in mine:
            x = slide_input(records[i], config, norm, dtype, boxes=boxes)
            with autocast(config.amp, device):
                logits = model(x)
            if not bool(torch.isfinite(logits).all()):
                raise DataError(nonfinite_message(records[i].where(), records[i].image, x, "class scores"))
            probs = torch.softmax(logits.float(), dim=1)[0].cpu().tolist()
            results.append((i, probs))
            bar.update(1)
    model.train(was_training)
    gathered = sorted(ctx.gather(results))
    probs = np.array([p for _, p in gathered], dtype=np.float64).reshape(len(records), -1 if records else 0)
    labels = [r.label for r in records]
    out: dict[str, Any] = {"probs": probs, "loss": math.nan, "auc": math.nan}
    if records and all(label is not None for label in labels):
        y = np.asarray(labels)
        picked = probs[np.arange(len(y)), y]
        out["loss"] = float(-np.mean(np.log(np.clip(picked, 1e-12, None))))
        out["auc"] = _auc(y, probs)
    return out


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    if len(present) < probs.shape[1]:
        return math.nan
    return float(roc_auc_score(labels, probs, multi_class="ovr"))


def load_trained_model(
    checkpoint: str | Path | dict[str, Any],
    *,
    device: str | torch.device = "auto",
    tile_size: int | None = None,
    budget: str | None = None,
    trust_model_code: bool = False,
    path: str | Path | None = None,
) -> tuple[SlideClassifier, TrainConfig]:
    """Rebuild the model of a training checkpoint (``tile_size``/``budget`` override the training tiling).

    Only a model tilegrad knows by name is rebuilt unless ``trust_model_code`` (NOTE [ A checkpoint never runs code ]
    in models/resolve.py); ``path`` names a checkpoint given as a loaded dict in messages.
    """
    if not isinstance(checkpoint, dict):
        path = checkpoint
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    where = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
    try:
        config = config_from_dict(state["config"])
        num_classes, in_channels = int(state["num_classes"]), int(state["in_channels"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{where} lacks the run's settings ({type(err).__name__}: {err}); expected a file saved by tilegrad train"
        ) from None
    reason = needs_trust(config.model, config.model_kwargs)
    if reason is not None and not trust_model_code:
        raise CheckpointError(
            f"{where} was not rebuilt: {reason}, and rebuilding it would import and call that code "
            f"({config.model}(**{config.model_kwargs})). tilegrad rebuilds from a checkpoint only models it knows by "
            "name (tilegrad's, torchvision's, timm's, MONAI's). If you trust the file and its author, pass "
            "--trust-model-code (trust_model_code=True in Python)"
        )
    if tile_size is not None or budget is not None:
        config.tile_size, config.budget = tile_size, budget
    dev = resolve_device(device) if isinstance(device, str) else device
    model = build_model(
        config.model,
        num_classes,
        in_channels=in_channels,
        head=config.head,
        head_kwargs=config.head_kwargs,
        pretrained=False,
        model_kwargs=config.model_kwargs,
        tile_size=config.tile_size if config.budget is None else None,
        memory_budget=config.budget,
        freeze_norm=config.freeze_norm,
    ).to(device=dev, dtype=config.parameter_dtype)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"the checkpoint's weights do not fit its model {config.model!r}: {err}"
        ) from None
    model.in_channels, model.num_classes = in_channels, num_classes  # checked against each image and label
    model.eval()
    return model, config


def predict(
    checkpoint: str | Path,
    csv_path: str | Path,
    out_csv: str | Path,
    *,
    device: str = "auto",
    tile_size: int | None = None,
    budget: str | None = None,
    progress: bool = True,
    check_images: bool = False,
    overwrite: bool = False,
    trust_model_code: bool = False,
) -> dict[str, Any]:
    """Write per-slide class probabilities of every slide in ``csv_path`` to ``out_csv``.

    The CSV needs an ``image`` column; ``label`` is optional (when present, the AUC is returned too). Columns written:
    ``image`` (as in the input CSV), ``label`` (if known) and ``probability`` (of class 1) for two classes, or
    ``prob_0``, ``prob_1``, ... for more. ``check_images`` decodes every image completely before predicting. An
    existing ``out_csv`` is replaced only with ``overwrite``; ``trust_model_code``: NOTE [ A checkpoint never runs
    code ] in models/resolve.py.
    """
    out_csv = Path(out_csv)
    check_output(out_csv, overwrite, "--overwrite (overwrite=True)")
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out_csv, what="predictions"):
        model, config = load_trained_model(
            checkpoint, device=device, tile_size=tile_size, budget=budget, trust_model_code=trust_model_code
        )
        records = read_slide_csv(
            csv_path, require_labels=False, decode_all=check_images, level=config.level, mpp=config.mpp
        )
        _check_fits(records, model, config, checkpoint)
        check_smallest(model, records, config)
        dev = next(model.parameters()).device
        result = evaluate(model, records, config=config, device=dev, progress=progress)
        _write_predictions(records, result, csv_path, out_csv)
    return result


def check_output(path: Path, overwrite: bool, option: str) -> None:
    """Refuse an output that exists (without ``overwrite``) or whose directory is a file."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists: pass {option} to replace it, or choose another name")
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; expected a file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"cannot write {path}: {parent} is a file, not a directory")
            break


def _check_fits(
    records: Sequence[SlideRecord], model: SlideClassifier, config: TrainConfig, checkpoint: Any
) -> None:
    """Every slide has the channels the model was trained on and a label among its classes."""
    num_classes = getattr(model, "num_classes", None)
    in_channels = getattr(model, "in_channels", None)
    for r in records:
        if num_classes is not None and r.label is not None and r.label >= num_classes:
            raise DataError(
                f"{r.where()}: label {r.label} is not a class of the checkpoint {checkpoint}, which has "
                f"{num_classes} classes (0..{num_classes - 1}); fix the label or use the checkpoint of that task"
            )
    if in_channels is not None:
        for r in records:
            check_channels(r.image, in_channels, config, r.where())


def check_channels(image: Path, expected: int, config: TrainConfig, where: str = "") -> None:
    """A slide with another number of channels than the model's input (grayscale or RGBA into RGB) is a DataError;
    ``where`` (``"slides.csv line 3"``) prefixes the message."""
    from .dataset import open_slide

    found = int(open_slide(image, level=config.level, mpp=config.mpp, where=where).shape[0])
    if found != expected:
        raise DataError(
            f"{where + ': ' if where else ''}image {Path(image).name!r} has {found} channel{'s' * (found != 1)} "
            f"({_channel_words(found)}); the model takes {expected} ({_channel_words(expected)}). Convert it, "
            f"e.g. with PIL: Image.open(path).convert({'RGB' if expected == 3 else 'L'!r}).save(new_path)"
        )


def check_smallest(
    model: SlideClassifier, records: Sequence[SlideRecord], config: TrainConfig, *, image: Any = None
) -> None:
    """The slides with the smallest height and the smallest width (or ``image``) fit through the model's trunk: tried
    on meta tensors, so nothing is computed. A slide smaller than the network's receptive field is a DataError
    naming its row, before any training or prediction (NOTE [ Dataset checks ] in dataset.py)."""
    import copy

    from .dataset import open_slide

    if config.tissue_crop:  # the crops are known only when the slides are read
        return
    candidates = [(r.image, r.where()) for r in records] if image is None else [(Path(image), "")]
    if not candidates:
        return
    shapes = [tuple(open_slide(p, level=config.level, mpp=config.mpp, where=w).shape) for p, w in candidates]
    param = next(model.trunk.parameters(), None)
    meta = copy.deepcopy(model.trunk).to("meta")
    for axis in (1, 2):
        i = min(range(len(shapes)), key=lambda k: shapes[k][axis])
        try:
            with torch.no_grad():
                meta(
                    torch.empty(
                        (1, *shapes[i]), device="meta", dtype=param.dtype if param is not None else None
                    )
                )
        except RuntimeError as err:
            path, where = candidates[i]
            size = "x".join(map(str, shapes[i][1:]))
            raise DataError(
                f"{where + ': ' if where else ''}image {path.name!r} is {size} px, too small for the model "
                f"{config.model!r} ({str(err).splitlines()[0]}). Use a larger image or a finer --level/--mpp, or "
                "remove it"
            ) from None


def _channel_words(n: int) -> str:
    return {1: "grayscale", 2: "grayscale + alpha", 3: "RGB", 4: "RGBA"}.get(n, f"{n} bands")


def _write_predictions(
    records: Sequence[SlideRecord], result: dict[str, Any], csv_path: str | Path, out_csv: Path
) -> None:
    probs = result["probs"]
    k = probs.shape[1]
    has_labels = all(r.label is not None for r in records)
    columns = [
        "image",
        *(["label"] if has_labels else []),
        *(["probability"] if k == 2 else [f"prob_{c}" for c in range(k)]),
    ]
    base = Path(csv_path).resolve().parent
    rows = []
    for record, p in zip(records, probs):
        name = os.path.relpath(record.image, base)
        values = [p[1]] if k == 2 else list(p)
        rows.append([name, *([record.label] if has_labels else []), *(f"{v:.6g}" for v in values)])
    atomic_write_csv(out_csv, columns, rows)


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)
