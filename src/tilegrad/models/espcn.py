"""3D ESPCN for image quality transfer (Tanno et al., MICCAI 2017) and its reversible deepening (Blumberg et al.,
MICCAI 2018): ESPCN-RN-k inserts a stack of k reversible blocks after each hidden layer, so the network grows deeper
while the activation memory of training stays about that of the baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ShapeError
from ..geometry import (
    Context,
    Geometry,
    compose,
    merge,
    module_geometry,
    pixel_shuffle,
    register_geometry_rule,
)
from ..reversible import AdditiveCoupling, ReversibleSequential

__all__ = ["ESPCN3d", "PixelShuffle3d"]


class PixelShuffle3d(nn.Module):
    """Rearrange ``(N, C * r**d, *S)`` into ``(N, C, *(s * r for s in S))`` for d = 1, 2 or 3 spatial dims.

    Channel ``c * r**d + i * r**(d-1) + ... + k`` becomes sub-position ``(i, ..., k)`` of output cell ``c``; in 2D
    this is exactly ``nn.PixelShuffle``. Its receptive-field geometry is registered, so it can be streamed.

    >>> import torch
    >>> PixelShuffle3d(2)(torch.zeros(1, 16, 3, 4, 5)).shape
    torch.Size([1, 2, 6, 8, 10])
    """

    def __init__(self, upscale_factor: int) -> None:
        super().__init__()
        if not isinstance(upscale_factor, int) or upscale_factor < 1:
            raise ShapeError(f"upscale_factor must be a positive integer, received {upscale_factor!r}")
        self.upscale_factor = upscale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.upscale_factor
        d = x.dim() - 2
        if d not in (1, 2, 3):
            raise ShapeError(
                f"PixelShuffle3d expects (N, C, *spatial) with 1-3 spatial dims, received {tuple(x.shape)}"
            )
        n, c, *spatial = x.shape
        if c % r**d:
            raise ShapeError(
                f"PixelShuffle3d({r}) on {d} spatial dims needs channels divisible by {r}**{d} = {r**d}, "
                f"received {c} channels (shape {tuple(x.shape)})"
            )
        out_c = c // r**d
        x = x.reshape(n, out_c, *([r] * d), *spatial)
        # (N, C, r_1..r_d, S_1..S_d) -> (N, C, S_1, r_1, ..., S_d, r_d)
        order = [0, 1]
        for i in range(d):
            order += [2 + d + i, 2 + i]
        x = x.permute(order)
        return x.reshape(n, out_c, *(s * r for s in spatial))

    def extra_repr(self) -> str:
        return f"upscale_factor={self.upscale_factor}"


def _rev_branch(channels: int) -> nn.Module:
    # pre-activation BN-ReLU-conv (as in RevNet); the conv starts at zero so every block starts as the identity
    conv = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
    nn.init.zeros_(conv.weight)
    return nn.Sequential(nn.BatchNorm3d(channels), nn.ReLU(), conv)


def _rev_stack(channels: int, blocks: int, naive: bool) -> nn.Module:
    if channels % 2:
        raise ShapeError(
            f"a reversible stack splits its {channels} channels into two halves; use an even feature count "
            f"(e.g. {channels + 1}) when rev_blocks > 0"
        )
    half = channels // 2
    coupled = [AdditiveCoupling(_rev_branch(half), _rev_branch(half)) for _ in range(blocks)]
    return ReversibleSequential(
        *coupled, memory_saving=not naive
    )  # naive: plain backprop, same state_dict keys


class ESPCN3d(nn.Module):
    """3D efficient sub-pixel CNN for super-resolution / image quality transfer.

    Layers (as in Tanno et al. 2017): conv 3x3x3 -> ``features[0]``, ReLU, conv 1x1x1 -> ``features[1]``, ReLU
    (``features`` may list more hidden layers, all 1x1x1 after the first), conv 3x3x3 -> ``out_channels * r**3``,
    then :class:`PixelShuffle3d` to ``upscale`` times the resolution. ``padding="valid"`` (default, as in the
    paper: an 11^3 input patch predicts the central 7^3 low-res cells, i.e. a 14^3 output for r = 2) or ``"same"``
    (output is exactly ``upscale`` times the input size, for whole volumes).

    ``rev_blocks=k`` inserts a stack of k reversible blocks (:class:`tilegrad.AdditiveCoupling` with
    BN-ReLU-conv3x3x3 branches, same padding, the conv zero-initialised so each
    block starts as the identity) after every hidden layer: ESPCN-RN-k. They run as a
    :class:`tilegrad.ReversibleSequential` (memory about flat in k) unless ``naive=True``, which trains the same
    architecture with plain backprop ("ESPCN-RN-k naive" in Blumberg et al. 2018; ``memory_saving=False``, same
    parameters and ``state_dict`` keys, so weights move freely between the two).

    >>> import torch
    >>> net = ESPCN3d(upscale=2)
    >>> net(torch.zeros(1, 1, 11, 11, 11)).shape
    torch.Size([1, 1, 14, 14, 14])
    >>> ESPCN3d(upscale=3, rev_blocks=2, padding="same")(torch.zeros(2, 1, 5, 6, 7)).shape
    torch.Size([2, 1, 15, 18, 21])
    """

    def __init__(
        self,
        in_channels: int = 1,
        upscale: int = 2,
        features: Sequence[int] = (50, 100),
        rev_blocks: int = 0,
        naive: bool = False,
        *,
        out_channels: int | None = None,
        padding: str = "valid",
    ) -> None:
        super().__init__()
        if padding not in ("valid", "same"):
            raise ShapeError(f"padding must be 'valid' or 'same', received {padding!r}")
        if not features:
            raise ShapeError("features must list at least one hidden layer width, received an empty sequence")
        if rev_blocks < 0:
            raise ShapeError(f"rev_blocks must be >= 0, received {rev_blocks}")
        out_channels = in_channels if out_channels is None else out_channels
        self.upscale, self.rev_blocks, self.naive = upscale, rev_blocks, naive
        pad3 = 1 if padding == "same" else 0
        layers: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(features):
            kernel = 3 if i == 0 else 1
            layers += [
                nn.Conv3d(channels, width, kernel, padding=pad3 if kernel == 3 else 0),
                nn.ReLU(inplace=True),
            ]
            if rev_blocks:
                layers.append(_rev_stack(width, rev_blocks, naive))
            channels = width
        layers += [nn.Conv3d(channels, out_channels * upscale**3, 3, padding=pad3), PixelShuffle3d(upscale)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ShapeError(f"ESPCN3d expects (N, C, D, H, W), received shape {tuple(x.shape)}")
        return self.layers(x)


def _espcn_rule(ctx: Context, module: ESPCN3d, node: Any, inputs: list[Geometry]) -> Geometry:
    """ESPCN3d.forward checks x.dim(), which fx cannot trace: the geometry is that of its layers."""
    return compose(merge(ctx, inputs), module_geometry(module.layers, ctx.ndim, ctx.where))


register_geometry_rule(PixelShuffle3d, pixel_shuffle)
register_geometry_rule(ESPCN3d, _espcn_rule)
