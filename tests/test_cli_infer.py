"""`tilegrad infer` in-process: MODEL as a training checkpoint or a factory with --weights, integer outputs,
--overwrite, and Ctrl-C followed by --resume."""

from __future__ import annotations

import importlib.util
import re

import numpy as np
import pytest
import torch

from tilegrad.cli import main

from .train.conftest import write_slides

FACTORY = """
import os
import torch
from torch import nn

from tilegrad.geometry import observer_hook

def build():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1))
    calls = os.environ.get("CALLS_FILE")
    stop = int(os.environ.get("INTERRUPT_AFTER", "0"))

    def count(module, args):  # one line per forward call on real tiles (not the meta shape probe)
        if calls and args[0].device.type != "meta":
            with open(calls, "a") as f:
                f.write(f"{args[0].shape[0]}\\n")
            if stop and sum(1 for _ in open(calls)) > stop:
                raise KeyboardInterrupt

    net[0].register_forward_pre_hook(observer_hook(count))  # it only watches: tilegrad runs it on every tile
    return net
"""


def _factory(tmp_path):
    path = tmp_path / "mymodels.py"
    path.write_text(FACTORY)
    spec = importlib.util.spec_from_file_location("mymodels_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return f"{path}:build", module.build


def _volume(tmp_path, shape=(1, 20, 24, 18)):
    volume = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "scan.npy", volume)
    return tmp_path / "scan.npy", volume


def _whole(build, volume):
    with torch.no_grad():
        return build()(torch.from_numpy(volume)[None])[0].numpy()


def test_a_training_checkpoint_is_a_model(tmp_path, capsys):
    csv = write_slides(tmp_path, size=(112, 80))
    run = tmp_path / "run"
    small = ["--model", "small_cnn", "--model-kwargs", '{"width": 4}', "--tile", "32", "--no-progress"]
    assert main(["train", str(csv), "--out", str(run), "--epochs", "1", "--device", "cpu", *small]) == 0
    slide = tmp_path / "img" / "s1.png"
    out = tmp_path / "features.npy"
    code = main(["infer", str(run / "checkpoint.pt"), str(slide), str(out), "--tile", "64", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "trunk" in capsys.readouterr().out
    from tilegrad.io import open_image
    from tilegrad.train import SlideInput, load_trained_model

    model, _ = load_trained_model(run / "checkpoint.pt", device="cpu")
    x = torch.from_numpy(SlideInput(open_image(slide))[:])  # scaled to [0, 1] as in training
    with torch.no_grad():
        expected = model.trunk(x)[0].numpy()
    got = np.load(out)
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5


def test_a_bare_state_dict_needs_a_factory_and_weights(tmp_path, capsys):
    spec, build = _factory(tmp_path)
    scan, volume = _volume(tmp_path)
    trained = build()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)  # weights that differ from build()'s
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "seg.npy"
    assert main(["infer", str(tmp_path / "weights.pt"), str(scan), str(out), "--tile", "12"]) == 2
    err = capsys.readouterr().err
    assert "holds only weights" in err and "as MODEL and this file as --weights" in err
    code = main(["infer", spec, str(scan), str(out), "--tile", "12", "--weights", str(tmp_path / "weights.pt"),
                 "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    with torch.no_grad():
        expected = trained(torch.from_numpy(volume)[None])[0].numpy()
    assert np.abs(np.load(out) - expected).max() < 1e-5
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert main(["infer", str(tmp_path / "junk.pt"), str(scan), str(tmp_path / "x.npy"), "--tile", "12"]) == 2
    assert "is corrupt" in capsys.readouterr().err
    torch.save(torch.nn.Conv3d(1, 2, 3), tmp_path / "pickled.pt")  # a pickled module: weights_only refuses it
    assert main(["infer", spec, str(scan), str(tmp_path / "x.npy"), "--tile", "12", "--weights",
                 str(tmp_path / "pickled.pt")]) == 2  # fmt: skip
    assert "holds Python objects" in capsys.readouterr().err


def test_float_output_into_an_integer_dtype_needs_round(tmp_path, capsys):
    spec, build = _factory(tmp_path)
    scan, volume = _volume(tmp_path)
    out = tmp_path / "seg.npy"
    assert main(["infer", spec, str(scan), str(out), "--tile", "12", "--dtype", "uint8"]) == 2
    assert "--round" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.glob("seg.npy*")) == []
    assert main(["infer", spec, str(scan), str(out), "--tile", "12", "--dtype", "uint8", "--round",
                 "--no-progress"]) == 0  # fmt: skip
    expected = np.clip(np.rint(_whole(build, volume)), 0, 255)
    got = np.load(out)
    assert got.dtype == np.uint8 and (got == expected).all()
    assert (expected == 0).any() and (expected > 0).any()  # negative values were clipped, not wrapped to 25x


def test_existing_output_needs_overwrite(tmp_path, capsys):
    spec, _ = _factory(tmp_path)
    scan, _ = _volume(tmp_path)
    out = tmp_path / "seg.npy"
    args = ["infer", spec, str(scan), str(out), "--tile", "12", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_ctrl_c_keeps_written_tiles_and_resume_finishes(tmp_path, capsys, monkeypatch):
    spec, build = _factory(tmp_path)
    scan, volume = _volume(tmp_path)
    out = tmp_path / "seg.nii"
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("CALLS_FILE", str(calls))
    monkeypatch.setenv("INTERRUPT_AFTER", "3")  # Ctrl-C inside the model, in the 4th tile
    args = ["infer", spec, str(scan), str(out), "--tile", "12", "--no-progress"]
    assert main(args) == 130
    err = capsys.readouterr().err
    written = re.search(r"(\d+) of (\d+) tiles are written", err)
    assert written and int(written[1]) == 3 and "--resume" in err and "seg.nii.partial" in err
    total = int(written[2])
    assert not out.exists()  # nothing half-written under the final name
    assert sorted(p.name for p in tmp_path.glob("seg.nii*")) == [
        "seg.nii.partial",
        "seg.nii.partial.tiles.json",
    ]
    assert main(args) == 2
    assert "--resume to continue it, or --overwrite" in capsys.readouterr().err

    monkeypatch.delenv("INTERRUPT_AFTER")
    calls.unlink()
    assert main([*args, "--resume", "--batch-tiles", "4"]) == 0, capsys.readouterr().err
    batches = [int(n) for n in calls.read_text().split()]
    assert sum(batches) == total - 3 and max(batches) > 1  # only the missing tiles, several per forward call
    import nibabel

    got = np.asarray(nibabel.load(out).dataobj)
    assert np.abs(np.moveaxis(got, -1, 0) - _whole(build, volume)).max() < 1e-5
    assert sorted(p.name for p in tmp_path.glob("seg.nii*")) == ["seg.nii"]  # journal and partial gone


def test_resume_without_an_interrupted_run_starts_it_as_train_does(tmp_path, capsys):
    # issue 13: --resume means the same in train and infer: continue the run, or start it if there is none yet
    spec, _ = _factory(tmp_path)
    scan, _ = _volume(tmp_path)
    assert main(["infer", spec, str(scan), str(tmp_path / "o.zarr"), "--tile", "12", "--resume"]) == 0
    assert "no interrupted run" in capsys.readouterr().out and (tmp_path / "o.zarr").exists()


@pytest.mark.parametrize("bad", [["--batch-tiles", "0"], ["--dtype", "notatype"]])
def test_bad_options(tmp_path, capsys, bad):
    spec, _ = _factory(tmp_path)
    scan, _ = _volume(tmp_path)
    assert main(["infer", spec, str(scan), str(tmp_path / "o.npy"), "--tile", "12", *bad]) == 2
    assert bad[0] in capsys.readouterr().err
