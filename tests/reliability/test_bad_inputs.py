"""The mistakes users make, replayed through the command line: each ends in one line naming the file or row and
the fix, exit code 2, and no traceback (issue 13). One table; each case builds its inputs in a fresh directory from
the shared trained run (tests/reliability/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import SMALL, one_error_line, run_cli


def _png(path: Path, shape: tuple[int, ...], value: int = 120) -> Path:
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)
    return path


def _csv(path: Path, *rows: str, header: str = "image,label,split") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _train(d: Path, csv: Path, *extra: str) -> list:
    return ["train", csv, "--out", d / "run2", "--epochs", "1", *SMALL, *extra]


# Each builder gets (trained directory T, fresh directory d) and returns argv; then (exit code, fragment of the line).
CASES = [
    # ---- images that do not fit the model ----------------------------------------------------------------------
    (  # a grayscale image into an RGB checkpoint
        "predict-grayscale",
        lambda T, d: ["predict", T / "run/checkpoint.pt", _csv(d / "g.csv", f"{_png(d / 'g.png', (40, 40))},0", header="image,label"), d / "o.csv"],
        "g.csv line 2: image 'g.png' has 1 channel (grayscale); the model takes 3 (RGB). Convert it",
    ),
    (  # RGBA into RGB: saliency names the image
        "saliency-rgba",
        lambda T, d: ["saliency", T / "run/checkpoint.pt", _png(d / "a.png", (40, 40, 4)), d / "s.png"],
        "image 'a.png' has 4 channels (RGBA); the model takes 3 (RGB)",
    ),
    (  # infer with a checkpoint: channels checked before anything runs
        "infer-checkpoint-grayscale",
        lambda T, d: ["infer", T / "run/checkpoint.pt", _png(d / "g.png", (40, 40)), d / "o.npy", "--tile", "32"],
        "g.png has 1 channel(s)",
    ),
    (  # infer with a factory model: the shape mismatch is found on meta tensors
        "infer-factory-grayscale",
        lambda T, d: ["infer", "small_cnn", _png(d / "g.png", (40, 40)), d / "o.npy", "--tile", "32"],
        "small_cnn cannot run on",
    ),
    (  # the CSV check before training reads every image's channels, not one pixel
        "train-mixed-channels",
        lambda T, d: _train(d, _csv(d / "m.csv", f"{T}/img/s0.png,0,train", f"{T}/img/s1.png,1,train", f"{_png(d / 'g.png', (48, 40))},0,train")),
        "m.csv line 4: image 'g.png' has 1 channel, the images before it 3",
    ),
    (  # smaller than the receptive field of the network (vgg11 pools 5 times)
        "train-image-too-small",
        lambda T, d: ["train", _csv(d / "t.csv", f"{_png(d / 'a.png', (8, 8, 3))},0", f"{_png(d / 'b.png', (8, 8, 3), 30)},1", header="image,label"), "--out", d / "r", "--model", "vgg11", "--tile", "64", "--epochs", "1", "--no-progress", "--device", "cpu"],
        "t.csv line 2: image 'a.png' is 8x8 px, too small for the model 'vgg11'",
    ),
    (
        "predict-label-beyond-classes",
        lambda T, d: ["predict", T / "run/checkpoint.pt", _csv(d / "l.csv", f"{T}/img/s0.png,5", header="image,label"), d / "o.csv"],
        "l.csv line 2: label 5 is not a class of the checkpoint",
    ),
    (  # NaN pixels: predict names the row, the file and what it holds
        "predict-nan-image",
        lambda T, d: ["predict", T / "run/checkpoint.pt", _csv(d / "n.csv", f"{_npy(d / 'n.npy')},0", header="image,label"), d / "o.csv"],
        "n.csv line 2: image 'n.npy' holds 1 NaN and 0 infinite pixel values (the first at channel 1, row 5, column 7)",
    ),
    (
        "saliency-nan-image",
        lambda T, d: ["saliency", T / "run/checkpoint.pt", _npy(d / "n.npy"), d / "s.png"],
        "image 'n.npy' holds 1 NaN and 0 infinite pixel values",
    ),
    # ---- broken model files ------------------------------------------------------------------------------------
    (
        "predict-junk-checkpoint",
        lambda T, d: ["predict", _text(d / "junk.pt"), T / "slides.csv", d / "o.csv"],
        "junk.pt' is corrupt or truncated and cannot be loaded",
    ),
    (
        "infer-junk-weights",
        lambda T, d: ["infer", "small_cnn", T / "img/s0.png", d / "o.npy", "--tile", "32", "--weights", _text(d / "junk.pt")],
        "weights file",
    ),
    (  # another architecture's weights
        "infer-other-architecture",
        lambda T, d: ["infer", "resnet18", T / "img/s0.png", d / "o.npy", "--tile", "32", "--weights", T / "run/checkpoint.pt"],
        "does not fit resnet18: missing keys",
    ),
    (
        "train-unknown-model-kwargs",
        lambda T, d: ["train", T / "slides.csv", "--out", d / "r", "--model", "small_cnn", "--model-kwargs", '{"depth": 3}', "--tile", "32", "--no-progress", "--device", "cpu"],
        "unexpected keyword argument 'depth'. Check the keyword arguments (--model-kwargs",
    ),
    # ---- options -----------------------------------------------------------------------------------------------
    ("train-out-is-a-file", lambda T, d: ["train", T / "slides.csv", "--out", _text(d / "f"), *SMALL], "is a file; expected a run directory"),
    ("predict-out-under-a-file", lambda T, d: ["predict", T / "run/checkpoint.pt", T / "slides.csv", _text(d / "f") / "o.csv"], "is a file, not a directory"),
    ("infer-out-under-a-file", lambda T, d: ["infer", "small_cnn", T / "img/s0.png", _text(d / "f") / "o.npy", "--tile", "32"], "is a file, not a directory"),
    ("saliency-max-side-zero", lambda T, d: ["saliency", T / "run/checkpoint.pt", T / "img/s0.png", d / "s.png", "--max-side", "0"], "--max-side (max_side) must be a positive"),
    ("train-tile-zero", lambda T, d: ["train", T / "slides.csv", "--out", d / "r", "--model", "small_cnn", "--tile", "0"], "tile_size must be a positive number of pixels, received 0"),
    # ---- one behaviour across commands: existing outputs ---------------------------------------------------------
    ("predict-exists", lambda T, d: ["predict", T / "run/checkpoint.pt", T / "slides.csv", _text(d / "o.csv")], "o.csv already exists: pass --overwrite"),
    ("saliency-exists", lambda T, d: ["saliency", T / "run/checkpoint.pt", T / "img/s0.png", _text(d / "s.npy").with_suffix(".png")], "s.npy already exists: pass --overwrite"),
    ("infer-exists", lambda T, d: ["infer", "small_cnn", T / "img/s0.png", _text(d / "o.npy"), "--tile", "32"], "o.npy already exists: pass --overwrite"),
    # ---- CSV sanity (NOTE [ Dataset checks ] in train/dataset.py; documented in docs/training.md) ----------------
    ("csv-two-labels", lambda T, d: _train(d, _csv(d / "c.csv", f"{T}/img/s0.png,0,train", f"{T}/img/s1.png,1,train", f"{T}/img/s0.png,1,train")), "c.csv line 2 and c.csv line 4 give image 's0.png' two labels (0 and 1)"),
    ("csv-leakage", lambda T, d: _train(d, _csv(d / "c.csv", f"{T}/img/s0.png,0,train", f"{T}/img/s1.png,1,train", f"{T}/img/s0.png,0,val")), "put image 's0.png' in both the train and the val split"),
    ("csv-leakage-val-csv", lambda T, d: _train(d, _csv(d / "c.csv", f"{T}/img/s0.png,0,train", f"{T}/img/s1.png,1,train"), "--val-csv", _csv(d / "v.csv", f"{T}/img/s1.png,1", header="image,label")), "c.csv line 3 and v.csv line 2 put image 's1.png' in both"),
    ("csv-skipped-class", lambda T, d: _train(d, _csv(d / "c.csv", f"{T}/img/s0.png,0,train", f"{T}/img/s1.png,2,train")), "the training labels are [0, 2]: class 1 has no training slide"),
    ("csv-one-class", lambda T, d: _train(d, _csv(d / "c.csv", f"{T}/img/s0.png,1,train", f"{T}/img/s1.png,1,train")), "all 2 training slides have label 1"),
]  # fmt: skip


def _npy(path: Path) -> Path:
    a = np.full((3, 40, 40), 0.5, np.float32)
    a[1, 5, 7] = np.nan
    np.save(path, a)
    return path


def _text(path: Path) -> Path:
    path.write_text("hello world\n" * 10)
    return path


@pytest.mark.parametrize(("build", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_mistake_ends_in_one_line(trained, tmp_path, capsys, build, fragment):
    argv = build(trained, tmp_path)
    if argv and argv[0] in ("predict", "infer"):
        argv = [*argv, "--no-progress"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli(capsys, *argv)
    line = one_error_line(err)
    assert code == 2 and fragment in line, line
    # nothing half-written is left behind (inputs the case wrote itself stay)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_duplicate_row_is_a_one_line_warning_and_training_goes_on(trained, tmp_path, capsys):
    csv = _csv(
        tmp_path / "c.csv",
        f"{trained}/img/s0.png,0,train",
        f"{trained}/img/s1.png,1,train",
        f"{trained}/img/s1.png,1,train",
    )
    code, err = run_cli(capsys, *_train(tmp_path, csv))
    assert code == 0
    warning = [line for line in err.splitlines() if line.strip()]
    assert warning == [
        "tilegrad train: warning: c.csv line 3 and c.csv line 4 list image 's1.png' twice with the same label and "
        "split: it counts twice per epoch. Remove one row unless the oversampling is intended"
    ]


def test_predict_and_saliency_replace_with_overwrite(trained, tmp_path, capsys):
    out = _text(tmp_path / "o.csv")
    code, _ = run_cli(
        capsys,
        "predict",
        trained / "run/checkpoint.pt",
        trained / "slides.csv",
        out,
        "--overwrite",
        "--no-progress",
    )
    assert code == 0 and out.read_text().startswith("image,label,probability")
    png = tmp_path / "s.png"
    assert run_cli(capsys, "saliency", trained / "run/checkpoint.pt", trained / "img/s0.png", png)[0] == 0
    assert run_cli(capsys, "saliency", trained / "run/checkpoint.pt", trained / "img/s0.png", png)[0] == 2
    assert (
        run_cli(
            capsys, "saliency", trained / "run/checkpoint.pt", trained / "img/s0.png", png, "--overwrite"
        )[0]
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.csv", "s.npy", "s.png"]
