"""ESPCN3d and PixelShuffle3d: shapes, equivalence of reversible and naive variants, streaming geometry, errors."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn

import tilegrad
from tilegrad import ReversibleSequential, ShapeError
from tilegrad.models import ESPCN3d, PixelShuffle3d


@pytest.mark.parametrize("r", [2, 3])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # ESPCN baseline
        {"rev_blocks": 2},  # ESPCN-RN2
        {"rev_blocks": 2, "naive": True},  # same architecture, plain backprop
    ],
)
def test_output_shapes(r, kwargs):
    net = ESPCN3d(upscale=r, features=(8, 12), **kwargs)
    x = torch.randn(2, 1, 11, 11, 11)
    assert net(x).shape == (2, 1, 7 * r, 7 * r, 7 * r)  # valid convs: 11 -> 9 -> 9 -> 7 low-res cells
    same = ESPCN3d(in_channels=2, upscale=r, features=(8, 12), padding="same", out_channels=3, **kwargs)
    assert same(torch.randn(1, 2, 5, 6, 4)).shape == (1, 3, 5 * r, 6 * r, 4 * r)


def test_rn_variants_have_the_reversible_stacks():
    rn4 = ESPCN3d(rev_blocks=4)
    stacks = [m for m in rn4.modules() if isinstance(m, ReversibleSequential)]
    assert [len(s) for s in stacks] == [4, 4]
    assert all(s.memory_saving for s in stacks)
    naive = ESPCN3d(rev_blocks=4, naive=True)
    assert [s.memory_saving for s in naive.modules() if isinstance(s, ReversibleSequential)] == [False, False]
    naive.load_state_dict(rn4.state_dict())  # same architecture, same keys: weights move between the variants
    assert not any(isinstance(m, ReversibleSequential) for m in ESPCN3d().modules())


def test_reversible_and_naive_give_the_same_gradients():
    torch.manual_seed(0)
    rev = ESPCN3d(features=(6, 8), rev_blocks=3).double()
    naive = ESPCN3d(features=(6, 8), rev_blocks=3, naive=True).double()
    with torch.no_grad():
        for b in rev.parameters():
            b.add_(
                0.1 * torch.randn_like(b)
            )  # the branch convs start at zero: make every gradient non-trivial
    naive.load_state_dict(rev.state_dict())
    x = torch.randn(2, 1, 9, 9, 9, dtype=torch.float64)
    target = torch.randn(2, 1, 10, 10, 10, dtype=torch.float64)
    for net in (rev, naive):
        nn.functional.mse_loss(net(x), target).backward()
    for (name, a), b in zip(rev.named_parameters(), naive.parameters()):
        err = ((a.grad - b.grad).norm() / b.grad.norm()).item()
        assert err <= 1e-10, (name, err)


def test_pixel_shuffle3d_matches_torch_in_2d_and_is_a_permutation_in_3d():
    x = torch.randn(2, 18, 4, 5)
    assert torch.equal(PixelShuffle3d(3)(x), nn.PixelShuffle(3)(x))
    x = torch.arange(2 * 8 * 2 * 3 * 2, dtype=torch.float64).reshape(2, 8, 2, 3, 2)
    y = PixelShuffle3d(2)(x)
    assert y.shape == (2, 1, 4, 6, 4)
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)
    # channel i*4 + j*2 + k lands at sub-position (i, j, k) of each cell
    assert y[0, 0, 1, 0, 1] == x[0, 1 * 4 + 0 * 2 + 1, 0, 0, 0]
    assert y[1, 0, 3, 5, 2] == x[1, 1 * 4 + 1 * 2 + 0, 1, 2, 1]


def test_geometry_of_espcn_for_streaming():
    rf = tilegrad.receptive_field(ESPCN3d(upscale=2, padding="same").eval(), ndim=3)
    assert rf.stride == (Fraction(1, 2),) * 3
    # two 3x3x3 convs reach 2 low-res px; output sub-pixel j of cell i sits at i + j/2, so the left halo rounds up
    assert rf.halo == ((3, 2),) * 3
    rn = tilegrad.receptive_field(ESPCN3d(upscale=2, rev_blocks=1, padding="same").eval(), ndim=3)
    assert rn.halo == ((3 + 2 * 2, 2 + 2 * 2),) * 3  # each reversible block adds 2 px (f: 1, g after f: 1)


def test_errors_name_the_numbers():
    with pytest.raises(ShapeError, match=r"51 channels .* even feature count"):
        ESPCN3d(features=(51, 100), rev_blocks=2)
    with pytest.raises(ShapeError, match=r"divisible by 2\*\*3 = 8, received 12 channels"):
        PixelShuffle3d(2)(torch.zeros(1, 12, 2, 2, 2))
    with pytest.raises(ShapeError, match=r"expects \(N, C, D, H, W\), received shape \(1, 11, 11\)"):
        ESPCN3d()(torch.zeros(1, 11, 11))
