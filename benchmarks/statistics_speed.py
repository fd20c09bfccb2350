"""A network with statistics layers, one float32 training step: conventional vs streamed under a memory budget.

torchvision's EfficientNet-B0 features as the trunk (16 squeeze-excitation blocks), a global average pool and a
linear layer as the head (the pool streamed: ``StreamingModule(trunk, head=GlobalPool("avg"))``), cross-entropy,
forward + backward. Two BatchNorm settings:

* ``eval``: BatchNorm frozen (running statistics): the SE blocks' global pools are the only statistics;
* ``train``: BatchNorm in training mode (batch statistics, streamed too: 49 more statistics; stochastic depth and
  dropout stay in eval mode, so both runs compute the same function).

Each configuration runs in its own process (peak memory with ``tilegrad.PeakMemoryMeter`` above the level after
building the model); the streamed ones get ``tile_size="auto"`` and a budget of a half and a quarter of the
conventional step's measured peak (measured first, in the same run). Runs are interleaved (a slow spell of the
shared machine hits every method); the table shows medians and the ratios to the conventional step.

    python benchmarks/statistics_speed.py                          # 2048^2, both BatchNorm settings, 2 runs each
    python benchmarks/statistics_speed.py --size 1024 --repeat 1
    python benchmarks/statistics_speed.py --profile --bn eval      # where the streamed step's time goes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FRACTIONS = {"stream 1/2": 0.5, "stream 1/4": 0.25}


def build(bn: str):
    import torch
    import torchvision

    torch.manual_seed(0)
    trunk = torchvision.models.efficientnet_b0().features.eval()
    if bn == "train":
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.train()
    return trunk, torch.nn.Linear(1280, 2)


def run_one(method: str, bn: str, size: int, budget: int | None, profile: bool) -> dict:
    import torch

    import tilegrad

    trunk, linear = build(bn)
    label = torch.tensor([1])
    plan = None
    plan_seconds = 0.0
    if method == "conventional":

        def pooled(x):
            return trunk(x).mean((2, 3))
    else:
        streamed = tilegrad.StreamingModule(
            trunk, tile_size="auto", memory_budget=budget, head=tilegrad.heads.GlobalPool("avg")
        )
        t0 = time.perf_counter()
        plan = streamed.plan((1, 3, size, size))
        plan_seconds = time.perf_counter() - t0
        pooled = streamed
    # warm-up on a small image: thread pools and oneDNN primitives are created on first use
    small = torch.randn(1, 3, 256, 256)
    torch.nn.functional.cross_entropy(linear(trunk(small).mean((2, 3))), label).backward()
    trunk.zero_grad(set_to_none=True)
    linear.zero_grad(set_to_none=True)
    x = torch.randn(1, 3, size, size)
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    with tilegrad.PeakMemoryMeter("cpu") as meter:
        t0, c0 = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.cross_entropy(linear(pooled(x)), label)
        t1 = time.perf_counter()
        loss.backward()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(30)
        reads = [(nc, ct) for (f, _, name), (_, nc, _, ct, _) in stats.stats.items()  # type: ignore[attr-defined]
                 if f.endswith("boundary.py") and name == "read"]  # fmt: skip
        print(f"boundary store reads: {sum(n for n, _ in reads)} calls, {sum(t for _, t in reads):.3f} s cumulative",
              file=out)  # fmt: skip
        print(out.getvalue(), file=sys.stderr)
    return {
        "method": method,
        "bn": bn,
        "size": size,
        "seconds": elapsed,
        "cpu_seconds": cpu,  # both threads: steadier than the seconds on a loaded machine
        "loss": loss.item(),  # the same image in every process: the streamed loss must equal the conventional one
        "forward_seconds": t1 - t0,
        "plan_seconds": plan_seconds,
        "peak_bytes": meter.peak_bytes,
        "budget": budget,
        "predicted_peak": plan.peak_bytes if plan else None,
        "predicted_ratio": plan.time_ratio if plan else None,
        "plan": str(plan) if plan else None,
    }


def _spawn(method: str, bn: str, size: int, budget: int | None, profile: bool) -> dict | None:
    cmd = [sys.executable, __file__, "--run", method, "--bn", bn, "--size", str(size)]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    if profile:
        cmd.append("--profile")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if profile:
        print(proc.stderr[-12000:], file=sys.stderr)
    if proc.returncode != 0:
        print(f"{method} ({bn} BN) @ {size}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--bn", nargs="+", default=["eval", "train"], choices=["eval", "train"])
    parser.add_argument("--repeat", type=int, default=2, help="runs per configuration, interleaved (medians)")
    parser.add_argument(
        "--profile", action="store_true", help="print cProfile's top functions of each streamed run"
    )
    parser.add_argument("--json", type=Path, help="append raw results to this JSON-lines file")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        (bn,) = args.bn
        print(json.dumps(run_one(args.run, bn, args.size, args.budget, args.profile)))
        return
    from tilegrad.units import format_bytes

    results: dict[tuple[str, str], list[dict]] = {}
    base_peak: dict[str, int] = {}
    for rep in range(args.repeat):
        for bn in args.bn:
            for method in ("conventional", *FRACTIONS):
                budget = None
                if method != "conventional":
                    if bn not in base_peak:
                        continue
                    budget = int(base_peak[bn] * FRACTIONS[method])
                row = _spawn(method, bn, args.size, budget, args.profile and method != "conventional")
                if row is None:
                    continue
                if method == "conventional":
                    base_peak.setdefault(bn, row["peak_bytes"])  # the budgets follow the first measurement
                results.setdefault((bn, method), []).append(row)
                if args.json:
                    with args.json.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                print(
                    f"{bn:>5} BN {method:<13} run {rep + 1}: {row['seconds']:7.1f} s ({row['cpu_seconds']:.1f} s CPU, forward "
                    f"{row['forward_seconds']:.1f} s, plan {row['plan_seconds']:.1f} s)  peak "
                    f"{format_bytes(row['peak_bytes']):>11}  loss {row['loss']:.6f}"
                    + (f"  budget {format_bytes(budget)}, predicted {format_bytes(row['predicted_peak'])}, "
                       f"x{row['predicted_ratio']:.2f}" if budget else ""),
                    flush=True,
                )  # fmt: skip
                if row["plan"] and rep == 0:
                    print("      " + row["plan"].replace("\n", "\n      "), flush=True)
    print(
        f"\nEfficientNet-B0 features, float32, one training step at {args.size}x{args.size} (forward + backward)\n"
        "\n| BatchNorm | method | runs | time (s), median [min-max] | time / conventional | planner's predicted "
        "ratio | CPU time / conventional | peak (median) | peak / conventional | budget |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for bn in args.bn:
        base = results.get((bn, "conventional"))
        if not base:
            continue
        base_t = statistics.median(r["seconds"] for r in base)
        base_m = statistics.median(r["peak_bytes"] for r in base)
        base_c = statistics.median(r.get("cpu_seconds", math.nan) for r in base)
        for method in ("conventional", *FRACTIONS):
            rows = results.get((bn, method))
            if not rows:
                continue
            t = [r["seconds"] for r in rows]
            m = statistics.median(r["peak_bytes"] for r in rows)
            cpu = statistics.median(r.get("cpu_seconds", math.nan) for r in rows)
            predicted = f"x{rows[0]['predicted_ratio']:.2f}" if rows[0]["predicted_ratio"] else "-"
            budget = format_bytes(rows[0]["budget"]) if rows[0]["budget"] else "-"
            print(
                f"| {bn} | {method} | {len(rows)} | {statistics.median(t):.1f} [{min(t):.1f}-{max(t):.1f}] | "
                f"x{statistics.median(t) / base_t:.2f} | {predicted} | x{cpu / base_c:.2f} | {format_bytes(m)} | "
                f"{m / base_m:.2f} | "
                f"{budget} |"
            )


if __name__ == "__main__":
    main()
