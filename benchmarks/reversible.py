"""Peak training memory and time per step of ESPCN3d, ESPCN-RN4 and ESPCN-RN4 naive, plus memory vs depth.

Every configuration runs in its own subprocess (fresh allocator), one warm-up step, then ``--steps`` timed steps; the
peak is tilegrad.measure_peak_memory of one training step (forward, MSE loss, backward, SGD step) above the level
before it (model, optimizer state and input are already allocated). Reproduce:

    python benchmarks/reversible.py            # writes the markdown table to stdout
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

CONFIGS = {
    # name: (rev_blocks, naive)
    "ESPCN": (0, False),
    "ESPCN-RN4": (4, False),
    "ESPCN-RN4 naive": (4, True),
    "ESPCN-RN8": (8, False),
    "ESPCN-RN8 naive": (8, True),
    "ESPCN-RN16": (16, False),
}
TIMED = ("ESPCN", "ESPCN-RN4", "ESPCN-RN4 naive")


def child(name: str, size: int, batch: int, steps: int) -> None:
    import torch

    import tilegrad
    from tilegrad.models import ESPCN3d

    torch.manual_seed(0)
    rev_blocks, naive = CONFIGS[name]
    net = ESPCN3d(upscale=2, rev_blocks=rev_blocks, naive=naive)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 1, size, size, size)
    target = torch.randn_like(net(x).detach())

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(net(x), target).backward()
        opt.step()

    step()  # warm-up: gradients and optimizer state exist from now on
    peak = tilegrad.measure_peak_memory(step)
    times = []
    for _ in range(steps if name in TIMED else 0):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in net.parameters())
    print(json.dumps({"peak": peak, "times": times, "params": params}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=21, help="input patch edge (low-res voxels), default 21")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per configuration (median reported)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.size, args.batch, args.steps)
        return
    import tilegrad

    env = dict(os.environ, PYTHONPATH=str(Path(tilegrad.__file__).parents[1]))
    results = {}
    for name in CONFIGS:
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, "--size", str(args.size), "--batch", str(args.batch),
             "--steps", str(args.steps)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"# {name}: {results[name]['peak'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    base = results["ESPCN"]
    print(
        f"input {args.batch} x 1 x {args.size}^3, upscale 2, features (50, 100), CPU, torch {_torch_version()}\n"
    )
    print("| model | parameters | peak training memory | vs ESPCN | median time / step | vs ESPCN |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        mem = f"{r['peak'] / 2**20:.0f} MiB"
        t = f"{statistics.median(r['times']):.2f} s" if r["times"] else "-"
        tr = f"{statistics.median(r['times']) / statistics.median(base['times']):.1f}x" if r["times"] else "-"
        print(f"| {name} | {r['params']:,} | {mem} | {r['peak'] / base['peak']:.2f}x | {t} | {tr} |")


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
