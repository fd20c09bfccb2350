"""What defines a training run: :class:`TrainConfig`, its validation, and how its values turn into torch objects
(device, parameter dtype, autocast, input normalisation). Stored in every checkpoint; a resumed run must match it
(NOTE [ Exact resume ] in loop.py)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..dtypes import PARAMETER_DTYPES, parse_dtype
from ..errors import CheckpointError, ConfigError
from ..optim import OPTIMIZERS
from ..units import parse_bytes
from .model import HEADS, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "TrainConfig",
    "autocast",
    "check_amp",
    "check_resumable",
    "config_dict",
    "config_from_dict",
    "normalisation",
    "resolve_device",
]

_SCHEDULES = ("constant", "cosine", "step")
_AMP = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    ``tile_size`` or ``budget`` streams the trunk (``budget`` picks the tile size automatically); with both None
    the trunk runs on the whole image. ``head`` is ``max``, ``avg`` (global pooling + a linear classifier) or
    ``attention`` (gated attention-MIL, :class:`tilegrad.heads.AttentionMIL`, with ``head_kwargs``). ``accumulate`` is the number of slides per optimizer step (per process).
    """

    csv: str
    out: str = "tilegrad-run"
    val_csv: str | None = None
    model: str = "resnet18"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    imagenet_norm: bool = False
    head: str = "max"
    head_kwargs: dict[str, Any] = field(default_factory=dict)
    tile_size: int | None = 512
    budget: str | None = None
    level: int | None = None
    mpp: float | None = None
    tissue_crop: bool = False
    augment: bool = True
    freeze_norm: bool = True
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    accumulate: int = 1
    amp: str = "none"
    dtype: str = "float32"
    seed: int = 0
    device: str = "auto"
    save_every: int = 0
    progress: bool = True
    check_images: bool = False
    skip_nonfinite: bool = False

    # Fields that may change when resuming; any other difference is refused. skip_nonfinite may be added to resume
    # a run stopped by a non-finite slide (NOTE [ Non-finite values ] in loop.py).
    RESUMABLE = ("epochs", "device", "save_every", "progress", "out", "check_images", "skip_nonfinite")

    def validate(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(f"{name} must be {expected}, received {getattr(self, name)!r}")

        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", " or ".join(OPTIMIZERS))
        if self.schedule not in _SCHEDULES:
            raise bad("schedule", " or ".join(_SCHEDULES))
        if self.amp not in _AMP:
            raise bad("amp", " or ".join(_AMP))
        if self.dtype not in PARAMETER_DTYPES:
            raise bad("dtype", " or ".join(PARAMETER_DTYPES))
        if self.amp != "none" and self.dtype != "float32":
            raise ConfigError(f"--amp {self.amp} needs float32 parameters, received dtype {self.dtype!r}")
        if self.epochs < 1:
            raise bad("epochs", "at least 1")
        if self.accumulate < 1:
            raise bad("accumulate", "at least 1")
        if not self.lr > 0:
            raise bad("lr", "positive")
        if self.tile_size is not None and (
            isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or self.tile_size < 1
        ):
            raise bad("tile_size", "a positive number of pixels")
        if self.budget is not None:
            parse_bytes(self.budget)  # a budget that is not a byte count fails here, before any data is read
        if self.save_every < 0:
            raise bad("save_every", "0 (only at the end of each epoch) or a positive number of steps")
        if self.head not in HEADS:
            raise bad("head", ", ".join(repr(h) for h in HEADS[:-1]) + f" or {HEADS[-1]!r}")
        if not isinstance(self.head_kwargs, dict):
            raise bad(
                "head_kwargs", "a dict of keyword arguments for the head (JSON object on the command line)"
            )

    @property
    def parameter_dtype(self) -> torch.dtype:
        """``dtype`` as a torch dtype."""
        return parse_dtype(self.dtype, allowed=PARAMETER_DTYPES)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', received {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available; use --device cpu")
    return device


def check_amp(amp: str, device: torch.device) -> None:
    if amp == "none":
        return
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bfloat16; use --amp fp16 or --amp none")
    if not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"autocast is not available on {device.type}; use --amp none")
    try:
        with torch.autocast(device.type, dtype=dtype):
            pass
    except RuntimeError as err:
        raise ConfigError(f"--amp {amp} is not supported on {device.type} ({err}); use --amp none") from None


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def normalisation(config: TrainConfig) -> tuple[Sequence[float] | None, Sequence[float] | None]:
    return (IMAGENET_MEAN, IMAGENET_STD) if config.imagenet_norm else (None, None)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """The config stored in a checkpoint. Checkpoints written before ``head`` existed stored the pooling as
    ``pool`` (``max``/``avg``): that becomes ``head``."""
    return TrainConfig(**_upgraded(data))


def _upgraded(data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in data.items() if k in names}
    if "head" not in data and "pool" in data:
        values["head"] = data["pool"]
    return values


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    now = config_dict(config)
    saved = config_dict(config_from_dict(saved))  # an older checkpoint's settings, in today's fields
    differ = [
        f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
        for k in now
        if k not in TrainConfig.RESUMABLE and saved.get(k) != now[k]
    ]
    if differ:
        raise CheckpointError(
            "cannot resume: the run's settings differ from the checkpoint's (" + "; ".join(differ) + "). "
            "Resume with the same options (only --epochs, --device, --save-every, --check-images, --skip-nonfinite and progress may change) "
            "or start a new run in another --out directory"
        )
