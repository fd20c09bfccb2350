"""Restore a real MRI volume from a 2x downsampled copy with ESPCN3d and ESPCN-RN4 (tilegrad.models).

Data: nibabel's test volume ``anatomical.nii`` (33 x 41 x 25 voxels, 2 mm; it ships inside the nibabel package,
nothing is downloaded). The volume is scaled to [0, ~1] by its 99.5th percentile, cropped to even sizes and
downsampled 2x by 2x2x2 averaging. Honest split, two-fold cross-validation: the volume is cut into two halves along
its first axis; a model trained on random low-res patches of one half restores the other half from that half's own
low-res input (it never sees the held-out half's voxels, high- or low-res, in training), and vice versa, so every
voxel of the brain is predicted by a model that did not train on it. The baselines, trilinear and tricubic
(cubic B-spline, ``scipy.ndimage.zoom(order=3)``) interpolation, also see only each half's low-res input. Both
models learn the residual over trilinear interpolation (output = trilinear(x) + net(x), last conv
zero-initialised) with the same number of optimizer steps per fold (or, with --seconds, the same wall-clock
budget); RMSE is reported over the whole brain mask (intensity > 10% of the scale), split into interior (mask
eroded by one voxel) and edge voxels as in Blumberg et al., and per held-out half.

    python benchmarks/espcn_mri_demo.py             # 400 steps per model and fold, ~8 minutes on one CPU core
    python benchmarks/espcn_mri_demo.py --steps 5   # a quick check that it runs

Needs ``tilegrad[train]`` (nibabel, scipy, matplotlib). Writes benchmarks/results/espcn_mri_demo.png: one whole
axial slice (low-res input, ground truth, trilinear, tricubic, each model), the dashed line marks the two halves.
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


def tricubic(lo: np.ndarray, r: int = 2) -> np.ndarray:
    """Cubic B-spline interpolation on the same voxel grid as ``trilinear`` (low-res voxels are r^3 blocks)."""
    from scipy import ndimage

    return ndimage.zoom(lo, r, order=3, grid_mode=True, mode="reflect")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=400, help="optimizer steps per model and fold (the same for all)"
    )
    parser.add_argument(
        "--seconds", type=float, help="train each model for this many wall-clock seconds per fold instead"
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
    half = lo.shape[2] // 2  # low-res index along axis 0 where the two folds meet
    folds = [(0, half), (half, lo.shape[2])]
    if min(stop - start for start, stop in folds) < args.patch or min(lo.shape[3:]) < args.patch:
        parser.error(
            f"--patch {args.patch} does not fit in a half of the low-res volume {tuple(lo.shape[2:])}"
        )
    truth = vol
    mask = truth > 0.1
    interior = ndimage.binary_erosion(mask) & mask
    print(f"volume {tuple(vol.shape)} (axes {codes}), low-res {tuple(lo.shape[2:])}; two folds along axis 0, "
          f"low-res [0, {half}) and [{half}, {lo.shape[2]}); brain mask {int(mask.sum())} voxels "
          f"({int(interior.sum())} interior, {int((mask & ~interior).sum())} edge)")  # fmt: skip

    def lo_part(start: int, stop: int) -> torch.Tensor:
        return lo[:, :, start:stop]

    def hi_part(start: int, stop: int) -> torch.Tensor:
        return hi[:, :, 2 * start : 2 * stop]

    # preds[name]: the whole volume, each half predicted from its own low-res input
    preds = {
        "trilinear": np.concatenate([trilinear(lo_part(*f))[0, 0].numpy() for f in folds]),
        "tricubic": np.concatenate([tricubic(lo_part(*f)[0, 0].numpy()) for f in folds]),
    }
    for name, rev_blocks in (("ESPCN", 0), ("ESPCN-RN4", 4)):
        parts, steps, took, losses = [], 0, 0.0, []
        for k, test in enumerate(folds):
            train_fold = folds[1 - k]
            torch.manual_seed(0)
            model = Residual(ESPCN3d(upscale=2, rev_blocks=rev_blocks, padding="same"))
            n, loss, t = train(
                model,
                lo_part(*train_fold),
                hi_part(*train_fold),
                args.seconds,
                args.steps,
                args.patch,
                args.batch,
                seed=k,
            )
            model.eval()
            with torch.no_grad():
                parts.append(model(lo_part(*test))[0, 0].numpy())
            steps, took, losses = steps + n, took + t, [*losses, loss]
        preds[name] = np.concatenate(parts)
        print(
            f"{name}: {steps} steps of batch {args.batch} over 2 folds in {took:.0f} s, final train MSE "
            + " / ".join(f"{v:.5f}" for v in losses)
        )

    halves = [slice(2 * start, 2 * stop) for start, stop in folds]
    print(
        "\n| method | RMSE interior | RMSE edge | RMSE total (brain mask) | half 1 / half 2 | vs trilinear |"
    )
    print("|---|---|---|---|---|---|")
    base = rmse_report(preds["trilinear"], truth, mask, interior)["total"]
    for name, pred in preds.items():
        r = rmse_report(pred, truth, mask, interior)
        per_half = " / ".join(
            f"{rmse_report(pred[h], truth[h], mask[h], interior[h])['total']:.4f}" for h in halves
        )
        print(
            f"| {name} | {r['interior']:.4f} | {r['edge']:.4f} | {r['total']:.4f} | {per_half} "
            f"| {r['total'] / base:.2f}x |"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axial = codes.index("S") if "S" in codes else codes.index("I") if "I" in codes else 2
    k = truth.shape[axial] // 2
    lowres = np.repeat(np.repeat(np.repeat(lo[0, 0].numpy(), 2, 0), 2, 1), 2, 2)
    panels = {"low-res input (2x)": lowres, "ground truth": truth, **preds}
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.6))
    for ax, (title, v) in zip(axes, panels.items()):
        ax.imshow(np.take(v, k, axis=axial).T, cmap="gray", origin="lower", vmin=0, vmax=1)
        if axial != 0:  # axis 0 is the image's horizontal axis: mark where the folds meet
            ax.axvline(2 * half - 0.5, color="tab:orange", linestyle="--", linewidth=0.8, alpha=0.6)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(
        f"anatomical.nii (nibabel test data), axial slice {k}: each half restored by a model trained on the "
        "other half",
        fontsize=10,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
