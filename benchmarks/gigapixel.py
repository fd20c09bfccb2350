"""Gigapixel training with a streamed head: ResNet-34 trunk (torchvision) + GlobalPool / AttentionMIL, float32.

Two sub-commands (issue 11's targets):

``predict``: the planner's view only (no image is allocated): for each size, the predicted device peak, time ratio
against the conventional step, host and disk bytes, with a lazy input and a 2 GiB budget; for GlobalPool("max") and
AttentionMIL(512), with automatic tiers, with tiers="device", and a what-if with a scratch disk at 2 GB/s (the
planner's DISK_* rates patched in this process only; this VM's measured 0.6-1.5 GB/s through the page cache, 0.4-0.6
GB/s reading from the disk itself: plan.py).

    python benchmarks/gigapixel.py predict --sizes 8192 16384 65536
    python benchmarks/gigapixel.py predict --configs max-disk2GBps    # the what-if alone

``measure``: writes a synthetic RGB pyramidal TIFF with tilegrad.io, reads it lazily (SlideInput) and runs one
training step (forward + backward of the head's output summed) streamed with tile_size="auto" and a 2 GiB budget;
in the same run a conventional step on a --conventional-size crop held in memory. Each step runs in its own process
(clean peak, PeakMemoryMeter); seconds per megapixel are compared.

    python benchmarks/gigapixel.py measure --size 8192 --conventional-size 2048
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 1024**3
CONFIGS = {  # name: (head, tiers, what-if disk rate in bytes/s)
    "max": ("max", "auto", None),
    "attention": ("attention", "auto", None),
    "max-device": ("max", "device", None),
    "max-disk2GBps": ("max", "auto", 2e9),  # what-if: scratch disk at 2 GB/s
}


def _trunk():
    import torch
    import torchvision

    import tilegrad

    torch.manual_seed(0)
    model = torchvision.models.resnet34(num_classes=2).eval()  # eval: frozen BatchNorm
    trunk, _ = tilegrad.split_model(model, at="avgpool")
    return trunk


def _head(name: str):
    from tilegrad.heads import AttentionMIL, GlobalPool

    return AttentionMIL(512) if name == "attention" else GlobalPool(name)


# -- predict -----------------------------------------------------------------------------------------------------
def predict(args: argparse.Namespace) -> None:
    import tilegrad.plan as tplan
    from tilegrad.errors import TilegradError
    from tilegrad.units import format_bytes

    trunk = _trunk()
    configs = [CONFIGS[c] for c in args.configs]
    rows = []
    print(
        "| image | head | tiers | predicted device peak | time / conventional | time in parts | host | disk "
        "| segments: tile px / tiles | planning (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for head_name, tiers, disk_rate in configs:
        for size in args.sizes:
            rates = ("DISK_WRITE", "DISK_READ", "DISK_ADD", "DISK_COLD_READ")
            saved = tuple(getattr(tplan, r) for r in rates)
            if disk_rate:
                for r in rates:
                    setattr(tplan, r, disk_rate)
            t0 = time.perf_counter()
            try:
                plan = tplan.plan_streaming(
                    trunk, (1, 3, size, size), memory_budget=args.budget, input_in_memory=False,
                    head=_head(head_name), tiers=tiers,
                )  # fmt: skip
                err = None
            except TilegradError as e:
                plan, err = None, str(e)
            finally:
                for r, v in zip(rates, saved):
                    setattr(tplan, r, v)
            secs = time.perf_counter() - t0
            label = tiers + (" (what-if disk 2 GB/s)" if disk_rate else "")
            if plan is None:
                print(
                    f"| {size}^2 | {head_name} | {label} | no plan: {err[:160]} | - | - | - | - | - | {secs:.1f} |"
                )
                rows.append({"size": size, "head": head_name, "tiers": label, "error": err})
                continue
            segs = ", ".join(
                "kept" if s.keep else f"{s.tile[0]}/{s.tiles}" for s in plan.segments
            )  # square images: one side
            parts = plan.time_parts
            split = (
                f"{parts['compute']:.2f} + overlap {parts['overlap']:.2f} + tiles {parts['tiles']:.2f} "
                f"+ disk {parts['disk']:.2f}"
                if parts
                else "-"
            )
            print(
                f"| {size}^2 | {head_name} | {label} | {format_bytes(plan.peak_bytes)} | x{plan.time_ratio:.2f} "
                f"| {split} | {format_bytes(plan.host_bytes)} | {format_bytes(plan.disk_bytes)} "
                f"| {len(plan.segments)}: {segs} | {secs:.1f} |",
                flush=True,
            )
            rows.append({"size": size, "head": head_name, "tiers": label, **plan.to_dict(), "seconds": secs})
            if args.verbose:
                print("    " + str(plan).replace("\n", "\n    "))
    print()
    for head_name, label in {(r["head"], r["tiers"]) for r in rows}:
        peaks = [
            r["peak_bytes"]
            for r in rows
            if r["head"] == head_name and r["tiers"] == label and "peak_bytes" in r
        ]
        ratios = [
            r["time_ratio"]
            for r in rows
            if r["head"] == head_name and r["tiers"] == label and "time_ratio" in r
        ]
        if len(peaks) > 1:
            print(
                f"{head_name}, tiers {label}: peak max/min {max(peaks) / min(peaks):.3f} over {len(peaks)} sizes; "
                f"worst time ratio x{max(ratios):.2f} ({'meets' if max(ratios) <= 1.5 else 'misses'} the x1.5 target)"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


# -- measure -----------------------------------------------------------------------------------------------------
def write_slide(path: Path, size: int, seed: int = 0) -> None:
    """Tissue-like RGB noise: smooth blobs of pink/purple over a light background, written in bands of rows."""
    import numpy as np

    import tilegrad.io as tio

    rng = np.random.default_rng(seed)
    band = 1024
    coarse = rng.random((size // 64 + 2, size // 64 + 2)).astype(np.float32)
    with tio.create_writer(
        path, (3, size, size), np.uint8, tile=256, levels=3, mpp=0.5, overwrite=True
    ) as out:
        for y in range(0, size, band):
            h = min(band, size - y)
            # nearest-upsampled coarse field (tissue / background) plus fine noise (nuclei-like texture)
            rows = coarse[y // 64 : (y + h) // 64 + 1].repeat(64, 0)[:h]
            tissue = rows.repeat(64, 1)[:, :size] > 0.45
            noise = rng.integers(0, 60, size=(3, h, size), dtype=np.uint8)
            base = np.where(tissue, np.array([200, 120, 180], np.uint8)[:, None, None], np.uint8(235))
            out[:, y : y + h, :] = (base - noise * tissue).astype(np.uint8)


def _time_disk_io() -> dict:
    """Wrap DiskStore's read / write / add to add up their calls, bytes, wall and CPU seconds (the disk term of the
    planner's cost model, measured inside the step)."""
    from tilegrad.boundary import DiskStore

    totals: dict = {}

    def wrap(name: str):
        inner = getattr(DiskStore, name)

        def timed(self, box, *rest, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            out = inner(self, box, *rest, **kwargs)
            t = totals.setdefault(name, {"calls": 0, "bytes": 0, "seconds": 0.0, "cpu_seconds": 0.0})
            t["calls"] += 1
            t["bytes"] += (
                self.nbytes
                // max(1, math.prod(self.shape[2:]))
                * math.prod(
                    (s.stop if s.stop is not None else n) - (s.start or 0)
                    for s, n in zip(box, self.shape[2:])
                )
            )
            t["seconds"] += time.perf_counter() - t0
            t["cpu_seconds"] += time.process_time() - c0
            return out

        setattr(DiskStore, name, timed)

    for name in ("read", "write", "add"):
        wrap(name)
    return totals


def run_step(method: str, path: str, size: int, head_name: str, budget: str, tiers: str) -> dict:
    import numpy as np
    import torch

    import tilegrad
    import tilegrad.io as tio
    from tilegrad.train.dataset import SlideInput

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    if os.environ.get("BENCH_NO_IO_OVERLAP"):  # the IO on the main thread between tiles (NOTE [ IO overlap ])
        import tilegrad.plan

        tilegrad.plan._Planner.overlapped = lambda self, plan, budget: plan
    trunk = _trunk()
    head = _head(head_name)
    slide = tio.open_image(path)
    # warm-up on a small image: thread pools and oneDNN primitives are created on first use
    head(trunk(torch.randn(1, 3, 256, 256))).sum().backward()
    trunk.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    plan = None
    io = _time_disk_io()
    if method == "streamed":
        body = tilegrad.StreamingModule(trunk, tile_size="auto", memory_budget=budget, head=head, tiers=tiers,
                                        progress=False)  # fmt: skip
        x = SlideInput(slide)
        plan = body.plan(x.shape, lazy=True)
        with tilegrad.PeakMemoryMeter("cpu") as meter:
            t0, c0 = time.perf_counter(), time.process_time()
            out = body(x)
            out.sum().backward()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    else:
        with tilegrad.PeakMemoryMeter("cpu") as meter:
            t0, c0 = time.perf_counter(), time.process_time()
            img = np.asarray(slide[:, :size, :size]).astype(np.float32) / 255.0
            x = torch.from_numpy(img)[None]
            out = head(trunk(x))
            out.sum().backward()
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "method": method,
        "size": size,
        "head": head_name,
        "seconds": elapsed,
        "s_per_mp": elapsed / (size * size / 1e6),
        "cpu_seconds": cpu,  # the process's CPU time (all threads): less sensitive to the machine's load
        "cpu_s_per_mp": cpu / (size * size / 1e6),
        "peak_bytes": meter.peak_bytes,
        "predicted_peak": plan.peak_bytes if plan else None,
        "predicted_ratio": plan.time_ratio if plan else None,
        "plan": str(plan) if plan else None,
        "disk_io": io,
        "predicted_parts": plan.time_parts if plan else None,
        "grad_norm": float(
            sum(p.grad.square().sum() for p in trunk.parameters() if p.grad is not None) ** 0.5
        ),
    }


def measure(args: argparse.Namespace) -> None:
    from tilegrad.units import format_bytes

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tilegrad-gigapixel-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"slide_{args.size}.tif"
    if not path.exists():
        t0 = time.perf_counter()
        write_slide(path, args.size)
        print(
            f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    print(f"load: {os.getloadavg()}", flush=True)
    results = []
    jobs = [("conventional", args.conventional_size)] * args.repeat + [("streamed", args.size)]
    if args.without_io_overlap:
        jobs.append(("streamed-sequential-io", args.size))
    if args.conventional_after:
        jobs += [("conventional", args.conventional_size)] * args.repeat
    for method, size in jobs:
        env = dict(os.environ, BENCH_NO_IO_OVERLAP="1") if method == "streamed-sequential-io" else None
        proc = subprocess.run(
            [sys.executable, __file__, "_run", method.split("-")[0], str(path), str(size), args.head, args.budget,
             args.tiers],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        if proc.returncode != 0:
            print(f"{method} @ {size}: FAILED\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["load"] = os.getloadavg()[0]
        row["method"] = method
        results.append(row)
        print(
            f"{method:<12} {size:>6}^2: {row['seconds']:8.1f} s, {row['s_per_mp']:.3f} s/MP, "
            f"CPU {row['cpu_seconds']:.1f} s ({row['cpu_s_per_mp']:.3f} s/MP, {row['cpu_seconds'] / row['seconds']:.2f} "
            "cores), peak "
            f"{format_bytes(row['peak_bytes'])}"
            + (f" (predicted {format_bytes(row['predicted_peak'])}, x{row['predicted_ratio']:.2f})"
               if row["predicted_peak"] else "")
            + f", load {row['load']:.1f}",
            flush=True,
        )  # fmt: skip
        if row["plan"]:
            print("    " + row["plan"].replace("\n", "\n    "), flush=True)
        for op, t in sorted(row.get("disk_io", {}).items()):
            print(
                f"    disk {op}: {t['calls']} calls, {t['bytes'] / 2**30:.2f} GiB, {t['seconds']:.1f} s "
                f"(CPU {t['cpu_seconds']:.1f} s), {t['bytes'] / max(t['seconds'], 1e-9) / 1e9:.2f} GB/s",
                flush=True,
            )
        if args.json:
            with args.json.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    conv = sorted(r["s_per_mp"] for r in results if r["method"] == "conventional")
    conv_cpu = sorted(r["cpu_s_per_mp"] for r in results if r["method"] == "conventional")
    stream = [r for r in results if r["method"].startswith("streamed")]
    base, base_cpu = (statistics.median(conv), statistics.median(conv_cpu)) if conv else (None, None)
    for s in stream if conv else []:
        print(f"\n{s['method']}:")
        print(
            f"\nstreamed {args.size}^2 {s['s_per_mp']:.3f} s/MP vs conventional {args.conventional_size}^2 "
            f"{base:.3f} s/MP (median of {len(conv)}): measured x{s['s_per_mp'] / base:.2f} "
            f"(CPU time x{s['cpu_s_per_mp'] / base_cpu:.2f}), predicted x{s['predicted_ratio']:.2f}; "
            f"peak {format_bytes(s['peak_bytes'])} under {args.budget}"
        )
        mp = args.size * args.size / 1e6
        io_wall = sum(t["seconds"] for t in s["disk_io"].values())
        io_cpu = sum(t["cpu_seconds"] for t in s["disk_io"].values())
        print(
            f"disk IO inside the streamed step: {io_wall:.1f} s wall, {io_cpu:.1f} s CPU = "
            f"{io_wall / (base * mp):.3f} (wall) / {io_cpu / (base_cpu * mp):.3f} (CPU) of a conventional step at "
            f"{args.size}^2 (from its s/MP); predicted disk part {s['predicted_parts'].get('disk', 0):.3f}"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        method, path, size, head, budget, tiers = sys.argv[2:8]
        print(json.dumps(run_step(method, path, int(size), head, budget, tiers)))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="planner predictions only")
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 65536])
    p.add_argument("--budget", default="2GiB")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--verbose", action="store_true", help="print each plan")
    p.add_argument("--json", type=Path)
    m = sub.add_parser("measure", help="one measured training step from a lazily read pyramidal TIFF")
    m.add_argument("--size", type=int, default=8192)
    m.add_argument("--conventional-size", type=int, default=2048)
    m.add_argument("--head", default="max", choices=["max", "avg", "attention"])
    m.add_argument("--budget", default="2GiB")
    m.add_argument("--tiers", default="auto")
    m.add_argument("--repeat", type=int, default=1, help="conventional steps before (and with --conventional-after, "
                   "after) the streamed one")  # fmt: skip
    m.add_argument("--conventional-after", action="store_true")
    m.add_argument("--without-io-overlap", action="store_true", help="also a streamed step with its IO on the main "
                   "thread between tiles (NOTE [ IO overlap ] in execute.py)")  # fmt: skip
    m.add_argument("--workdir", help="where the TIFF goes (kept; reused when present)")
    m.add_argument("--json", type=Path, help="append raw results to this JSON-lines file")
    args = parser.parse_args()
    predict(args) if args.command == "predict" else measure(args)


if __name__ == "__main__":
    main()
