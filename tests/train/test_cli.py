"""The command line: train, predict, saliency, demo, and errors printed with the offending row."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from tilegrad.cli import main

from .conftest import SMALL


def test_train_predict_saliency(slides, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(slides), "--out", str(out), "--epochs", "2", "--lr", "0.01", *SMALL]) == 0
    assert "epoch 2/2" in capsys.readouterr().out
    assert (
        main(["train", str(slides), "--out", str(out), "--epochs", "3", "--lr", "0.01", "--resume", *SMALL])
        == 0
    )
    printed = capsys.readouterr().out
    assert "resuming" in printed and "epoch 3/3" in printed and "epoch 1/3" not in printed
    pred = tmp_path / "pred.csv"
    assert main(["predict", str(out / "checkpoint.pt"), str(slides), str(pred), "--no-progress"]) == 0
    assert "wrote 6 predictions" in capsys.readouterr().out
    with open(pred) as f:
        assert len(list(csv.DictReader(f))) == 6
    png = tmp_path / "sal.png"
    assert (
        main(["saliency", str(out / "checkpoint.pt"), str(slides.parent / "img" / "s1.png"), str(png)]) == 0
    )
    assert png.exists() and png.with_suffix(".npy").exists()


def test_bad_csv_row_is_reported_with_its_line(slides, tmp_path, capsys):
    slides.write_text(slides.read_text().replace("img/s2.png,0", "img/s2.png,yes"))
    assert main(["train", str(slides), "--out", str(tmp_path / "run"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "tilegrad train: error: slides.csv line 4: label 'yes'" in err


def test_bad_model_kwargs(slides, tmp_path, capsys):
    assert (
        main(["train", str(slides), "--out", str(tmp_path / "r"), "--model-kwargs", "[1]", "--no-progress"])
        == 2
    )
    assert "--model-kwargs must be a JSON object" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "validation AUC, streamed at full resolution" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["streamed_peak"] > 0 and summary["conventional_peak"] > 0
    assert len(summary["figures"]) == 3  # learning curves + a saliency map per positive validation slide (2)
    assert all(Path(fig).exists() for fig in summary["figures"])
    # running it again replaces its own outputs
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--epochs", "1"]) == 0


# Issue 12: BatchNorm in training mode streams; --no-freeze-norm used to be refused with a streamed trunk.
def test_no_freeze_norm_trains_batchnorm_streamed(slides, tmp_path, capsys):
    out = tmp_path / "run"
    # tile 32 on 48x40 slides: the first segments run in several tiles, their statistics accumulated across them
    args = ["train", str(slides), "--out", str(out), "--model", "resnet18", "--tile", "32", "--epochs", "1"]
    assert main([*args, "--no-freeze-norm", "--no-progress", "--device", "cpu"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    # the running statistics moved: the layers trained in training mode (frozen ones keep 0 and 1)
    assert not torch.equal(state["trunk.bn1.running_mean"], torch.zeros(64))
    assert int(state["trunk.bn1.num_batches_tracked"]) == 4  # one update per training slide, as conventional


# Regression (issue 6 review): --budget chose a tile silently.
def test_budget_prints_the_chosen_plan_once_before_training(tmp_path, make_slides, capsys):
    slides = make_slides(tmp_path, size=(96, 80))  # large enough that 300KiB needs several tiles
    small = [a for a in SMALL if a not in ("--tile", "32")]
    args = [
        "train",
        str(slides),
        "--out",
        str(tmp_path / "run"),
        "--budget",
        "300KiB",
        "--epochs",
        "2",
        *small,
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("streaming plan (budget 300KiB) for the largest training slide") == 1
    plan = printed.split("streaming plan", 1)[1].split("epoch 1/2", 1)[0]  # printed before the first epoch
    assert (
        "slides.csv line 2 (96x80 px)" in plan and "predicted peak" in plan and "(budget 300.00 KiB)" in plan
    )
    assert re.search(r"tile \d+x\d+ of 96x80 image px, [2-9] tiles", plan)


def test_check_images_decodes_every_image_before_training(slides, tmp_path, capsys):
    from .conftest import write_damaged_tiff

    write_damaged_tiff(slides.parent / "img" / "damaged.tif")
    slides.write_text(slides.read_text().replace("img/s3.png,1,train", "img/damaged.tif,1,train"))
    assert main(["train", str(slides), "--out", str(tmp_path / "run"), "--check-images", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "tilegrad train: error: slides.csv line 5: image 'img/damaged.tif' cannot be decoded" in err
    assert main(["train", str(slides), "--out", str(tmp_path / "run"), "--epochs", "1", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "tilegrad train: error: slides.csv line 5: " in err and "re-export it or remove its row" in err
