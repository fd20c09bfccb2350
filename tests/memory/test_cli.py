"""`tilegrad memory`, run in-process through tilegrad.cli.main."""

from __future__ import annotations

import json
import re
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


def _peak_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("PEAK"))


def test_over_budget_suggests_a_tile_that_fits_when_rerun(capsys):
    # Regression: the suggestion came from tile_size="auto", whose plan differs from a rerun with that --tile, and
    # could say "still does NOT fit". It must fit, and rerunning with the printed --tile must show the same peak.
    code, out, _ = run(capsys, f"{MODELS}:small_cnn", "--input", "3x2048x2048", "--budget", "600MiB")
    assert code == 0
    assert "does NOT fit" in out
    match = re.search(r"streamed with --tile (\S+) the predicted peak is (.+?): it fits", out)
    assert match, out
    tile, peak = match.groups()
    code, again, _ = run(
        capsys, f"{MODELS}:small_cnn", "--input", "3x2048x2048", "--budget", "600MiB", "--tile", tile
    )
    assert code == 0
    assert f"the predicted peak {peak} fits" in again, again


def test_tile_as_one_number_or_one_per_dim_is_the_same_estimate(capsys):
    # --tile 128 and --tile 128x128 are the same tile: the same plan, the same simulated peak.
    _, square, _ = run(capsys, f"{MODELS}:small_cnn", "--input", "3x512x512", "--tile", "128", "--json")
    _, explicit, _ = run(capsys, f"{MODELS}:small_cnn", "--input", "3x512x512", "--tile", "128x128", "--json")
    a, b = json.loads(square), json.loads(explicit)
    assert a["peak_bytes"] == b["peak_bytes"] and a["notes"] == b["notes"]


FULLY_CONVOLUTIONAL = """
from torch import nn


def fcn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 2, 3, padding=1))


def fcn_instance_norm():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.InstanceNorm2d(16), nn.Conv2d(16, 2, 3, padding=1))
"""


@pytest.fixture
def fcn_file(tmp_path):
    path = tmp_path / "fcn_models.py"
    path.write_text(FULLY_CONVOLUTIONAL)
    return path


def test_a_fully_convolutional_model_is_streamed_whole(capsys, fcn_file):
    # Regression: "cannot split Sequential at None" for models without a head (U-Nets, ESPCN).
    code, out, err = run(capsys, f"{fcn_file}:fcn", "--input", "1x512x512", "--tile", "128")
    assert code == 0, err
    assert "the whole model is streamed" in out and "(streamed, tile 128)" in out
    assert "1 BatchNorm layers of the model were put in eval mode" in out  # the frozen-BatchNorm note is kept


def test_a_model_with_instance_norm_is_streamed_now(capsys, fcn_file):
    # InstanceNorm streams as a statistics layer (NOTE [ Streamed statistics ]): it was refused before
    code, _, err = run(capsys, f"{fcn_file}:fcn_instance_norm", "--input", "1x256x256", "--tile", "64")
    assert code == 0, err
    assert "InstanceNorm" not in err


def test_inference_over_budget_points_to_tiled_inference(capsys, fcn_file):
    code, out, _ = run(
        capsys, f"{fcn_file}:fcn", "--input", "1x2048x2048", "--mode", "infer", "--budget", "200MiB"
    )
    assert code == 0
    assert "does NOT fit" in out and "streamed with --tile" in out and "it fits" in out
    assert "tilegrad infer" in out and "tilegrad.infer(model, source, tile_size=" in out
    _, out, _ = run(capsys, f"{fcn_file}:fcn_instance_norm", "--input", "1x2048x2048", "--mode", "infer",
                    "--budget", "100MiB")  # fmt: skip
    assert "tilegrad infer" in out and "streaming cannot help" not in out


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
        (["resnet18", "--input", "3x64x64", "--rows", "-3"], "--rows must be 0 or more"),
        (
            ["resnet18", "--input", "3x64x64", "--mode", "infer", "--optimizer", "adam"],
            "has no effect with --mode infer",
        ),
        (
            ["resnet18", "--input", "3x64x64", "--plot", "/nonexistent/dir/x.png"],
            "the directory /nonexistent/dir does not",
        ),
        # a model too small for its BatchNorm: the failing layer is named, not the first one
        (["resnet18", "--input", "3x32x32"], "layer 'layer4.0.bn1' (BatchNorm2d"),
    ],
)
def test_errors_say_what_was_received_and_expected(capsys, argv, needle):
    pytest.importorskip("torchvision")
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert needle in err, err


def test_plot_without_matplotlib_names_the_extra(capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )
    code, _, err = run(capsys, f"{MODELS}:small_cnn", "--input", "3x64x64", "--plot", "x.png")
    assert code == 2 and "pip install 'tilegrad[plot]'" in err


def test_report_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    import sys

    from torch import nn

    from tilegrad import MissingDependencyError, estimate_memory

    report = estimate_memory(nn.Sequential(nn.Conv2d(1, 2, 3)), (1, 1, 8, 8))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"tilegrad\[plot\]"):
        report.plot(tmp_path / "x.png")


def test_plot_that_cannot_be_written_says_why(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    target = tmp_path / "layers.png"
    target.mkdir()  # a directory where the chart should go
    code, _, err = run(capsys, f"{MODELS}:small_cnn", "--input", "3x64x64", "--plot", str(target))
    assert code == 2 and f"cannot write --plot {target}" in err, err


@pytest.mark.parametrize("budget", ["600MiB", "300MiB"])
def test_memory_and_plan_suggest_the_same_tile_for_a_budget(capsys, budget):
    # both commands ask the planner (plan_streaming with tile_size="auto" and the budget): one tile, not two searches
    code, out, _ = run(capsys, f"{MODELS}:small_cnn", "--input", "3x2048x2048", "--budget", budget, "--json")
    assert code == 0
    suggestion = json.loads(out)["suggestion"]
    assert main(["plan", f"{MODELS}:small_cnn", "--input", "3x2048x2048", "--budget", budget, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not plan["conventional"]
    assert suggestion["tile"] == plan["segments"][0]["tile"], (suggestion, plan)
    assert suggestion["fits"] is True
