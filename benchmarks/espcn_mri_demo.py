"""Restore a real MRI volume from a 2x downsampled copy with ESPCN3d and ESPCN-RN4 (tilegrad.models).

Data: nibabel's test volume ``anatomical.nii`` (33 x 41 x 25 voxels, 2 mm; it ships inside the nibabel package,
nothing is downloaded). The volume is scaled to [0, ~1] by its 99.5th percentile, cropped to even sizes and
downsampled 2x by 2x2x2 averaging. Honest split: the models train on random low-res patches from the first 60% of
the first axis and are evaluated only on the remaining 40%, whose voxels they never see in training (the test slab
is predicted from its own low-res input). Both models learn the residual over trilinear interpolation (output =
trilinear(x) + net(x), last conv zero-initialised) with the same number of optimizer steps (or, with --seconds, the
same wall-clock budget); RMSE is reported inside a brain mask (intensity > 10% of the scale), split into interior
(mask eroded by one voxel) and edge voxels as in Blumberg et al.

    python benchmarks/espcn_mri_demo.py                       # 400 steps each, ~4 minutes on one CPU core

writes benchmarks/results/espcn_mri_demo.png (an axial slice: low-res input, ground truth, trilinear, each model).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tilegrad.models import ESPCN3d


def load_volume() -> tuple[np.ndarray, str]:
    import nibabel as nib
    from nibabel.testing import data_path

    path = os.path.join(data_path, "anatomical.nii")
    image = nib.load(path)
    vol = np.asarray(image.get_fdata(), dtype=np.float32)
    vol = np.clip(vol, 0, None) / np.percentile(vol, 99.5)
    vol = vol[: vol.shape[0] // 2 * 2, : vol.shape[1] // 2 * 2, : vol.shape[2] // 2 * 2]
    codes = nib.aff2axcodes(image.affine)
    return vol, "".join(codes)


class Residual(nn.Module):
    """trilinear(x) + net(x): the network learns what interpolation misses."""

    def __init__(self, net: nn.Module, r: int = 2):
        super().__init__()
        self.net, self.r = net, r
        last = [m for m in net.modules() if isinstance(m, nn.Conv3d)][-1]
        nn.init.zeros_(last.weight)  # start exactly at trilinear interpolation
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return trilinear(x, self.r) + self.net(x)


def trilinear(x: torch.Tensor, r: int = 2) -> torch.Tensor:
    return F.interpolate(x, scale_factor=r, mode="trilinear", align_corners=False)


def train(
    model: nn.Module,
    lo: torch.Tensor,
    hi: torch.Tensor,
    seconds: float | None,
    max_steps: int,
    patch: int,
    batch: int,
    seed: int,
):
    """Train for ``max_steps`` optimizer steps, or for ``seconds`` of wall-clock time when given."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sizes = lo.shape[2:]
    steps, t0, losses = 0, time.perf_counter(), []
    model.train()
    while (time.perf_counter() - t0 < seconds) if seconds is not None else steps < max_steps:
        xs, ys = [], []
        for _ in range(batch):
            o = [int(rng.integers(0, s - patch + 1)) for s in sizes]
            xs.append(lo[0, :, o[0] : o[0] + patch, o[1] : o[1] + patch, o[2] : o[2] + patch])
            ys.append(
                hi[
                    0,
                    :,
                    2 * o[0] : 2 * (o[0] + patch),
                    2 * o[1] : 2 * (o[1] + patch),
                    2 * o[2] : 2 * (o[2] + patch),
                ]
            )
        x, y = torch.stack(xs), torch.stack(ys)
        flips = [d for d in (2, 3, 4) if rng.random() < 0.5]  # flips keep the voxel grid
        if flips:
            x, y = x.flip(flips), y.flip(flips)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        steps += 1
    return steps, float(np.mean(losses[-20:])), time.perf_counter() - t0


def rmse_report(
    pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, interior: np.ndarray
) -> dict[str, float]:
    edge = mask & ~interior
    err = (pred - truth) ** 2
    return {
        k: float(np.sqrt(err[m].mean())) for k, m in (("interior", interior), ("edge", edge), ("total", mask))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per model (the same for all)")
    parser.add_argument(
        "--seconds", type=float, help="train each model for this many wall-clock seconds instead of --steps"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, 2-thread 3D convolutions measured 20-50x slower)",
    )
    parser.add_argument("--patch", type=int, default=8, help="low-res training patch edge")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "espcn_mri_demo.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from scipy import ndimage

    vol, codes = load_volume()
    hi = torch.from_numpy(vol)[None, None]
    lo = F.avg_pool3d(hi, 2)
    split = round(lo.shape[2] * 0.6)  # low-res index along axis 0
    lo_train, hi_train = lo[:, :, :split], hi[:, :, : 2 * split]
    lo_test, hi_test = lo[:, :, split:], hi[:, :, 2 * split :]
    truth = hi_test[0, 0].numpy()
    mask = truth > 0.1
    interior = ndimage.binary_erosion(mask) & mask
    print(f"volume {tuple(vol.shape)} (axes {codes}), low-res {tuple(lo.shape[2:])}; train slab low-res axis-0 "
          f"[0, {split}), test slab [{split}, {lo.shape[2]}): {int(mask.sum())} brain voxels "
          f"({int(interior.sum())} interior, {int((mask & ~interior).sum())} edge)")  # fmt: skip

    preds = {"trilinear": trilinear(lo_test)[0, 0].numpy()}
    for name, rev_blocks in (("ESPCN", 0), ("ESPCN-RN4", 4)):
        torch.manual_seed(0)
        model = Residual(ESPCN3d(upscale=2, rev_blocks=rev_blocks, padding="same"))
        steps, loss, took = train(
            model, lo_train, hi_train, args.seconds, args.steps, args.patch, args.batch, seed=0
        )
        model.eval()
        with torch.no_grad():
            preds[name] = model(lo_test)[0, 0].numpy()
        print(f"{name}: {steps} steps of batch {args.batch} in {took:.0f} s, final train MSE {loss:.5f}")

    print("\n| method | RMSE interior | RMSE edge | RMSE total (brain mask) | vs trilinear |")
    print("|---|---|---|---|---|")
    base = rmse_report(preds["trilinear"], truth, mask, interior)["total"]
    for name, pred in preds.items():
        r = rmse_report(pred, truth, mask, interior)
        print(
            f"| {name} | {r['interior']:.4f} | {r['edge']:.4f} | {r['total']:.4f} | {r['total'] / base:.2f}x |"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axial = codes.index("S") if "S" in codes else codes.index("I") if "I" in codes else 2
    k = truth.shape[axial] // 2
    lowres = np.repeat(np.repeat(np.repeat(lo_test[0, 0].numpy(), 2, 0), 2, 1), 2, 2)
    panels = {"low-res input (2x)": lowres, "ground truth": truth, **preds}
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4))
    for ax, (title, v) in zip(axes, panels.items()):
        ax.imshow(np.take(v, k, axis=axial).T, cmap="gray", origin="lower", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"anatomical.nii (nibabel test data), held-out slab, axial slice {k}", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
