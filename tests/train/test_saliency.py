"""Saliency: the input gradient through the streamed model equals the whole-image gradient; files written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilegrad.train import TrainConfig, build_model, train
from tilegrad.train.dataset import SlideInput
from tilegrad.train.saliency import block_mean, input_gradient, saliency, saliency_map


def test_streamed_input_gradient_equals_unstreamed_float64():
    torch.manual_seed(0)
    model = build_model("small_cnn", 2, model_kwargs={"width": 4}, tile_size=32).double()
    x = torch.rand(1, 3, 70, 90, dtype=torch.float64) * 255
    grad, probs, target = input_gradient(model, x, target=1)
    assert all(p.grad is None for p in model.parameters())  # parameters untouched
    # the plain computation: the same weights, no streaming, autograd on the whole image
    leaf = x.clone().requires_grad_(True)
    model.head(model.trunk(leaf))[0, 1].backward()
    assert grad.shape == (1, 3, 70, 90)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-10, atol=1e-14)
    assert target == 1 and probs.shape == (2,) and abs(probs.sum() - 1) < 1e-12


def test_saliency_writes_png_and_low_resolution_array(slides, tmp_path):
    train(
        TrainConfig(
            csv=str(slides),
            out=str(tmp_path / "run"),
            model="small_cnn",
            model_kwargs={"width": 4},
            tile_size=32,
            epochs=1,
            progress=False,
            device="cpu",
        )
    )
    image = slides.parent / "img" / "s1.png"  # 48 x 40
    result = saliency(tmp_path / "run" / "checkpoint.pt", image, tmp_path / "sal.png", max_side=16)
    assert result.factor == 3
    assert result.map.shape == (16, 14)  # ceil(48 / 3), ceil(40 / 3)
    assert np.array_equal(np.load(tmp_path / "sal.npy"), result.map)
    assert (tmp_path / "sal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.map.max() > 0


def test_block_mean_handles_ragged_edges():
    values = np.arange(15.0).reshape(3, 5)
    out = block_mean(values, 2)
    assert out.shape == (2, 3)
    assert out[1, 2] == pytest.approx(14.0)  # a 1x1 corner block
    assert out[0, 0] == pytest.approx(np.mean([0, 1, 5, 6]))


@pytest.mark.parametrize("factor", [1, 4, 7])  # 7: blocks straddle tile rows, ragged edge blocks
def test_lazy_saliency_map_equals_the_reduced_whole_image_gradient(factor):
    torch.manual_seed(0)
    model = build_model("small_cnn", 2, model_kwargs={"width": 4}, tile_size=64).double()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 150, 131), dtype=np.uint8)
    slide = SlideInput(pixels, dtype=torch.float64)
    low, _, target = saliency_map(model, slide, factor, target=1)
    assert target == 1 and all(p.grad is None for p in model.parameters())
    # the plain computation: the whole image as one tensor, its gradient reduced afterwards
    x = torch.from_numpy(slide[:]).requires_grad_(True)
    model.head(model.trunk(x))[0, 1].backward()
    expected = block_mean(x.grad[0].abs().amax(dim=0).numpy(), factor)
    assert low.shape == expected.shape == (-(-150 // factor), -(-131 // factor))
    np.testing.assert_allclose(low, expected, rtol=1e-10, atol=1e-15)
    assert len(model.streamed.last_plan.segments[0].grid) > 4, "really streamed"


def test_lazy_saliency_holds_one_band_not_the_slide():
    from tilegrad.train.saliency import SaliencyAccumulator

    model = build_model("small_cnn", 2, model_kwargs={"width": 4}, tile_size=64)
    slide = SlideInput(np.zeros((3, 640, 320), dtype=np.uint8) + 128)
    seen = []
    original = SaliencyAccumulator.finish

    def spy(self):
        seen.append(self.max_band_rows)
        return original(self)

    SaliencyAccumulator.finish = spy
    try:
        saliency_map(model, slide, 8)
    finally:
        SaliencyAccumulator.finish = original
    # one tile row (64 px) plus its halo and block alignment, far from the slide's 640 rows
    assert seen and seen[0] <= 64 + 8, seen
