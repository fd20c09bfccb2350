"""`tilegrad memory`, run in-process through tilegrad.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tilegrad.cli import main

MODELS = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_models.py"


def run(capsys, *argv):
    code = main(["memory", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_and_totals_for_a_torchvision_model(capsys):
    pytest.importorskip("torchvision")
    code, out, _ = run(
        capsys, "resnet18", "--input", "3x64x64", "--batch", "2", "--optimizer", "sgd", "--rows", "5"
    )
    assert code == 0
    assert "conv1" in out and "2x64x32x32" in out  # first row: name and output shape
    assert "PEAK (train step)" in out and "optimizer state" in out and "MiB" in out
    assert "more layers" in out  # --rows 5 cut the table


def test_json_report_with_budget(capsys):
    pytest.importorskip("torchvision")
    code, out, _ = run(
        capsys, "resnet18", "--input", "3x64x64", "--mode", "infer", "--budget", "1GiB", "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["mode"] == "infer" and data["fits"] is True and data["budget_bytes"] == 2**30
    assert data["layers"][0]["name"] == "conv1" and data["peak_bytes"] > data["parameter_bytes"]


def test_factory_spec_3d_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "layers.png"
    code, out, _ = run(capsys, f"{MODELS}:espcn3d", "--input", "6x12x12x12", "--plot", str(png))
    assert code == 0
    assert "1x6x16x16x16" in out  # pixel shuffle output of the ESPCN-style net: (12 - 4) * 2
    assert png.stat().st_size > 1000


def test_streamed_tile(capsys):
    code, out, _ = run(capsys, f"{MODELS}:small_cnn", "--input", "3x512x512", "--tile", "128")
    assert code == 0
    assert "trunk streamed, tile 128" in out and "streamed 0:" in out


def test_over_budget_suggests_a_tile(capsys):
    code, out, _ = run(capsys, f"{MODELS}:small_cnn", "--input", "3x2048x2048", "--budget", "600MiB")
    assert code == 0
    assert "does NOT fit" in out
    assert "--tile" in out  # the planner's tile and its simulated peak


def test_over_budget_because_of_parameters_says_no_tile_helps(capsys):
    code, out, _ = run(capsys, f"{MODELS}:small_cnn", "--input", "3x64x64", "--budget", "1KB")
    assert code == 0
    assert "no tile size can bring this under the budget" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["resnet18", "--input", "3x224xabc"], "cannot read --input '3x224xabc'"),  # bad shape string
        (["resnet81", "--input", "3x224x224"], "unknown model 'resnet81'"),  # unknown name, with suggestions
        (["resnet18", "--input", "4x64x64"], "expects input (N, 3, H, W)"),  # fails on that input
        (["nosuchpkg.mod:build", "--input", "3x64x64"], "cannot import module 'nosuchpkg.mod'"),
        (["resnet18", "--input", "3x64x64", "--budget", "lots"], "cannot read 'lots' as a byte count"),
        (["resnet18", "--input", "3x64x64", "--batch", "0"], "--batch must be a positive integer"),
    ],
)
def test_errors_say_what_was_received_and_expected(capsys, argv, needle):
    pytest.importorskip("torchvision")
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert needle in err, err
