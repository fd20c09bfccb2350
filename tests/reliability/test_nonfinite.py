"""Non-finite values (NOTE [ Non-finite values ] in train/loop.py): a NaN slide stops training with the row and the
step and never replaces a good checkpoint; --skip-nonfinite skips it, counted in log.csv; an optimizer step that
overflows the weights stops the run before anything is saved."""

from __future__ import annotations

import csv
import math
import re

import numpy as np
import pytest
import torch

from tilegrad import DataError
from tilegrad.train import TrainConfig, load_checkpoint, train

from .conftest import SMALL, one_error_line, run_cli


def _config(csv_path, out, **overrides) -> TrainConfig:
    settings = dict(
        csv=str(csv_path), out=str(out), model="small_cnn", model_kwargs={"width": 4}, tile_size=32, epochs=2,
        lr=1e-2, seed=3, progress=False, device="cpu", save_every=1,
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture
def nan_csv(trained, tmp_path):
    """Four good slides and, on line 4, a float slide with one NaN pixel."""
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(trained / "img/s2.png"), np.float32)
    image = np.moveaxis(image, -1, 0).copy()
    image[2, 10, 11] = np.nan
    np.save(tmp_path / "nan.npy", image)
    rows = [f"{trained}/img/s{i}.png,{i % 2},train" for i in range(4)]
    rows.insert(2, "nan.npy,1,train")
    path = tmp_path / "slides.csv"
    path.write_text("image,label,split\n" + "\n".join(rows) + "\n")
    return path


def _finite(state: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state["model"].values())


def test_a_nan_slide_stops_training_naming_row_and_step_and_keeps_the_good_checkpoint(nan_csv, tmp_path):
    with pytest.raises(DataError) as info:
        train(_config(nan_csv, tmp_path / "run"))
    message = str(info.value)
    found = re.match(r"slides\.csv line 4 \(epoch 1, optimizer step (\d+), step \d+ of the epoch\): image 'nan\.npy' "
                     r"holds 1 NaN and 0 infinite pixel values \(the first at channel 2, row 10, column 11\)", message)  # fmt: skip
    assert found, message
    step = int(found.group(1))
    assert f"holds step {step - 1}" in message and "--skip-nonfinite" in message
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    if step > 1:  # the steps before were saved (save_every=1), the failing one never was
        state = load_checkpoint(checkpoint)
        assert state["global_step"] == step - 1 and _finite(state)
    else:
        assert not checkpoint.exists()


def test_skip_nonfinite_skips_the_slide_counts_it_and_resumes_a_stopped_run(nan_csv, tmp_path, capsys):
    with pytest.raises(DataError):
        train(_config(nan_csv, tmp_path / "run"))
    # the stopped run resumes with --skip-nonfinite (the one setting besides --epochs etc. that may change)
    argv = ["train", nan_csv, "--out", tmp_path / "run", "--epochs", "2", "--lr", "0.01", "--seed", "3", "--save-every", "1", *SMALL]  # fmt: skip
    code, err = run_cli(capsys, *argv, "--resume", "--skip-nonfinite")
    assert code == 0, err
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["global_step"] == 10 and _finite(state)
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["skipped"]) for r in rows] == [1, 1] and all(
        math.isfinite(float(r["train_loss"])) for r in rows
    )


def test_an_overflowing_step_stops_before_saving(trained, tmp_path):
    with pytest.raises(DataError, match=r"optimizer step 1 \(epoch 1, step 1 of the epoch; slides slides\.csv line "
                       r"\d\) made parameters non-finite: .*--lr 3e\+38.*holds step 0"):  # fmt: skip
        train(
            _config(
                trained / "slides.csv",
                tmp_path / "run",
                optimizer="sgd",
                momentum=0.0,
                lr=3e38,
                weight_decay=1e10,
            )
        )
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_the_command_line_prints_the_nonfinite_stop_as_one_line(nan_csv, tmp_path, capsys):
    code, err = run_cli(capsys, "train", nan_csv, "--out", tmp_path / "run", "--epochs", "1", *SMALL)
    assert code == 2 and "image 'nan.npy' holds 1 NaN" in one_error_line(err)
