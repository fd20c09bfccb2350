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
from ..errors import CheckpointError
from .checkpoint import load_checkpoint
from .config import TrainConfig, autocast, config_from_dict, normalisation, resolve_device
from .dataset import SlideRecord, read_slide_csv, slide_input
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
) -> tuple[SlideClassifier, TrainConfig]:
    """Rebuild the model of a training checkpoint (``tile_size``/``budget`` override the training tiling)."""
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    config = config_from_dict(state["config"])
    if tile_size is not None or budget is not None:
        config.tile_size, config.budget = tile_size, budget
    dev = resolve_device(device) if isinstance(device, str) else device
    model = build_model(
        config.model,
        int(state["num_classes"]),
        in_channels=int(state["in_channels"]),
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
) -> dict[str, Any]:
    """Write per-slide class probabilities of every slide in ``csv_path`` to ``out_csv``.

    The CSV needs an ``image`` column; ``label`` is optional (when present, the AUC is returned too). Columns written:
    ``image`` (as in the input CSV), ``label`` (if known) and ``probability`` (of class 1) for two classes, or
    ``prob_0``, ``prob_1``, ... for more. ``check_images`` decodes every image completely before predicting.
    """
    model, config = load_trained_model(checkpoint, device=device, tile_size=tile_size, budget=budget)
    records = read_slide_csv(
        csv_path, require_labels=False, decode_all=check_images, level=config.level, mpp=config.mpp
    )
    dev = next(model.parameters()).device
    result = evaluate(model, records, config=config, device=dev, progress=progress)
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
    atomic_write_csv(Path(out_csv), columns, rows)
    return result


def progress_bar(*, total: int, desc: str, unit: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)
