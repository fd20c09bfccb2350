"""Shared material of the reliability suite: tiny slides, one trained checkpoint, and the command line run in-process
with its stderr checked for one line and no traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.train.conftest import SMALL, write_slides
from tilegrad.cli import main

SRC = str(Path(__file__).resolve().parents[2] / "src")


def subprocess_env() -> dict[str, str]:
    """The environment of a `python -m tilegrad` child: this checkout first, one thread."""
    return {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }


PYTHON = sys.executable


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A directory with slides.csv (6 RGB slides, 4 train / 2 val) and run/checkpoint.pt trained for one epoch."""
    root = tmp_path_factory.mktemp("trained")
    csv = write_slides(root)
    code = main(["train", str(csv), "--out", str(root / "run"), "--epochs", "1", "--lr", "0.01", *SMALL])
    assert code == 0
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``tilegrad ARGV`` in-process: (exit code, stderr). Any exception other than the handled ones escapes and fails
    the test, which is the point: a traceback is a bug."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def one_error_line(err: str) -> str:
    """The single ``tilegrad CMD: error: ...`` line of stderr (warnings may precede it)."""
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]
