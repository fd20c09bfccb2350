"""Measured against predicted peak of ``tilegrad.infer`` under a memory budget, cold and warm, per segment.

MONAI UNet 16-32-64 (2 residual units, eval BatchNorm), a random volume in memory, ``infer(mode=...)`` returning
the output tensor. Each configuration runs in its own process: the first call there is *cold* (PyTorch maps the
code of the kernels it runs for the first time: NOTE [ What a budget covers ] in infer.py), the second *warm*.
A peak is ``tilegrad.PeakMemoryMeter`` above the start of the call plus the input and the parameters (the budget
covers them; the process held them before the call):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/infer_memory.py --size 128 --budgets 40MiB 64MiB
    OMP_WAIT_POLICY=PASSIVE python benchmarks/infer_memory.py --size 128 --budgets 64MiB --phases

``--phases`` prints, for the warm call, each segment's predicted step (plan.evaluate's forward steps) next to the
measured peak of that segment (the process's high-water mark reset when the segment starts), and the file-backed
pages the cold call added (the code of the kernels, libtorch_cpu.so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def run(size: int, budget: str, mode: str, phases: bool, threads: int) -> dict:
    import monai
    import torch

    import tilegrad
    from tilegrad import execute
    from tilegrad.plan import plan_streaming

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = monai.networks.nets.UNet(
        spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2), num_res_units=2,
        norm="batch",
    ).eval()  # fmt: skip
    volume = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    # held before the call and counted by the budget: the input in memory and the parameters
    input_bytes = volume.numel() * volume.element_size() + sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    try:
        plan = plan_streaming(
            model, volume.shape, memory_budget=budget, mode=mode, training=False, output_in_memory=True
        )
    except tilegrad.MemoryBudgetError as err:
        return {"size": size, "budget": budget, "error": str(err)}
    segments: list[dict] = []
    orig_sources = execute.Execution._sources

    def sources(self, sp, window, k, grad, ahead=None):  # type: ignore[no-untyped-def]
        # NOTE [ Nested meters ] folds what a phase meter resets into the outer meter
        if phases and (not segments or segments[-1]["k"] != k):
            if segments:
                segments[-1]["meter"].__exit__(None, None, None)
            segments.append({"k": k, "meter": tilegrad.PeakMemoryMeter("cpu").__enter__()})
        return orig_sources(self, sp, window, k, grad, ahead)

    execute.Execution._sources = sources  # type: ignore[method-assign]
    calls = []
    for _call in ("cold", "warm"):
        segments.clear()
        file0 = _status_kib("RssFile")
        with torch.no_grad(), tilegrad.PeakMemoryMeter("cpu") as meter:
            start = meter._start
            wall = time.perf_counter()
            out = tilegrad.infer(model, volume, memory_budget=budget, mode=mode, progress=False)
            wall = time.perf_counter() - wall
            if segments:
                segments[-1]["meter"].__exit__(None, None, None)
        del out
        calls.append(
            {
                "peak": meter.peak_bytes + input_bytes,
                "seconds": wall,
                "file_pages": (_status_kib("RssFile") - file0) * 1024,
                "segments": [
                    s["meter"].peak_bytes + s["meter"]._start - start + input_bytes for s in segments
                ],
            }
        )
    steps = plan_steps(plan)
    return {
        "size": size,
        "budget": budget,
        "plan": str(plan),
        "predicted": plan.peak_bytes,
        "predicted_steps": steps,
        "cold": calls[0],
        "warm": calls[1],
    }


def plan_steps(plan) -> list[int]:  # type: ignore[no-untyped-def]
    """The planner's forward steps of this plan (one per segment), as plan.evaluate computes them."""
    from tilegrad.plan import _Planner

    g = plan.graph
    planner = _Planner(
        g, training=False, input_in_memory=True, input_grad=False, output_in_memory=True, head_flops=0.0,
        head=None, tiers="auto", batch_tiles=1,
    )  # fmt: skip
    return planner.evaluate(plan.segments, plan.boundaries)[2][: len(plan.segments)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--budgets", nargs="+", default=["40MiB", "64MiB"])
    parser.add_argument("--mode", default="auto", choices=["auto", "lean", "stages"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--phases", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.size, args.child, args.mode, args.phases, args.threads)))
        return
    mib = 2**20
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()}")
    for budget in args.budgets:
        cmd = [sys.executable, __file__, "--child", budget, "--size", str(args.size), "--mode", args.mode]
        cmd += ["--threads", str(args.threads)] + (["--phases"] if args.phases else [])
        r = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        if "error" in r:
            print(f"{args.size}^3 under {budget}: refused before running: {r['error']}")
            continue
        cold, warm = r["cold"], r["warm"]
        print(
            f"{args.size}^3 under {budget} ({args.mode}): predicted {r['predicted'] / mib:.1f} MiB, measured cold "
            f"{cold['peak'] / mib:.1f} MiB ({cold['seconds']:.1f} s; +{cold['file_pages'] / mib:.1f} MiB of "
            f"file pages), warm {warm['peak'] / mib:.1f} MiB ({warm['seconds']:.1f} s), warm/predicted "
            f"{warm['peak'] / r['predicted']:.2f}"
        )
        if args.phases:
            print(r["plan"])
            for k, (p, c, w) in enumerate(zip(r["predicted_steps"], cold["segments"], warm["segments"])):
                print(
                    f"  segment {k}: predicted {p / mib:7.1f} MiB, measured cold {c / mib:7.1f}, warm {w / mib:7.1f}"
                )


if __name__ == "__main__":
    main()
