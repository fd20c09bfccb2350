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
import statistics
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
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "method": method,
        "size": size,
        "seconds": elapsed,
        "cpu_seconds": cpu,  # the process's CPU time (all threads): less sensitive to the machine's load
        "peak_bytes": meter.peak_bytes,
        "predicted_peak": plan.peak_bytes if plan else None,
        "plan": str(plan) if plan else None,
    }


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration, interleaved (medians)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="append raw results to this JSON-lines file")
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.size)))
        return
    import torchvision

    import tilegrad
    from tilegrad.units import format_bytes

    results: dict[tuple[int, str], list[dict]] = {}
    for size in args.sizes:
        for rep in range(args.repeat):  # interleaved: a slow spell of the shared machine hits every method
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
                results.setdefault((size, method), []).append(row)
                if args.json:
                    with args.json.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                print(
                    f"{size:>5} {method:<13} run {rep + 1}: {row['seconds']:8.1f} s (CPU {row['cpu_seconds']:.1f} s)  "
                    f"peak {format_bytes(row['peak_bytes']):>11}"
                    + (f"  predicted {format_bytes(row['predicted_peak'])}" if row["predicted_peak"] else ""),
                    flush=True,
                )
                if row["plan"] and rep == 0:
                    print("      " + row["plan"].replace("\n", "\n      "), flush=True)
    trunk, _ = tilegrad.split_model(torchvision.models.resnet34(num_classes=2).eval(), at="avgpool")
    print(
        "\n| image | method | runs | time (s), median [min-max] | time / conventional | CPU time / conventional "
        "| peak (median) | peak / conventional | planner's predicted peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        base = results.get((size, "conventional"))
        base_t = _median([r["seconds"] for r in base]) if base else None
        base_c = _median([r["cpu_seconds"] for r in base]) if base else None
        if base:
            base_m = _median([r["peak_bytes"] for r in base])
            base_note = ""
        else:  # too large to run here: the conventional peak predicted by estimate_memory
            report = tilegrad.estimate_memory(trunk, (1, 3, size, size), mode="train")
            base_m = report.peak_bytes
            base_note = " (vs predicted)"
            print(
                f"| {size}x{size} | conventional | - (predicted) | - | - | {format_bytes(base_m)} | 1.00 | - |"
            )
        for method in args.methods:
            rows = results.get((size, method))
            if not rows:
                continue
            t = [r["seconds"] for r in rows]
            m = _median([r["peak_bytes"] for r in rows])
            t_ratio = f"{_median(t) / base_t:.2f}" if base_t else "-"
            c_ratio = f"{_median([r['cpu_seconds'] for r in rows]) / base_c:.2f}" if base_c else "-"
            pred = format_bytes(rows[0]["predicted_peak"]) if rows[0]["predicted_peak"] else "-"
            print(
                f"| {size}x{size} | {method} | {len(rows)} | {_median(t):.1f} [{min(t):.1f}-{max(t):.1f}] | "
                f"{t_ratio} | {c_ratio} | {format_bytes(m)} | {m / base_m:.2f}{base_note} | {pred} |"
            )


if __name__ == "__main__":
    main()
