"""What the heap trim costs in segmented ``tilegrad.infer`` (NOTE [ Heap growth under a budget ] in _allocator.py).

A forward without gradients hands the heap's free pages back to the kernel (``malloc_trim``) after every tile, so the
measured peak stays at the prediction. This times those calls inside a real run and compares the peak and the time
with no trim at all (the threshold still fixed). Every configuration runs in its own process (clean peak, fresh heap):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/heap_trim.py                      # MONAI UNet 16-32-64, 96^3, 24MiB
    OMP_WAIT_POLICY=PASSIVE python benchmarks/heap_trim.py --size 128 --budget 48MiB --repeat 3

Prints, per configuration, the median over ``--repeat`` runs of: infer seconds (wall and process CPU), seconds
inside malloc_trim, its number of calls, and the measured peak (tilegrad.PeakMemoryMeter).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def run(config: str, size: int, budget: str) -> dict:
    import monai
    import torch

    import tilegrad
    from tilegrad import _allocator, execute

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = monai.networks.nets.UNet(
        spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64), strides=(2, 2), num_res_units=2,
        norm="batch",
    ).eval()  # fmt: skip
    volume = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    calls, spent = [0], [0.0]
    # no-trim: the heap left to glibc once the threshold is fixed (what the trim buys)
    original = _allocator.trim_heap if config == "trim" else (lambda device="cpu": None)

    def timed(device: torch.device | str = "cpu") -> None:
        t = time.perf_counter()
        original(device)
        spent[0] += time.perf_counter() - t
        calls[0] += 1

    execute.trim_heap = timed  # type: ignore[assignment]
    with torch.no_grad():  # first use of the kernels (their code and workspaces) outside the measured peak
        model(volume[..., :32, :32, :32])
    with torch.no_grad(), tilegrad.PeakMemoryMeter("cpu") as meter:
        wall, cpu = time.perf_counter(), time.process_time()
        tilegrad.infer(model, volume, memory_budget=budget, mode="auto")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "wall": wall,
        "cpu": cpu,
        "trim": spent[0],
        "calls": calls[0],
        "peak_mib": meter.peak_bytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--budget", default="24MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.size, args.budget)))
        return
    print(f"load: {os.getloadavg()}")
    for config in ("trim", "no-trim"):
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    config,
                    "--size",
                    str(args.size),
                    "--budget",
                    args.budget,
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{config:12s} wall {med['wall']:.2f} s  cpu {med['cpu']:.2f} s  in malloc_trim {med['trim']:.3f} s "
            f"({100 * med['trim'] / med['cpu']:.1f}% of cpu, {med['calls']:.0f} calls)  peak {med['peak_mib']:.1f} MiB"
        )


if __name__ == "__main__":
    main()
