"""The demo's data: lesions exist at full resolution and vanish at the 8x pyramid level."""

from __future__ import annotations

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
