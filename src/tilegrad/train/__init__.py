"""Training on whole slides with slide-level labels: data, models, the loop, checkpoints, saliency, scale-out.

config.py (TrainConfig), dataset.py (slides CSV, lazy inputs), model.py (trunk + pooling head), loop.py (train),
evaluate.py (evaluate, predict, load_trained_model), checkpoint.py, distributed.py, saliency.py, demo.py.

See docs/training.md. The command line (``tilegrad train``, ``predict``, ``saliency``, ``demo``) is a thin layer over
:func:`train`, :func:`predict` and :func:`saliency`.
"""

from __future__ import annotations

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .dataset import SlideInput, SlideRecord, open_slide, random_orientation, read_slide_csv
from .evaluate import evaluate, load_trained_model, predict
from .loop import StepInfo, TrainResult, train
from .model import PoolingHead, SlideClassifier, build_model, small_cnn

__all__ = [
    "PoolingHead",
    "SlideClassifier",
    "SlideInput",
    "SlideRecord",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "load_trained_model",
    "open_slide",
    "predict",
    "random_orientation",
    "read_slide_csv",
    "save_checkpoint",
    "small_cnn",
    "train",
]
