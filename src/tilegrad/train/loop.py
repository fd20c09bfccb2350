"""The training loop: slides one at a time through a streamed trunk, gradient accumulation, validation, checkpoints.

Usage (see docs/training.md)::

    from tilegrad.train import TrainConfig, train
    result = train(TrainConfig(csv="slides.csv", model="resnet18", tile_size=512, epochs=10, out="runs/a"))
    result.history[-1]["val_auc"]

What happens per optimizer step: ``accumulate`` slides (times the number of processes, see
NOTE [ One all-reduce per optimizer step ] in distributed.py) go forward and backward one by one, each slide's loss
divided by the number of slides in the step, so the step uses the mean gradient. The order of slides and each
slide's random flip/rotation are drawn from generators seeded with ``(seed, epoch)`` and ``(seed, epoch, slide)``, and
every other random state is saved in the checkpoint, so a resumed run repeats exactly what the uninterrupted run
would have done (NOTE [ Exact resume ]).

NOTE [ Exact resume ]: checkpoints are written at optimizer-step boundaries only (every epoch, and every
``save_every`` steps), when no gradient is pending. They record the epoch, the steps done in it, the model,
optimizer, scheduler and grad-scaler states and all random generator states. Resuming restores all of them and
skips the steps already done; the slide order of the interrupted epoch is recomputed from ``(seed, epoch)``. Work
done after the last checkpoint is simply repeated, with identical inputs, so a run killed at any moment and resumed
ends with the same parameters, bit for bit, as one that was never interrupted (same machine, same thread count).

NOTE [ Non-finite values ]: a NaN or infinite loss (one NaN pixel suffices) or parameter gradient stops the run
with a DataError naming the slide's CSV row, the epoch and the optimizer step, and what the image holds (NaN and
infinite pixels are counted). The check runs after each slide's backward and before the optimizer step, so the step
never happens and checkpoint.pt keeps the last good state; after each step the parameters are checked too (a
learning rate far too high), again before anything is saved. ``skip_nonfinite`` (``--skip-nonfinite``) drops such a
slide instead: its gradient is computed apart from the step's others and discarded (so the step sums slides one at
a time, which may change the last bits of the sum), it is printed and counted in log.csv's ``skipped``. Under fp16
autocast gradients are not checked: the GradScaler skips overflowing steps itself.

NOTE [ Schedule length ]: the learning rate of epoch e is ``lr * _lr_factor(schedule, epochs)(e)``, a closed form of
the epoch and the run's length. ``--epochs`` may change on resume (to train longer); from the resumed epoch on the
rate is the one a run started with the new ``--epochs`` would use at that epoch (a 3-epoch cosine run resumed
with ``--epochs 4`` trains its fourth epoch at ``lr * (1 + cos(3 pi / 4)) / 2``, not at 0). Epochs already done keep
the rates they had.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_write_csv
from .._lock import FileLock
from ..errors import CheckpointError, ConfigError, DataError
from ..optim import make_optimizer
from .checkpoint import get_rng_state, load_checkpoint, save_checkpoint, set_rng_state
from .config import (
    TrainConfig,
    autocast,
    check_amp,
    check_resumable,
    config_dict,
    normalisation,
    resolve_device,
)
from .dataset import (
    SlideRecord,
    check_labels,
    check_rows,
    check_same_channels,
    nonfinite_message,
    open_slide,
    read_slide_csv,
    slide_input,
)
from .distributed import DistContext, init_distributed, step_shard
from .evaluate import check_smallest, evaluate, load_trained_model, predict, progress_bar
from .model import SlideClassifier, build_model

__all__ = [
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "epoch_order",
    "evaluate",
    "load_trained_model",
    "predict",
    "train",
]

LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc", "lr", "seconds", "steps", "skipped")
"""Columns of log.csv; ``skipped`` counts the slides skipped for non-finite values (NOTE [ Non-finite values ])."""


@dataclass
class StepInfo:
    """Passed to ``on_step`` callbacks after every optimizer step (and after its checkpoint, if one was due)."""

    epoch: int
    step_in_epoch: int
    global_step: int
    loss: float
    checkpointed: bool


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path
    history: list[dict[str, float]]
    model: SlideClassifier
    allreduce_calls: int
    global_step: int


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
) -> TrainResult:
    """Train a slide classifier; see the module docstring. Returns the history and the trained model.

    ``resume=True`` continues the run in ``config.out`` from its ``checkpoint.pt`` and starts it when there is none
    yet, as ``tilegrad infer --resume`` does (one command for the first launch and every relaunch). The run holds
    the lock of ``checkpoint.pt`` (NOTE [ One writer per output ] in tilegrad/_lock.py).
    """
    config.validate()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; expected a run directory (it is created if missing)")
    device = resolve_device(config.device)
    ctx = init_distributed(device)
    if ctx.distributed and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    try:
        if not ctx.is_main:
            return _Run(config, device, ctx, resume, on_step).run()
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(out / "checkpoint.pt", what="training run's checkpoint"):
                return _Run(config, device, ctx, resume, on_step).run()
        except BaseException:
            if created and not any(out.iterdir()):  # refused before writing anything: leave no empty --out
                out.rmdir()
            raise
    finally:
        ctx.close()


class _Run:
    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        ctx: DistContext,
        resume: bool,
        on_step: Callable[[StepInfo], None] | None,
    ) -> None:
        self.config, self.device, self.ctx, self.on_step = config, device, ctx, on_step
        self.out = Path(config.out)
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.dtype = config.parameter_dtype
        check_amp(config.amp, device)

        saved = None
        if self.checkpoint_path.exists():
            if not resume:
                raise ConfigError(
                    f"{self.out} already holds a checkpoint: pass --resume to continue that run, "
                    f"or choose another --out"
                )
            saved = load_checkpoint(self.checkpoint_path)
            check_resumable(saved["config"], config)
        elif resume and ctx.is_main:  # the same command starts a run and continues it (docs/training.md)
            print(f"note: {self.out} holds no checkpoint yet: starting the run", flush=True)

        train_records, val_records = _load_records(config)
        self.train_records, self.val_records = train_records, val_records
        labels = [r.label for r in train_records]
        self.num_classes = max(2, max(labels) + 1)
        check_labels(train_records, config.csv)
        for r in val_records:
            if r.label >= self.num_classes:
                raise DataError(
                    f"{r.where()}: validation label {r.label} does not occur among the training labels "
                    f"(0..{self.num_classes - 1})"
                )
        if saved is not None and saved["num_classes"] != self.num_classes:
            raise CheckpointError(
                f"the checkpoint was trained with {saved['num_classes']} classes, the CSV now has "
                f"{self.num_classes}; resume with the same data or start a new run"
            )
        self.norm = normalisation(config)
        self.boxes: dict[Path, Any] = {}

        self.in_channels = _channels(train_records[0], config)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
        self.model = build_model(
            config.model,
            self.num_classes,
            in_channels=self.in_channels,
            head=config.head,
            head_kwargs=config.head_kwargs,
            pretrained=config.pretrained,
            model_kwargs=config.model_kwargs,
            tile_size=config.tile_size if config.budget is None else None,
            memory_budget=config.budget,
            freeze_norm=config.freeze_norm,
        ).to(device=device, dtype=self.dtype)
        check_smallest(self.model, [*train_records, *val_records], config)
        if self.model.streamed is not None:
            self.model.streamed.progress = config.progress and ctx.is_main  # a bar over tiles
        ctx.broadcast_parameters(self.model)
        self.optimizer = make_optimizer(
            config.optimizer,
            [p for p in self.model.parameters() if p.requires_grad],
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.scheduler = _make_scheduler(self.optimizer, config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.epoch_loss_sum, self.epoch_slides, self.epoch_skipped = 0.0, 0, 0
        self.saved_step = 0  # the optimizer steps checkpoint.pt holds, for messages
        self.history: list[dict[str, float]] = []
        self.best_val_loss = math.inf
        self.allreduce_before = 0
        if saved is not None:
            self._restore(saved)

    # -- checkpoint state -------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "config": config_dict(self.config),
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "epoch_loss_sum": self.epoch_loss_sum,
            "epoch_slides": self.epoch_slides,
            "epoch_skipped": self.epoch_skipped,
            "best_val_loss": self.best_val_loss,
            "allreduce_calls": self.allreduce_before + self.ctx.allreduce_calls,
            "history": self.history,
            "rng": get_rng_state(),
        }

    def _restore(self, saved: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            # NOTE [ Schedule length ]: the optimizer holds the rate the checkpoint's schedule set for this epoch;
            # recompute it with this run's schedule (the same number unless --epochs changed).
            factor = _lr_factor(self.config.schedule, self.config.epochs)(self.scheduler.last_epoch)
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * factor
            if saved["scaler"]:
                self.scaler.load_state_dict(saved["scaler"])
            self.epoch, self.step_in_epoch = int(saved["epoch"]), int(saved["step_in_epoch"])
            self.global_step = int(saved["global_step"])
            self.epoch_loss_sum, self.epoch_slides = (
                float(saved["epoch_loss_sum"]),
                int(saved["epoch_slides"]),
            )
            self.epoch_skipped = int(saved.get("epoch_skipped", 0))
            self.saved_step = self.global_step
            self.best_val_loss = float(saved["best_val_loss"])
            self.allreduce_before = int(saved["allreduce_calls"])
            self.history = [dict(h) for h in saved["history"]]
            set_rng_state(saved["rng"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(
                f"{self.checkpoint_path} does not match this run ({type(err).__name__}: {err}); "
                f"resume with the command that created it or start a new run"
            ) from None
        if self.ctx.is_main:
            print(
                f"resuming {self.checkpoint_path}: epoch {self.epoch + 1}, step {self.step_in_epoch} of it "
                f"({self.global_step} optimizer steps done)",
                flush=True,
            )

    def _save(self) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.checkpoint_path, self._state())
        self.saved_step = self.global_step
        self.ctx.barrier()

    # -- the loop ---------------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        if self.ctx.is_main and not self.val_records:
            print(
                "note: no validation slides (split 'val' or --val-csv); validation loss and AUC are NaN and "
                "best.pt holds the last epoch's model",
                flush=True,
            )
        if self.ctx.is_main:
            # NOTE [ Epoch-end write order ]: the log holds exactly the epochs the checkpoint counts as done
            _write_log(self.out / "log.csv", self.history)
        if self.model.streamed is not None and self.epoch < cfg.epochs:
            self._announce_plan()
        while self.epoch < cfg.epochs:
            started = time.perf_counter()
            self._train_epoch()
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            val = {"loss": math.nan, "auc": math.nan}
            if self.val_records:
                val = evaluate(
                    self.model,
                    self.val_records,
                    config=cfg,
                    device=self.device,
                    ctx=self.ctx,
                    progress=cfg.progress,
                    desc=f"validate {self.epoch + 1}/{cfg.epochs}",
                )
            row = {
                "epoch": self.epoch + 1,
                "train_loss": self.epoch_loss_sum / max(self.epoch_slides - self.epoch_skipped, 1),
                "val_loss": val["loss"],
                "val_auc": val["auc"],
                "lr": lr,
                "seconds": time.perf_counter() - started,
                "steps": self.global_step,
                "skipped": self.epoch_skipped,
            }
            self.history.append(row)
            self.epoch += 1
            self.step_in_epoch, self.epoch_loss_sum, self.epoch_slides, self.epoch_skipped = 0, 0.0, 0, 0
            improved = True  # without validation slides best.pt follows the latest epoch
            if self.val_records:
                improved = val["loss"] < self.best_val_loss
                self.best_val_loss = min(self.best_val_loss, val["loss"])
            # NOTE [ Epoch-end write order ]: best.pt and log.csv first, checkpoint.pt last. A run killed in
            # between resumes from the previous checkpoint and redoes this epoch, rewriting both identically; the
            # reverse order would leave an epoch counted as done with its log row or best.pt missing for good.
            if self.ctx.is_main:
                if improved:
                    save_checkpoint(
                        self.out / "best.pt", {k: v for k, v in self._state().items() if k != "rng"}
                    )
                _write_log(self.out / "log.csv", self.history)
            self._save()
            if self.ctx.is_main:
                skipped = f"  skipped {row['skipped']} non-finite slides" if row["skipped"] else ""
                print(
                    f"epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.4f}  "
                    f"val loss {row['val_loss']:.4f}  val AUC {row['val_auc']:.3f}  ({row['seconds']:.0f} s)"
                    f"{skipped}",
                    flush=True,
                )
        return TrainResult(
            out=self.out,
            checkpoint=self.checkpoint_path,
            history=self.history,
            model=self.model,
            allreduce_calls=self.ctx.allreduce_calls,
            global_step=self.global_step,
        )

    def _announce_plan(self) -> None:
        """Plan the largest training slide now (the plan is cached for training) and print it once.

        With ``--budget`` this is where the chosen tile sizes and the predicted peak are shown, and a budget nothing
        fits fails here rather than at the first large slide.
        """
        cfg = self.config
        shapes = [
            tuple(open_slide(r.image, level=cfg.level, mpp=cfg.mpp, where=r.where()).shape)
            for r in self.train_records
        ]
        index = max(range(len(shapes)), key=lambda i: math.prod(shapes[i][1:]))
        self.model.train()
        plan = self.model.streamed.plan((1, *shapes[index]), lazy=True)
        if self.ctx.is_main:
            size = "x".join(map(str, shapes[index][1:]))
            how = f"budget {cfg.budget}" if cfg.budget is not None else f"tile {cfg.tile_size}"
            crop = ", before --tissue-crop" if cfg.tissue_crop else ""
            print(
                f"streaming plan ({how}) for the largest training slide, {self.train_records[index].where()} "
                f"({size} px{crop}):\n{plan}",
                flush=True,
            )

    def _train_epoch(self) -> None:
        cfg, ctx = self.config, self.ctx
        order = epoch_order(cfg.seed, self.epoch, len(self.train_records))
        per_step = cfg.accumulate * ctx.world_size
        n_steps = math.ceil(len(order) / per_step)
        self.model.train()
        criterion = nn.CrossEntropyLoss(reduction="sum")
        bar = progress_bar(
            total=sum(
                len(step_shard(order[s * per_step : (s + 1) * per_step], ctx.rank, ctx.world_size))
                for s in range(n_steps)
            ),
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            unit="slide",
            enabled=cfg.progress and ctx.is_main,
        )
        done_before = sum(
            len(step_shard(order[s * per_step : (s + 1) * per_step], ctx.rank, ctx.world_size))
            for s in range(self.step_in_epoch)
        )
        bar.update(done_before)
        with bar:
            for step in range(self.step_in_epoch, n_steps):
                global_slides = order[step * per_step : (step + 1) * per_step]
                mine = step_shard(global_slides, ctx.rank, ctx.world_size)
                loss_sum, skipped = 0.0, 0
                for index in mine:
                    record = self.train_records[index]
                    x = self._input(record, index)
                    target = torch.tensor([record.label], device=self.device)
                    with autocast(cfg.amp, self.device):
                        logits = self.model(x)
                    loss = criterion(logits.float(), target)
                    if not self._slide_step(record, step, loss / len(global_slides)):
                        skipped += 1
                    else:
                        loss_sum += float(loss.detach())
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / max(len(mine) - skipped, 1):.4f}")
                # NOTE [ One all-reduce per optimizer step ]
                loss_sum, skipped = self._all_reduce(loss_sum, skipped)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self._check_parameters(step, [self.train_records[i] for i in mine])
                self.global_step += 1
                self.step_in_epoch = step + 1
                self.epoch_loss_sum += loss_sum
                self.epoch_slides += len(global_slides)
                self.epoch_skipped += skipped
                due = cfg.save_every > 0 and self.global_step % cfg.save_every == 0 and step + 1 < n_steps
                if due:
                    self._save()
                if self.on_step is not None:
                    self.on_step(
                        StepInfo(
                            self.epoch,
                            self.step_in_epoch,
                            self.global_step,
                            loss_sum / len(global_slides),
                            due,
                        )
                    )

    def _all_reduce(self, loss_sum: float, skipped: int) -> tuple[float, int]:
        """All-reduce gradients (and this step's loss sum and skipped slides, in the same message) across processes."""
        if not self.ctx.distributed:
            return loss_sum, skipped
        carrier = nn.Parameter(torch.zeros(2, dtype=self.dtype, device=self.device))
        carrier.grad = torch.tensor([loss_sum, skipped], dtype=self.dtype, device=self.device)
        self.ctx.all_reduce_gradients([*self.model.parameters(), carrier])
        return float(carrier.grad[0]), round(float(carrier.grad[1]))

    # -- NOTE [ Non-finite values ] -----------------------------------------------------------------------------------
    def _slide_step(self, record: SlideRecord, step: int, loss: torch.Tensor) -> bool:
        """Backpropagate one slide's (scaled) loss; False when the slide was skipped for non-finite values."""
        skip = self.config.skip_nonfinite
        if not bool(torch.isfinite(loss)):
            return self._nonfinite(record, step, "loss")
        # fp16 autocast: the GradScaler itself skips steps whose gradients overflow, so they are not checked here
        check = self.config.amp != "fp16"
        params = [p for p in self.model.parameters() if p.requires_grad]
        stash = [p.grad for p in params] if skip and check else None
        if stash is not None:  # this slide's gradient alone, so that it can be dropped
            for p in params:
                p.grad = None
        self.scaler.scale(loss).backward()
        finite = not check or all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
        if stash is not None:
            for p, before in zip(params, stash):
                if not finite or p.grad is None:
                    p.grad = before
                elif before is not None:
                    p.grad = before + p.grad
        if finite:
            return True
        return self._nonfinite(record, step, "gradients")

    def _nonfinite(self, record: SlideRecord, step: int, what: str) -> bool:
        where = (
            f"{record.where()} (epoch {self.epoch + 1}, optimizer step {self.global_step + 1}, step {step + 1} of "
            "the epoch)"
        )
        if self.config.skip_nonfinite:
            if self.ctx.is_main or self.ctx.distributed:
                print(f"skipped {where}: its {what} are not finite (--skip-nonfinite)", flush=True)
            return False
        image = open_slide(record.image, level=self.config.level, mpp=self.config.mpp, where=record.where())
        raise DataError(
            f"{nonfinite_message(where, record.image, image, what)}. Training stopped before this step changed "
            f"the model: {self.checkpoint_path} holds step {self.saved_step}. Fix or remove the slide and run again "
            "with --resume, or add --skip-nonfinite to skip such slides (counted in log.csv)"
        )

    def _check_parameters(self, step: int, slides: list[SlideRecord]) -> None:
        """An optimizer step that made a parameter non-finite stops the run before anything is saved."""
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if not bad:
            return
        shown = ", ".join(bad[:3]) + (f" ({len(bad)} in all)" if len(bad) > 3 else "")
        raise DataError(
            f"optimizer step {self.global_step + 1} (epoch {self.epoch + 1}, step {step + 1} of the epoch; slides "
            f"{', '.join(r.where() for r in slides)}) made parameters non-finite: {shown}. The learning rate is "
            f"probably too high (--lr {self.config.lr:g}). Nothing was saved: {self.checkpoint_path} holds step "
            f"{self.saved_step}"
        )

    def _input(self, record: SlideRecord, index: int) -> Any:
        rng = np.random.default_rng([self.config.seed, self.epoch, index])
        return slide_input(
            record,
            self.config,
            self.norm,
            self.dtype,
            rng=rng if self.config.augment else None,
            boxes=self.boxes,
        )


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The order of the n training slides in an epoch: a permutation seeded by (seed, epoch) only.

    >>> epoch_order(0, 3, 5) == epoch_order(0, 3, 5) != epoch_order(0, 4, 5)
    True
    """
    return [int(i) for i in np.random.default_rng([seed, epoch, 2**31]).permutation(n)]


def _channels(record: SlideRecord, config: TrainConfig) -> int:
    return int(open_slide(record.image, level=config.level, mpp=config.mpp, where=record.where()).shape[0])


def _load_records(config: TrainConfig) -> tuple[list[SlideRecord], list[SlideRecord]]:
    check = dict(decode_all=config.check_images, level=config.level, mpp=config.mpp)
    records = read_slide_csv(config.csv, **check)
    if config.val_csv:
        records += [
            SlideRecord(r.image, r.label, "val", r.line, r.source)
            for r in read_slide_csv(config.val_csv, **check)
        ]
    check_rows(records)  # NOTE [ Dataset checks ] in dataset.py
    train_records = [r for r in records if r.split == "train"]
    val_records = [r for r in records if r.split == "val"]
    if not train_records:
        raise DataError(
            f"{Path(config.csv).name}: no training slides (rows with split 'train' or no split column)"
        )
    check_same_channels([*train_records, *val_records], config.level, config.mpp)
    return train_records, val_records


def _lr_factor(schedule: str, epochs: int) -> Callable[[int], float]:
    """The learning rate of (0-based) ``epoch`` as a multiple of ``--lr``, in closed form; NOTE [ Schedule length ].

    >>> [round(_lr_factor("cosine", 4)(e), 4) for e in range(4)]
    [1.0, 0.8536, 0.5, 0.1464]
    >>> [round(_lr_factor("step", 6)(e), 4) for e in range(6)]
    [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    """
    if schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "step":
        step_size = max(1, epochs // 3)
        return lambda epoch: 0.1 ** (epoch // step_size)
    return lambda epoch: 1.0


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    # A LambdaLR over a plain function: its state (position, base rates) is saved, the function is not, so a run
    # resumed with another --epochs gets the schedule of the new length (NOTE [ Schedule length ]).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config.schedule, config.epochs))


def _write_log(path: Path, history: list[dict[str, float]]) -> None:
    rows = [[_fmt(h[c]) for c in LOG_COLUMNS] for h in history]
    atomic_write_csv(path, list(LOG_COLUMNS), rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)
