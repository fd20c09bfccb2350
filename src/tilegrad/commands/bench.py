"""``tilegrad bench TARGET [ARGS...]``: run one of the benchmark scripts of the source tree."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

TARGETS = {
    "streaming": (
        "streaming_resnet34.py",
        "ResNet-34 training step: conventional vs streamed vs checkpointing",
    ),
    "infer": ("infer_vs_monai.py", "exact tiled inference vs MONAI sliding_window_inference"),
    "reversible": ("reversible.py", "ESPCN / ESPCN-RN4 / naive: peak memory and time per step"),
    "mri": ("espcn_mri_demo.py", "ESPCN super-resolution demo on nibabel's anatomical MRI"),
    "memory": ("memory_accuracy.py", "predicted vs measured peak memory (and torchinfo)"),
    "io": ("io_memory.py", "peak memory of the slide writers and readers"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark script (benchmarks/ in the source tree)",
        description="Targets: " + "; ".join(f"{k}: {v[1]}" for k, v in TARGETS.items()),
    )
    p.add_argument("target", choices=sorted(TARGETS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the script (try: -- --help)")
    p.set_defaults(func=run)


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "benchmarks"


def run(args: argparse.Namespace) -> int:
    from ..errors import TilegradError

    script = benchmarks_dir() / TARGETS[args.target][0]
    if not script.exists():
        raise TilegradError(
            f"benchmark script {script.name} not found next to the package (looked in {script.parent}); the "
            "benchmarks live in the source tree: clone the repository and install it with `make install`"
        )
    extra = [a for a in args.args if a != "--"]
    return subprocess.call([sys.executable, str(script), *extra])
