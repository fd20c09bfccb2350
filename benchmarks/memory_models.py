"""Model factories (no arguments) for the memory accuracy benchmark, tests and the worked example.

Pass them to ``tilegrad memory`` as ``benchmarks/memory_models.py:unet3d`` and so on.
"""

from __future__ import annotations

import torch
from torch import nn


def vgg16() -> nn.Module:
    import torchvision

    return torchvision.models.vgg16(weights=None)


def vgg16_mri() -> nn.Module:
    """VGG-16 taking the seed post's 5 MRI sequences (T1, T2, FLAIR, DWI, ADC) as input channels."""
    model = vgg16()
    model.features[0] = nn.Conv2d(5, 64, kernel_size=3, padding=1)
    return model


def resnet34() -> nn.Module:
    import torchvision

    return torchvision.models.resnet34(weights=None)


def densenet121() -> nn.Module:
    import torchvision

    return torchvision.models.densenet121(weights=None)


def unet2d() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    )


def unet3d() -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        num_res_units=2,
    )


class PixelShuffle3d(nn.Module):
    """(N, C r^3, D, H, W) -> (N, C, D r, H r, W r): the 3D sub-pixel convolution's rearrangement."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, d, h, w = x.shape
        r = self.factor
        x = x.view(n, c // r**3, r, r, r, d, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(n, c // r**3, d * r, h * r, w * r)


class LocalESPCN3d(nn.Sequential):
    """ESPCN-style 3D network for image quality transfer (Tanno et al. 2017; Blumberg et al. 2018): valid 3x3x3
    conv to 50 channels, 1x1x1 conv to 100, 3x3x3 conv to channels x r^3, then a 3D pixel shuffle.

    A local stand-in until ``tilegrad.models.ESPCN3d`` lands: same layer structure, written here.
    """

    def __init__(self, channels: int = 6, upscale: int = 2) -> None:
        super().__init__(
            nn.Conv3d(channels, 50, 3),
            nn.ReLU(),
            nn.Conv3d(50, 100, 1),
            nn.ReLU(),
            nn.Conv3d(100, channels * upscale**3, 3),
            PixelShuffle3d(upscale),
        )


def espcn3d() -> nn.Module:
    return LocalESPCN3d()


def _streamed(model: nn.Module, tile: int) -> nn.Module:
    import tilegrad

    trunk, head = tilegrad.split_model(model)
    trunk.eval()  # frozen BatchNorm statistics: a tile cannot see the whole image's
    return nn.Sequential(tilegrad.StreamingModule(trunk, tile_size=tile), head)


def resnet34_streamed_1024() -> nn.Module:
    """ResNet-34 with its trunk streamed in 1024 px tiles (BatchNorm frozen), head conventional."""
    return _streamed(resnet34(), 1024)


def small_cnn() -> nn.Module:
    """A small local trunk (halo 13 px, stride 4) and a global head: fast to stream on a CPU."""
    trunk = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
    )  # fmt: skip
    return nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))


def small_cnn_streamed_256() -> nn.Module:
    """small_cnn with its trunk streamed in 256 px tiles, one segment ("lean")."""
    import tilegrad

    model = small_cnn()
    return nn.Sequential(tilegrad.StreamingModule(model[0], tile_size=256, mode="lean"), *model[1:])


def resnet34_frozen_bn() -> nn.Module:
    """ResNet-34 with BatchNorm in eval mode: the conventional peer of the streamed factories."""
    model = resnet34()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return model


def tilegrad_espcn3d() -> nn.Module:
    """tilegrad.models.ESPCN3d (issue 5), 6 DTI channels, upscale 2, baseline."""
    from tilegrad.models import ESPCN3d

    return ESPCN3d(in_channels=6, upscale=2)


def tilegrad_espcn3d_rev4() -> nn.Module:
    """tilegrad.models.ESPCN3d with 4 reversible blocks per hidden layer (recomputes activations in backward)."""
    from tilegrad.models import ESPCN3d

    return ESPCN3d(in_channels=6, upscale=2, rev_blocks=4)
