"""Helpers shared by tests in every folder: running the python blocks of a guide in docs/, and measuring the peak
memory of a script in a fresh Python process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import tilegrad

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(autouse=True)
def _fixed_page_cache(monkeypatch):
    """Plans with disk tiers depend on the page cache the planner assumes (NOTE [ Page cache ] in plan.py), by default
    this machine's available memory when planning: fixed here so that every test plans the same on every machine
    (a test that is about the page cache sets its own)."""
    import tilegrad.plan

    monkeypatch.setattr(tilegrad.plan, "PAGE_CACHE", 8 * 2**30)


SRC = Path(tilegrad.__file__).resolve().parents[1]


def python_blocks(doc: str) -> list[str]:
    """The ```python blocks of ``docs/<doc>``, in order."""
    return re.findall(r"```python\n(.*?)```", (DOCS / doc).read_text(), flags=re.DOTALL)


def run_blocks(doc: str, blocks: list[str] | None = None, *, shared: bool = True) -> list[dict[str, Any]]:
    """Execute ``blocks`` (default: every python block of ``docs/<doc>``) as written, in order; ``shared``: in one
    namespace (later blocks use earlier names), else each in its own. Returns the namespace of each block."""
    blocks = python_blocks(doc) if blocks is None else blocks
    spaces: list[dict[str, Any]] = []
    namespace: dict[str, Any] = {}
    for block in blocks:
        if not shared:
            namespace = {}
        exec(compile(block, str(DOCS / doc), "exec"), namespace)
        spaces.append(namespace)
    return spaces


def peak_in_subprocess(
    script: str,
    *argv: str,
    threads: int | None = None,
    mmap_threshold: int | None = None,
    timeout: float = 600,
) -> int:
    """Run ``script`` (python -c) in a fresh process that imports this tilegrad and return the peak it prints: the
    last line of its stdout, an int or JSON ``{"peak": bytes}``.

    A fresh process has no allocator history from other tests. ``threads`` sets OMP_NUM_THREADS; ``mmap_threshold``
    fixes glibc's mmap threshold, so freed blocks go back to the kernel and the peak is what the tensors need, not
    how the heap happened to fragment (NOTE [ Allocator policy for CPU measurements ] in memory/workload.py).
    """
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    value = json.loads(done.stdout.strip().splitlines()[-1])
    return int(value["peak"] if isinstance(value, dict) else value)


@pytest.fixture
def doc_examples() -> Callable[..., list[dict[str, Any]]]:
    """:func:`run_blocks`: ``doc_examples("streaming.md")`` runs that guide's python blocks."""
    return run_blocks


@pytest.fixture
def doc_blocks() -> Callable[[str], list[str]]:
    """:func:`python_blocks`: the python blocks of a guide, to run a selection of them."""
    return python_blocks


@pytest.fixture
def subprocess_peak() -> Callable[..., int]:
    """:func:`peak_in_subprocess`: the peak memory a script prints, measured in a fresh process."""
    return peak_in_subprocess
