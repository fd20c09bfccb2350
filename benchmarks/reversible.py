"""Peak training memory and time per step of ESPCN3d, ESPCN-RN4 and ESPCN-RN4 naive, plus memory vs depth.

Every configuration runs in its own subprocess (fresh allocator), one warm-up step, then ``--steps`` timed steps; the
peak is tilegrad.measure_peak_memory of a training step (forward, MSE loss, backward, SGD step) above the level
before it (model, optimizer state and input are already allocated), the larger of two steps.

Each configuration is measured twice: with glibc malloc as it comes, and with ``MALLOC_MMAP_THRESHOLD_=131072``
(glibc's initial threshold, fixed). By default glibc raises the threshold after freeing large blocks, so later
multi-MB tensors come from the heap, where small long-lived tensors between them keep freed memory from being
reused or returned: the resident peak then exceeds what the tensors need by tens of MiB, differently per
configuration. With the threshold fixed, every large tensor is its own mapping, returned on free: the figure is what
the tensors need. Reproduce:

    python benchmarks/reversible.py            # or: tilegrad bench reversible; writes a markdown table to stdout
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
    "ESPCN-RN16 naive": (16, True),
}
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}
TIMED = ("ESPCN", "ESPCN-RN4", "ESPCN-RN4 naive")


def child(name: str, size: int, batch: int, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)

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
    peak = max(tilegrad.measure_peak_memory(step) for _ in range(2))
    times = []
    for _ in range(steps if name in TIMED else 0):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in net.parameters())
    print(json.dumps({"peak": peak, "times": times, "params": params}))


def interleaved(size: int, batch: int, steps: int, threads: int) -> dict[str, float]:
    """Median time per training step of ESPCN-RN4 and RN4 naive, alternating in one process (same weights).

    Separate processes on a shared machine see different contention; alternating the two step by step gives each
    the same conditions, so their ratio is the reliable figure.
    """
    import torch
    import torch.nn.functional as F

    from tilegrad.models import ESPCN3d

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rev = ESPCN3d(upscale=2, rev_blocks=4)
    naive = ESPCN3d(upscale=2, rev_blocks=4, naive=True)
    naive.load_state_dict(rev.state_dict())
    x = torch.randn(batch, 1, size, size, size)
    target = torch.randn_like(rev(x).detach())
    times: dict[str, list[float]] = {"ESPCN-RN4": [], "ESPCN-RN4 naive": []}
    for i in range(steps + 1):
        for name, net in (("ESPCN-RN4", rev), ("ESPCN-RN4 naive", naive)):
            net.zero_grad(set_to_none=False)
            t0 = time.perf_counter()
            F.mse_loss(net(x), target).backward()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _run_child(name: str, args: argparse.Namespace, env: dict, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, "--size", str(args.size), "--batch", str(args.batch),
         "--steps", str(steps), "--threads", str(args.threads)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=21, help="input patch edge (low-res voxels), default 21")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per configuration (median reported)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per configuration (default 1: on a shared, oversubscribed machine OpenMP barriers "
        "spin and a 2-thread 3D convolution measured 20-50x slower than a 1-thread one)",
    )
    parser.add_argument(
        "--interleaved-only", action="store_true", help="only the alternating RN4 / RN4 naive timing"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.size, args.batch, args.steps, args.threads)
        return
    if args.interleaved_only:
        _print_interleaved(args)
        return
    import tilegrad

    env = dict(os.environ, PYTHONPATH=str(Path(tilegrad.__file__).parents[1]))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    results, fixed = {}, {}
    for name in CONFIGS:
        results[name] = _run_child(name, args, env, args.steps)
        fixed[name] = _run_child(name, args, {**env, **FIXED_MMAP}, 0)
        print(
            f"# {name}: {results[name]['peak'] / 2**20:.0f} MiB, fixed threshold {fixed[name]['peak'] / 2**20:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    base, base_fixed = results["ESPCN"], fixed["ESPCN"]
    print(
        f"input {args.batch} x 1 x {args.size}^3, upscale 2, features (50, 100), CPU, {args.threads} thread(s), "
        f"torch {_torch_version()}\n"
    )
    print(
        "| model | parameters | peak, glibc default | vs ESPCN | peak, mmap threshold fixed | vs ESPCN "
        "| median time / step | vs ESPCN |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        f = fixed[name]
        t = f"{statistics.median(r['times']):.2f} s" if r["times"] else "-"
        tr = f"{statistics.median(r['times']) / statistics.median(base['times']):.1f}x" if r["times"] else "-"
        print(
            f"| {name} | {r['params']:,} | {r['peak'] / 2**20:.0f} MiB | {r['peak'] / base['peak']:.2f}x "
            f"| {f['peak'] / 2**20:.0f} MiB | {f['peak'] / base_fixed['peak']:.2f}x | {t} | {tr} |"
        )
    _print_interleaved(args)


def _print_interleaved(args: argparse.Namespace) -> None:
    t = interleaved(args.size, args.batch, max(args.steps, 7), args.threads)
    rev, naive = t["ESPCN-RN4"], t["ESPCN-RN4 naive"]
    print(
        f"\nalternating in one process (forward + backward, median of {max(args.steps, 7)}): ESPCN-RN4 "
        f"{rev:.2f} s, ESPCN-RN4 naive {naive:.2f} s: reversible / naive = {rev / naive:.2f}x"
    )


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main()
