"""`tilegrad plan`, `tilegrad infer` and `tilegrad bench`, run in-process."""

from __future__ import annotations

import json

import numpy as np
import torch

from tilegrad.cli import main

FACTORY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1))
"""


def test_plan_prints_segments_and_json(capsys):
    assert main(["plan", "resnet18", "--input", "3x512x512", "--tile", "256"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "streamed" in out and "tiles" in out
    assert main(["plan", "resnet18", "--input", "3x512x512", "--budget", "1GiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_bytes"] <= 2**30 and data["segments"]


def test_plan_with_normalisation_in_training_mode(capsys):
    # --train-norm plans what `tilegrad train --no-freeze-norm` runs: every BatchNorm's input is a boundary whose
    # statistics are complete before the layer applies them (bn1's input: conv1 is a segment of its own), where in
    # eval mode BatchNorm is element-wise and conv1 .. relu streams as one segment; the deep one-tile segments run as
    # one whole piece whose BatchNorm layers compute their own statistics (NOTE [ Whole pieces ] in graph.py)
    args = ["plan", "resnet18", "--input", "3x512x512", "--tile", "256", "--json"]
    assert main(args) == 0
    frozen = json.loads(capsys.readouterr().out)
    assert main([*args, "--train-norm"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert frozen["segments"][0]["layers"] == "conv1 .. relu"
    assert trained["segments"][0]["layers"] == "conv1" and trained["segments"][0]["tiles"] > 1
    assert trained["time_parts"]["statistics"] > 0 == frozen["time_parts"]["statistics"]
    assert any(s["whole"] for s in trained["segments"]) and not any(s["whole"] for s in frozen["segments"])
    assert trained["time_ratio"] > frozen["time_ratio"]


def test_plan_bad_shape_is_a_clear_error(capsys):
    assert main(["plan", "resnet18", "--input", "3by512", "--tile", "256"]) == 2
    assert "cannot read --input '3by512'" in capsys.readouterr().err


def test_infer_npy_to_nifti_equals_whole_volume(tmp_path, capsys):
    (tmp_path / "mymodels.py").write_text(FACTORY)
    volume = np.random.default_rng(0).standard_normal((1, 20, 24, 18)).astype(np.float32)
    np.save(tmp_path / "scan.npy", volume)
    out = tmp_path / "seg.nii.gz"
    code = main(["infer", f"{tmp_path / 'mymodels.py'}:build", str(tmp_path / "scan.npy"), str(out),
                 "--tile", "12", "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    import nibabel

    got = np.asarray(nibabel.load(out).dataobj)
    import importlib.util

    spec = importlib.util.spec_from_file_location("mymodels_check", tmp_path / "mymodels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.no_grad():
        expected = module.build()(torch.from_numpy(volume)[None])[0].numpy()
    # NIfTI stores (x, y, z, channel); tilegrad's writer puts channels last
    got_c_first = np.moveaxis(got, -1, 0) if got.shape[-1] == 2 else got
    assert got_c_first.shape == expected.shape
    assert np.abs(got_c_first - expected).max() < 1e-5


def test_bench_lists_targets(capsys):
    try:
        main(["bench", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert "streaming" in capsys.readouterr().out


def test_plan_names_a_missing_scratch_directory(capsys, tmp_path):
    # a missing --scratch-dir is said to be missing (it was reported as "0 B free"); an existing one reports its
    # free bytes in the JSON
    missing = tmp_path / "no-such-dir"
    args = ["plan", "resnet18", "--input", "3x512x512", "--tile", "256", "--tiers", "disk", "--scratch-dir"]
    assert main([*args, str(missing)]) == 0
    out = capsys.readouterr().out
    assert f"{missing} does not exist" in out and "0 B free" not in out
    assert main([*args, str(missing), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (
        data["disk_bytes"] > 0 and data["scratch_free_bytes"] is None and data["scratch_dir"] == str(missing)
    )
    assert main([*args, str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["scratch_free_bytes"] > 0 and "scratch_problem" not in data
