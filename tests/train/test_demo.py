"""The demo's data: lesions exist at full resolution and vanish at the 8x pyramid level."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tilegrad.io import open_image
from tilegrad.train.demo import DemoSettings, _downsample, make_demo_slides, synthetic_slide


def test_lesions_vanish_when_downsampled_8x():
    for seed in range(3):
        positive, lesions = synthetic_slide(np.random.default_rng(seed), 256, positive=True)
        # the same draws without lesions: the lesions are added last
        negative, none = synthetic_slide(np.random.default_rng(seed), 256, positive=False)
        assert lesions and not none
        diff = np.abs(positive.astype(int) - negative.astype(int))
        assert diff.max() >= 60  # clearly visible at full resolution ...
        for cy, cx, r in lesions:
            assert diff[cy - r : cy + r, cx - r : cx + r].any()
        # ... and gone after 8x8 box averaging, up to the rounding of pixels to 8 bits (NOTE [ Lesions vanish at 8x ])
        down = np.abs(_downsample(positive, 8) - _downsample(negative, 8))
        assert down.max() < 0.5 and down.mean() < 0.01
        assert np.abs(_downsample(positive, 4) - _downsample(negative, 4)).max() < 1.0
        assert np.abs(_downsample(positive, 2) - _downsample(negative, 2)).max() > 10  # 2x still shows them


def test_demo_slides_are_pyramidal_tiffs_with_an_8x_level(tmp_path):
    settings = DemoSettings(size=128, n_train=2, n_val=2)
    data = make_demo_slides(tmp_path, settings)
    rows = data["csv"].read_text().splitlines()
    assert rows[0] == "image,label,split" and len(rows) == 5
    first = tmp_path / rows[1].split(",")[0]
    image = open_image(first)
    assert image.shape == (3, 128, 128) and len(image.levels) == 4
    assert open_image(first, level=data["level"]).shape == (3, 16, 16)
    assert image.mpp is not None and abs(image.mpp - 0.25) < 1e-6


def test_demo_tile_makes_the_streamed_step_clearly_leaner_than_the_conventional_one():
    """Regression (issue 6 review): at tile 256 the 512x512 demo slide is 2x2 tiles and the streamed step's
    measured peak (~26 MiB) was no lower than the conventional prediction (25 MiB)."""
    import torch

    from tilegrad import estimate_memory
    from tilegrad.train import build_model

    s = DemoSettings()
    model = build_model("small_cnn", 2, model_kwargs={"width": s.width}, tile_size=s.tile).train()
    shape = (1, 3, s.size, s.size)
    streamed = model.streamed.plan(shape, lazy=True).peak_bytes
    conventional = estimate_memory(
        torch.nn.Sequential(model.trunk, model.head), shape, mode="train"
    ).peak_bytes
    assert streamed < 0.6 * conventional


def test_demo_memory_report_measures_the_demo_slide_and_predicts_a_whole_slide(tmp_path):
    from tilegrad.train import build_model
    from tilegrad.train.demo import _memory, _memory_lines

    s = DemoSettings(size=128, n_train=2, n_val=0, width=4, tile=64, whole_slide=2048)
    data = make_demo_slides(tmp_path, s)
    model = build_model("small_cnn", 2, model_kwargs={"width": s.width}, tile_size=s.tile)
    memory = _memory(model, data, s)
    assert memory["streamed_peak"] > 0 and memory["conventional_peak"] > 0
    assert memory["whole_slide_size"] == 2048
    # 256x the pixels: the conventional step grows with the slide, the streamed one much less
    assert memory["whole_slide_conventional_peak"] > 100 * memory["conventional_peak"]
    assert memory["whole_slide_streamed_peak"] < memory["whole_slide_conventional_peak"] / 2
    text = "\n".join(_memory_lines(memory, s))
    assert "demo slide 128x128" in text and "whole slide 2048x2048" in text
    assert (
        "streamed, tile 64, measured" in text
        and "streamed, tile 64, predicted by the streaming planner" in text
    )
    assert text.count("conventional, predicted by tilegrad.estimate_memory") == 2


def test_gigapixel_slide_hides_lesions_in_few_patches(tmp_path):
    from tilegrad.train.demo import write_gigapixel_slide

    rng = np.random.default_rng(0)
    lesions = write_gigapixel_slide(tmp_path / "s.tif", rng, 1024, True, patch=256, positive_patches=2)
    image = open_image(tmp_path / "s.tif")
    assert image.shape == (3, 1024, 1024) and len(image.levels) >= 2  # pyramidal, read lazily
    patches = {(y // 256, x // 256) for y, x, _ in lesions}
    assert (
        lesions and len(patches) <= 2
    )  # lesions only in the chosen patches (a lesion stays inside its patch)
    assert not write_gigapixel_slide(tmp_path / "n.tif", rng, 512, False, patch=256)


def test_gigapixel_demo_runs_end_to_end_at_a_small_size(tmp_path, capsys):
    """The code path of `tilegrad demo --gigapixel` at 512^2 (the real run is 16384^2 and takes about an hour)."""
    from tilegrad.train.demo import GigapixelSettings, run_gigapixel_demo

    settings = GigapixelSettings(
        size=512, patch=256, positive_patches=1, n_train=2, n_val=2, epochs=1, width=4, hidden=4, tile=256
    )
    summary = run_gigapixel_demo(tmp_path / "out", settings, progress=False)
    printed = capsys.readouterr().out
    assert "the streaming plan of one slide" in printed and "s/MP" in printed
    assert summary["seconds_per_megapixel"] > 0 and summary["plan_peak_bytes"] > 0
    (share,) = summary["attention_on_lesion_patches"].values()  # the one positive validation slide
    assert 0 < share["attention"] < 1 and share["area"] == 0.25
    figures = tmp_path / "out" / "figures"
    weights = np.load(next(figures.glob("attention_*.npy")))
    assert weights.shape == (32, 32) and abs(weights.sum() - 1) < 1e-5
    assert next(figures.glob("attention_*.png")).read_bytes()[:4] == b"\x89PNG"
    from tilegrad.train import load_checkpoint

    csv = load_checkpoint(tmp_path / "out" / "run_gigapixel" / "checkpoint.pt")["config"]["csv"]
    assert (
        "tilegrad-gigapixel-" in csv and not Path(csv).parent.exists()
    )  # slides in a temporary directory, gone


def test_sigterm_inside_the_gigapixel_demo_removes_its_temporary_slides(tmp_path):
    """The demo's slides (gigabytes at 16384^2) live in a temporary directory: SIGTERM must unwind, not kill."""
    import os
    import signal
    import tempfile

    import pytest

    from tilegrad.train.demo import _sigterm_unwinds

    before = signal.getsignal(signal.SIGTERM)
    made = []
    with (
        pytest.raises(SystemExit) as stop,
        _sigterm_unwinds(),
        tempfile.TemporaryDirectory(dir=tmp_path) as scratch,
    ):
        made.append(Path(scratch))
        (made[0] / "slide.tif").write_bytes(b"0" * 1024)
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.value.code == 128 + signal.SIGTERM
    assert not made[0].exists()
    assert signal.getsignal(signal.SIGTERM) is before  # restored
