"""Exact tiled inference vs MONAI sliding_window_inference on a 3D U-Net: error vs whole volume, peak memory, time.

Every configuration runs in its own process (clean peak). The reference is whole-volume inference in float64.
MONAI runs with roi --tile and overlap 0.25; tilegrad gets --budget (about MONAI's measured peak) and picks its
own tile (a tilegrad tile includes the halo, about 25 px per side for this U-Net, so equal tile sizes are not equal work).

    python benchmarks/infer_vs_monai.py                # 3D MONAI UNet on a 192^3 volume, 128^3 tiles/rois
    python benchmarks/infer_vs_monai.py --size 160 --tile 112 --budget 256MiB
    python benchmarks/infer_vs_monai.py --size 128 --tile 96 --configs whole monai-gaussian tilegrad tilegrad-auto

"tilegrad" is infer(mode="lean") (one segment, the whole halo per tile), "tilegrad-auto" infer(mode="auto")
(segments over the graph, boundaries in memory or on disk, the fastest plan under the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("whole", "monai-constant", "monai-gaussian", "tilegrad", "tilegrad-auto", "tilegrad-budget")


def build(size: int):
    import monai
    import torch

    torch.manual_seed(0)
    model = monai.networks.nets.UNet(
        spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2),
        num_res_units=2, norm="batch",
    ).eval()  # fmt: skip
    for m in model.modules():  # non-trivial frozen statistics
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    volume = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    return model, volume


def run(config: str, size: int, tile: int, budget: str, workdir: Path) -> dict:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference

    import tilegrad
    import tilegrad.io as tio  # imported before the meter: the budget covers the work, not Python modules

    model, volume = build(size)
    with torch.no_grad(), tilegrad.PeakMemoryMeter("cpu") as meter:
        t0 = time.perf_counter()
        if config == "whole":
            out = model(volume)
        elif config.startswith("monai"):
            out = sliding_window_inference(
                volume, (tile,) * 3, 1, model, overlap=0.25, mode=config.split("-")[1]
            )
        elif (
            config == "tilegrad"
        ):  # same memory as MONAI: the largest tile whose predicted peak fits the budget
            out = tilegrad.infer(model, volume, memory_budget=budget, progress=False)
        elif config == "tilegrad-auto":  # segmented over the graph (issue 11): the fastest plan under the budget
            out = tilegrad.infer(model, volume, memory_budget=budget, progress=False, mode="auto")
        else:  # whole volume never in memory: .npy in and out with positional reads/writes, under a budget
            src = tio.open_image(workdir / "in.npy")
            with tio.create_writer(workdir / "out.npy", (2, size, size, size), np.float32) as sink:
                tilegrad.infer(model, src, memory_budget=budget, out=sink, progress=False)
            out = None
        elapsed = time.perf_counter() - t0
    if out is None:
        out = torch.from_numpy(np.load(workdir / "out.npy"))[None]
    reference = torch.load(workdir / "reference.pt", weights_only=True)
    diff = (out.double() - reference).abs()
    labels_changed = (out.argmax(1) != reference.argmax(1)).double().mean().item()
    return {
        "config": config,
        "seconds": elapsed,
        "peak_bytes": meter.peak_bytes,
        "max_abs_err": diff.max().item(),
        "labels_changed": labels_changed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--budget", default="512MiB", help="memory budget of the tilegrad runs")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run(args.run, args.size, args.tile, args.budget, args.workdir)))
        return
    import numpy as np
    import torch

    from tilegrad.units import format_bytes

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model, volume = build(args.size)
        with torch.no_grad():
            reference = model.double()(volume.double())
        torch.save(reference, workdir / "reference.pt")
        np.save(workdir / "in.npy", volume[0].numpy())
        del model, reference
        rows = []
        for config in args.configs:
            proc = subprocess.run(
                [sys.executable, __file__, "--run", config, "--size", str(args.size), "--tile", str(args.tile),
                 "--budget", args.budget, "--workdir", str(workdir)],
                capture_output=True, text=True, env={**os.environ},
            )  # fmt: skip
            if proc.returncode != 0:
                print(f"{config}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{config:<16} {row['seconds']:7.1f} s  peak {format_bytes(row['peak_bytes']):>11}  "
                f"max |err| {row['max_abs_err']:.2e}  labels changed {100 * row['labels_changed']:.3f}%",
                flush=True,
            )
    print(f"\nMONAI UNet 3D (16-32-64, 2 res units, eval BatchNorm), volume {args.size}^3, tile/roi {args.tile}^3,"
          f" float32; tilegrad-budget reads and writes .npy files tile by tile under --budget {args.budget}\n")  # fmt: skip
    print("| method | time (s) | peak memory | max abs error vs whole volume | argmax labels changed |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['seconds']:.1f} | {format_bytes(row['peak_bytes'])} | "
            f"{row['max_abs_err']:.1e} | {100 * row['labels_changed']:.3f}% |"
        )


if __name__ == "__main__":
    main()
