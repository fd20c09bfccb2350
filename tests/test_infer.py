"""tilegrad.infer: exact tiled inference against whole-image inference, 2D and 3D, into tensors and array sinks."""

from __future__ import annotations

import monai
import numpy as np
import pytest
import torch
import zarr
from torch import nn

import tilegrad
from tilegrad import ShapeError

from .test_stream import TinyUNet, rel_err


class StridedEncoderDecoder(nn.Module):
    def __init__(self, dims=2):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        convt = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.body = nn.Sequential(
            conv(1, 6, 3, stride=2, padding=1), nn.ReLU(), conv(6, 8, 3, stride=2, padding=1), nn.ReLU(),
            convt(8, 6, 4, stride=2, padding=1), nn.ReLU(), convt(6, 2, 4, stride=2, padding=1),
        )  # fmt: skip

    def forward(self, x):
        return self.body(x)


def pixel_shuffle_upsampler():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.PixelShuffle(2)
    )


CASES = [
    # (id, model factory, source shape (C, *spatial), tile)
    ("unet-2d-ours-odd", lambda: TinyUNet(2), (1, 92, 68), 44),
    ("unet-3d-ours", lambda: TinyUNet(3), (1, 40, 36, 44), 32),
    ("monai-unet-2d-batchnorm-eval", lambda: monai.networks.nets.UNet(
        2, 1, 2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch"), (1, 96, 80), 56),
    ("monai-unet-3d-no-norm", lambda: monai.networks.nets.UNet(
        3, 1, 2, channels=(4, 8, 8), strides=(2, 2), norm=None), (1, 40, 32, 36), 32),
    ("strided-encoder-decoder-2d", lambda: StridedEncoderDecoder(2), (1, 70, 90), 32),
    ("strided-encoder-decoder-3d", lambda: StridedEncoderDecoder(3), (1, 28, 36, 20), 20),
    ("pixel-shuffle-x2", pixel_shuffle_upsampler, (1, 53, 47), 20),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "factory", "shape", "tile"), CASES, ids=[c[0] for c in CASES])
def test_infer_equals_whole_image(name, factory, shape, tile, dtype):
    torch.manual_seed(0)
    model = factory().eval().to(dtype)
    source = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        expected = model(source[None])[0]
        got = tilegrad.infer(model, source, tile_size=tile, progress=False)
    assert got.shape == expected.shape
    assert rel_err(got, expected) <= (1e-10 if dtype == torch.float64 else 1e-5)


def test_image_smaller_than_tile():
    model = TinyUNet(2).eval()
    source = torch.randn(2, 1, 24, 20)  # batch of 2, smaller than one tile
    with torch.no_grad():
        assert rel_err(tilegrad.infer(model, source, tile_size=256, progress=False), model(source)) <= 1e-6


@pytest.mark.parametrize("sink", ["memmap", "zarr"])
def test_output_written_into_an_array_sink(tmp_path, sink):
    torch.manual_seed(0)
    model = TinyUNet(2).eval()
    data = np.random.default_rng(0).standard_normal((1, 100, 76)).astype(np.float32)
    src_path = tmp_path / "in.dat"
    src = np.memmap(src_path, dtype=np.float32, mode="w+", shape=data.shape)
    src[:] = data
    src.flush()
    lazy = np.memmap(src_path, dtype=np.float32, mode="r", shape=data.shape)
    if sink == "memmap":
        out = np.memmap(tmp_path / "out.dat", dtype=np.float32, mode="w+", shape=(2, 100, 76))
    else:
        out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=(2, 100, 76), chunks=(2, 32, 32),
                              dtype="float32")  # fmt: skip
    returned = tilegrad.infer(model, lazy, tile_size=48, out=out, progress=False)
    assert returned is out
    with torch.no_grad():
        expected = model(torch.from_numpy(data)[None])[0].numpy()
    assert np.abs(np.asarray(out[:]) - expected).max() <= 1e-5


def test_errors_name_shapes():
    model = TinyUNet(2).eval()
    with pytest.raises(ShapeError, match="tile_size= or memory_budget="):
        tilegrad.infer(model, torch.randn(1, 32, 32))
    with pytest.raises(ShapeError, match=r"received shape \(32, 32\)"):
        tilegrad.infer(model, torch.randn(32, 32), tile_size=16)
    with pytest.raises(ShapeError, match="create the sink with that shape"):
        tilegrad.infer(model, torch.randn(1, 64, 64), tile_size=40, out=np.zeros((1, 64, 64), np.float32))
    with pytest.raises(tilegrad.NotStreamableError, match="BatchNorm2d"):
        tilegrad.infer(nn.Sequential(nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1)).train(), torch.randn(1, 40, 40),
                       tile_size=16)  # fmt: skip
