"""The disk tier inside a real step: MONAI 3D UNet (benchmarks/unet3d_streaming.py's model and plan), warm training
steps in one process, alternating DiskStore's file layouts (NOTE [ Storage tiers ] in tilegrad/boundary.py: "rows",
a 3D map as (D, H, N*C, W), against "positions", (*spatial, N*C)) on the same plan.

Per layout: the step's CPU and wall seconds (medians), and each store operation's bytes and CPU time (the calling
thread's, so reads and writes handed to the IO thread, NOTE [ IO overlap ] in execute.py, are counted where they
run): the rates the planner's DISK_READ, DISK_WRITE and DISK_ADD stand for (plan.py), measured in the engine rather
than on a synthetic grid (benchmarks/boundary_io.py). The two layouts must give the same loss and parameter
gradients bit for bit; the script checks it.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/unet3d_disk_io.py --size 160 --repeat 4
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import tilegrad
from tilegrad import boundary

sys.path.insert(0, str(Path(__file__).parent))
from unet3d_streaming import build

LAYOUTS = ("positions", "rows")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--norm", default="batch", choices=["batch", "instance"])
    parser.add_argument(
        "--budget",
        default="138.4MiB",
        help="memory budget (a quarter of the measured conventional peak at 160^3)",
    )
    parser.add_argument("--repeat", type=int, default=4, help="warm steps per layout, alternating")
    args = parser.parse_args()
    model = build(args.norm)
    size = args.size
    x = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 2, (1, size, size, size), generator=torch.Generator().manual_seed(2))
    body = tilegrad.StreamingModule(model, tile_size="auto", memory_budget=args.budget, progress=False)
    print(body.plan(x.shape), flush=True)

    layout: list[str | None] = [None]
    made = boundary.DiskStore.__init__

    def init(self, *a, **k):  # every store of the step in the layout under test (the same files otherwise)
        made(self, *a, **k)
        if layout[0] == "rows" and self.layout != "rows":
            raise SystemExit(f"a {self.shape} store cannot take the rows layout: nothing to compare")
        self.layout = layout[0]

    boundary.DiskStore.__init__ = init
    ops: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name in ("read", "write", "add"):
        original = getattr(boundary.DiskStore, name)

        def timed(self, box, *a, _original=original, _name=name, **k):
            start = time.thread_time()
            result = _original(self, box, *a, **k)
            entry = ops[(layout[0], _name)]
            entry[0] += time.thread_time() - start
            entry[1] += self.nbytes // math.prod(self.shape[2:]) * math.prod(s.stop - s.start for s in box)
            return result

        setattr(boundary.DiskStore, name, timed)

    def step() -> tuple[float, float, float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        c0, t0 = time.process_time(), time.perf_counter()
        out = body(x)
        loss = torch.nn.functional.cross_entropy(out, target)
        del out
        loss.backward()
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        return cpu, wall, loss.item(), [p.grad.clone() for p in model.parameters()]

    layout[0] = "rows"
    step()  # warm-up
    ops.clear()
    times: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    results = {}
    for _ in range(args.repeat):
        for name in LAYOUTS:
            layout[0] = name
            cpu, wall, loss, grads = step()
            times[name].append((cpu, wall))
            results[name] = (loss, grads)
    (la, ga), (lb, gb) = results.values()
    if la != lb or not all(torch.equal(a, b) for a, b in zip(ga, gb)):
        raise SystemExit("the two layouts gave different results")
    print(f"load {os.getloadavg()[0]:.1f}; loss and every parameter gradient bit-exact")
    print(
        "| layout | step CPU s (median) | wall s (median) | runs (CPU/wall) | op | MiB/step | CPU s/step | GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in LAYOUTS:
        cpu = statistics.median(c for c, _ in times[name])
        wall = statistics.median(w for _, w in times[name])
        runs = " ".join(f"{c:.2f}/{w:.2f}" for c, w in times[name])
        for op in ("read", "write", "add"):
            seconds, nbytes = ops[(name, op)]
            print(
                f"| {name} | {cpu:.2f} | {wall:.2f} | {runs} | {op} | {nbytes / 2**20 / args.repeat:.1f} | "
                f"{seconds / args.repeat:.3f} | {nbytes / max(seconds, 1e-9) / 1e9:.2f} |"
            )
        io = sum(ops[(name, op)][0] for op in ("read", "write", "add")) / args.repeat
        print(f"| {name} | | | | all | | {io:.3f} | |")


if __name__ == "__main__":
    main()
