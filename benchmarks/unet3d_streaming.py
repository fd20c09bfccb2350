"""MONAI 3D UNet, one float32 training step: conventional vs StreamingModule under a quarter of the conventional peak.

MONAI ``UNet(3, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2), norm=...)`` in train mode (batch norm
statistics computed over the whole volume, streamed by tilegrad.statistics), cross-entropy against random labels,
backward. The streamed step uses ``memory_budget`` = ``--fraction`` of the conventional step's peak: by default the
peak *measured* in the first conventional run (``--budget-from predicted``: the planner's conventional prediction,
which over-predicts it); ``StreamingModule(tile_size="auto")`` picks segments, tiles and tiers. Each run in its own
process (clean peak, ``PeakMemoryMeter``); conventional and streamed runs interleaved, medians over ``--repeat``.

The runs get ``OMP_WAIT_POLICY=PASSIVE`` unless ``--omp-wait-policy`` says otherwise: on a shared, loaded machine
OpenMP's spinning worker threads (the default, ACTIVE) steal the core the main thread needs, and every small
parallel operation then waits ~10 ms for a descheduled thread; a streamed step runs thousands of such operations
(tile boxes, statistics), the conventional step a few hundred. Both methods get the same setting.

    python benchmarks/unet3d_streaming.py --sizes 160 192
    python benchmarks/unet3d_streaming.py --sizes 160 --norm instance
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def build(norm: str):
    import monai
    import torch

    torch.manual_seed(0)
    return monai.networks.nets.UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=(16, 32, 64, 128),
        strides=(2, 2, 2),
        norm=norm,
    ).train()


def conventional_peak(model, size: int) -> int:
    import tilegrad

    # with a budget far above it, the planner returns its conventional (unstreamed) plan and that plan's peak
    plan = tilegrad.plan_streaming(model, (1, 1, size, size, size), memory_budget="1TiB", mode="auto")
    return plan.peak_bytes


def run_one(method: str, size: int, norm: str, budget: int, phases: bool = False) -> dict:
    import torch

    import tilegrad

    model = build(norm)
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 2, (1, size, size, size), generator=torch.Generator().manual_seed(2))
    torch.nn.functional.cross_entropy(
        model(torch.randn(1, 1, 32, 32, 32)), torch.zeros(1, 32, 32, 32).long()
    ).backward()
    model.zero_grad(set_to_none=True)
    plan = None
    body = model
    if method == "streamed":
        body = tilegrad.StreamingModule(model, tile_size="auto", memory_budget=budget, progress=False)
        plan = body.plan(x.shape)
    inner: list = []  # --phases: a meter opened when the model's output gradient arrives (the loss's backward done)

    def split(grad):
        # a nested meter folds the peak so far into the outer one (NOTE [ Nested meters ])
        inner.append(tilegrad.PeakMemoryMeter("cpu").__enter__())

    with tilegrad.PeakMemoryMeter("cpu") as meter:
        t0, c0 = time.perf_counter(), time.process_time()
        out = body(x)
        if phases:
            out.register_hook(split)
        loss = torch.nn.functional.cross_entropy(out, target)
        del out  # as a caller that keeps only the loss
        loss.backward()
        if inner:
            inner[0].__exit__(None, None, None)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "method": method,
        "size": size,
        "norm": norm,
        "seconds": elapsed,
        "cpu_seconds": cpu,  # both threads: steadier than the seconds on a loaded machine
        "peak_bytes": meter.peak_bytes,
        # --phases: the peak of the model's own backward (from the output gradient on), above the same start as
        # peak_bytes; the rest of the step (forward, loss, the loss's backward) sets peak_bytes when this is lower
        "backward_peak": inner[0].peak_bytes + inner[0]._start - meter._start if inner else None,
        "loss": loss.item(),
        "predicted_peak": plan.peak_bytes if plan else None,
        "predicted_ratio": plan.time_ratio if plan else None,
        "plan": str(plan) if plan else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--norm", default="batch", choices=["batch", "instance"])
    parser.add_argument(
        "--fraction", type=float, default=0.25, help="streamed budget / conventional predicted peak"
    )
    parser.add_argument("--budget-from", default="measured", choices=["measured", "predicted"])
    parser.add_argument(
        "--omp-wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of the runs ('' to inherit)"
    )
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--phases",
        action="store_true",
        help="also measure the peak of the model's backward alone (from the output gradient on: after the loss's "
        "backward), to tell the caller's loss from the model; adds a gc pass and a heap trim at that point",
    )
    parser.add_argument("--json", help="append raw results to this JSON-lines file")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.size, args.norm, args.budget, args.phases)))
        return
    from tilegrad.units import format_bytes

    env = dict(os.environ)
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    print(f"load: {os.getloadavg()}, OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', '(unset)')}", flush=True)
    table = []
    for size in args.sizes:
        conv_pred = conventional_peak(build(args.norm), size)
        budget = int(conv_pred * args.fraction)
        rows: dict[str, list[dict]] = {}
        for rep in range(args.repeat):
            for method in ("conventional", "streamed"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--run", method, "--size", str(size), "--norm", args.norm,
                     "--budget", str(budget), *(["--phases"] if args.phases else [])],
                    capture_output=True, text=True, env=env,
                )  # fmt: skip
                if proc.returncode != 0:
                    print(f"{method} @ {size}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["load"] = os.getloadavg()[0]
                if method == "conventional" and rep == 0:
                    if args.budget_from == "measured":
                        budget = int(row["peak_bytes"] * args.fraction)
                    print(
                        f"{size}^3 {args.norm}: conventional peak measured {format_bytes(row['peak_bytes'])}, "
                        f"predicted {format_bytes(conv_pred)}; streamed budget {format_bytes(budget)} "
                        f"({args.fraction:g} of the {args.budget_from} peak)",
                        flush=True,
                    )
                row["budget"] = budget
                rows.setdefault(method, []).append(row)
                if args.json:
                    with open(args.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                print(
                    f"  {method:<12} run {rep + 1}: {row['seconds']:7.1f} s ({row['cpu_seconds']:.1f} s CPU), "
                    f"peak {format_bytes(row['peak_bytes'])}"
                    + (f" (model's backward {format_bytes(row['backward_peak'])})" if args.phases else "")
                    + ", "
                    f"loss {row['loss']:.6f}, load {row['load']:.1f}",
                    flush=True,
                )
                if row["plan"] and rep == 0:
                    print("    " + row["plan"].replace("\n", "\n    "), flush=True)
        if "conventional" in rows and "streamed" in rows:
            conv = rows["conventional"]
            st = rows["streamed"]
            tc = statistics.median(r["seconds"] for r in conv)
            ts = statistics.median(r["seconds"] for r in st)

            def cpu(rows: list[dict]) -> float:
                return statistics.median(r["cpu_seconds"] for r in rows)

            table.append(
                f"| {size}^3 | {args.norm} | {len(st)} | {tc:.1f} | {statistics.median(r['peak_bytes'] for r in conv) / 2**20:.0f} MiB "
                f"({format_bytes(conv_pred)} pred.) | {format_bytes(budget)} | {ts:.1f} | "
                f"{statistics.median(r['peak_bytes'] for r in st) / 2**20:.0f} MiB ({format_bytes(st[0]['predicted_peak'])} pred.) "
                f"| x{ts / tc:.2f} | x{cpu(st) / cpu(conv):.2f} | x{st[0]['predicted_ratio']:.2f} |"
            )
    print(
        "\n| volume | norm | runs | conventional (s) | conventional peak | budget | streamed (s) | streamed peak "
        "| time ratio measured | CPU time ratio | predicted |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
