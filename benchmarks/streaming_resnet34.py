"""ResNet-34 trunk (to layer4), one float32 training step: conventional vs streamed vs torch.utils.checkpoint.

Each configuration runs in its own process (clean peak memory); the parent prints a table and, with --markdown,
the rows for BENCHMARKS.md. Time ratios are against the conventional step measured in the same run.

    python benchmarks/streaming_resnet34.py --sizes 2048 4096
    python benchmarks/streaming_resnet34.py --sizes 8192 --methods stream1024   # flatness of the fixed tile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("conventional", "checkpoint", "stream1024", "auto2GiB")


def run_one(method: str, size: int) -> dict:
    import torch
    import torchvision
    from torch.utils.checkpoint import checkpoint_sequential

    import tilegrad

    torch.manual_seed(0)
    model = torchvision.models.resnet34(num_classes=2).eval()  # eval: frozen BatchNorm, as streaming requires
    trunk, head = tilegrad.split_model(model, at="avgpool")
    if method == "conventional":
        body = trunk
    elif method == "checkpoint":
        for m in trunk.modules():  # checkpoint_sequential's boundaries must not be modified in place
            if isinstance(m, torch.nn.ReLU):
                m.inplace = False
        stages = list(trunk.children())

        def body(x):
            return checkpoint_sequential(torch.nn.Sequential(*stages), 5, x, use_reentrant=False)
    elif method == "stream1024":
        body = tilegrad.StreamingModule(trunk, tile_size=1024)
    elif method == "auto2GiB":
        body = tilegrad.StreamingModule(trunk, tile_size="auto", memory_budget="2GiB")
    else:
        raise SystemExit(f"unknown method {method}")
    label = torch.tensor([1])

    def step():
        x = torch.randn(1, 3, size, size)
        loss = torch.nn.functional.cross_entropy(head(body(x)), label)
        loss.backward()
        return loss

    plan = None
    if isinstance(body, tilegrad.StreamingModule):
        plan = body.plan((1, 3, size, size))
    # warm-up on a small image: thread pools and oneDNN primitives are created on first use
    x_small = torch.randn(1, 3, 256, 256)
    torch.nn.functional.cross_entropy(head(trunk(x_small)), label).backward()
    trunk.zero_grad(set_to_none=True)
    with tilegrad.PeakMemoryMeter("cpu") as meter:
        t0 = time.perf_counter()
        step()
        elapsed = time.perf_counter() - t0
    return {
        "method": method,
        "size": size,
        "seconds": elapsed,
        "peak_bytes": meter.peak_bytes,
        "predicted_peak": plan.peak_bytes if plan else None,
        "plan": str(plan) if plan else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="append raw results to this JSON-lines file")
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.size)))
        return
    from tilegrad.units import format_bytes

    results = []
    for size in args.sizes:
        for method in args.methods:
            proc = subprocess.run(
                [sys.executable, __file__, "--run", method, "--size", str(size)],
                capture_output=True,
                text=True,
                env={**os.environ},
            )
            if proc.returncode != 0:
                print(f"{method} @ {size}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(row)
            if args.json:
                with args.json.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            print(
                f"{size:>5} {method:<13} {row['seconds']:8.1f} s  peak {format_bytes(row['peak_bytes']):>11}"
                + (f"  predicted {format_bytes(row['predicted_peak'])}" if row["predicted_peak"] else ""),
                flush=True,
            )
            if row["plan"]:
                print("      " + row["plan"].replace("\n", "\n      "), flush=True)
    print("\n| image | method | time (s) | time / conventional | peak | peak / conventional | predicted peak |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        base = next((r for r in results if r["size"] == row["size"] and r["method"] == "conventional"), None)
        t_ratio = f"{row['seconds'] / base['seconds']:.2f}" if base else "-"
        m_ratio = f"{row['peak_bytes'] / base['peak_bytes']:.2f}" if base else "-"
        pred = format_bytes(row["predicted_peak"]) if row["predicted_peak"] else "-"
        print(
            f"| {row['size']}x{row['size']} | {row['method']} | {row['seconds']:.1f} | {t_ratio} | "
            f"{format_bytes(row['peak_bytes'])} | {m_ratio} | {pred} |"
        )


if __name__ == "__main__":
    main()
