"""NOTE [ IO overlap ] in execute.py under skewed timing: the IO thread's reads, writes and adds held back at random
(a loaded machine, a slow disk), or the tiles slowed instead so that the thread runs ahead. A read that overtook a
pending write or add of an overlapping box, or a segment that read what the thread had not yet written, would show
here as a step that differs from the sequential one; on an idle machine the thread is usually done before the main
thread gets there, and such a race hides (a silent wrong result seen once in a coverage run was first suspected to be
one: docs/models.md says what it was). Checked when written: without the drain at the end of a segment's forward or
backward (execute.py) both "io thread" cases fail every time; test_overlap.py's step without delays caught it in
about half of its runs."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
import torch

from tilegrad.boundary import DiskStore
from tilegrad.geometry import observer_hook

from .test_graph import TinyUNet
from .test_overlap import SHAPE, _plan, _sequential, _step


def _on_io_thread() -> bool:
    return threading.current_thread().name.startswith("tilegrad-io")


class _SlowArray:
    """The lazy image, its reads held back when the IO thread makes them."""

    def __init__(self, array, delay):
        self.array, self.delay = array, delay
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        self.delay(True)
        return self.array[key]


@pytest.mark.parametrize("slow", ["io thread", "tiles"])
@pytest.mark.parametrize("seed", [0, 1])
def test_overlapped_io_with_skewed_timing_gives_the_sequential_step_bit_for_bit(
    monkeypatch, tmp_path, slow, seed
):
    rng = random.Random(seed)
    held = []

    def delay(io_side: bool) -> None:
        # up to 4 ms, on the side being slowed (the other runs at full speed)
        if io_side == _on_io_thread() and rng.random() < 0.7:
            time.sleep(rng.uniform(0, 0.004))
            held.append(io_side)

    for name in ("read", "write", "add"):
        original = getattr(DiskStore, name)

        def slowed(self, *args, _original=original, **kwargs):
            delay(slow == "io thread")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(DiskStore, name, slowed)
    torch.manual_seed(0)
    trunk = TinyUNet().double()
    image = np.random.default_rng(0).standard_normal(SHAPE)
    plan = _plan(trunk, torch.float64)
    sequential = _step(trunk, _sequential(plan), image, torch.float64, tmp_path)
    held.clear()
    if (
        slow == "tiles"
    ):  # each layer's forward held back on the main thread (recomputations in the backward too)
        hooks = [m.register_forward_pre_hook(observer_hook(lambda m, a: delay(False))) for m in trunk.modules()
                 if not list(m.children())]  # fmt: skip
    else:
        hooks = []
    try:
        overlapped = _step(trunk, plan, _SlowArray(image, delay), torch.float64, tmp_path)
    finally:
        for h in hooks:
            h.remove()
    assert len(held) > 20, "the timing was skewed"
    assert torch.equal(overlapped[0], sequential[0]) and torch.equal(overlapped[1], sequential[1])
    assert all(torch.equal(a, b) for a, b in zip(overlapped[2], sequential[2], strict=True))
