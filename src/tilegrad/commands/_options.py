"""Options several subcommands share, written once so that their names and help agree."""

from __future__ import annotations

import argparse


def add_trust_model_code(p: argparse.ArgumentParser) -> None:
    """``--trust-model-code``: a checkpoint's model spec may import code outside the known model libraries."""
    p.add_argument(
        "--trust-model-code",
        action="store_true",
        help="let the checkpoint's model spec import and call code outside the known model libraries (only for "
        "checkpoints you trust; see docs/training.md)",
    )


def add_checkpoint_tiling(p: argparse.ArgumentParser) -> None:
    """``--tile`` or ``--budget`` (default: the checkpoint's own) and ``--device``, for commands that run a
    checkpoint of ``tilegrad train``."""
    tiling = p.add_mutually_exclusive_group()
    tiling.add_argument("--tile", type=int, help="tile size (default: as in training)")
    tiling.add_argument("--budget", help="memory budget such as 2GiB (tile size chosen automatically)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
