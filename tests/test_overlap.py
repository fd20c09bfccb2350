"""NOTE [ IO overlap ] in execute.py: scratch-file and lazy-input IO run by a background thread beside the tiles."""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest
import torch

import tilegrad
import tilegrad.units
from tilegrad.errors import DataError
from tilegrad.execute import run_plan

from .test_graph import TinyUNet
from .test_stream import rel_err

SHAPE = (1, 1, 128, 96)
# budgets whose plans cut TinyUNet into streamed segments of which at least two run their IO in the background (the
# encoder reads the lazy input and writes its map to disk, later segments read theirs from disk)
BUDGET = {torch.float64: "3MiB", torch.float32: "1.5MiB"}


class _Sink:
    """The lazy input's gradient, added box by box (tilegrad.stream.GradientSink)."""

    def __init__(self, shape, dtype):
        self.grad = torch.zeros(shape, dtype=dtype)

    def add(self, box, grad):
        self.grad[(slice(None), slice(None), *box)] += grad


class _FailingArray:
    """A lazy image whose second region cannot be read (a damaged tile of a slide); remembers the thread that read it."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype = array.shape, array.dtype
        self.reads: list[str] = []

    def __getitem__(self, key):
        self.reads.append(threading.current_thread().name)
        if len(self.reads) == 2:
            raise DataError("cannot decode the region: a damaged tile")
        return self.array[key]


def _plan(trunk, dtype):
    plan = tilegrad.plan_streaming(trunk, SHAPE, memory_budget=BUDGET[dtype], dtype=dtype, input_in_memory=False,
                                   tiers="disk", mode="stages")  # fmt: skip
    streamed = [sp for sp in plan.segments if not sp.keep and sp.tiles > 1]
    assert sum(sp.io_bytes + sp.io_forward_bytes > 0 for sp in streamed) >= 2, str(plan)
    assert plan.peak_bytes <= 0.8 * tilegrad.units.parse_bytes(BUDGET[dtype]), (
        "the IO working set is budgeted"
    )
    assert "IO beside the tiles" in str(plan)
    return plan


def _sequential(plan):
    segments = [dataclasses.replace(sp, io_bytes=0, io_forward_bytes=0) for sp in plan.segments]
    return dataclasses.replace(plan, segments=segments)


def _step(trunk, plan, image, dtype, tmp_path):
    trunk.zero_grad(set_to_none=True)
    sink = _Sink(SHAPE, dtype)
    y = run_plan(plan, trunk, image, training=True, sink=sink, scratch_dir=tmp_path, device=torch.device("cpu"),
                 dtype=dtype)  # fmt: skip
    w = torch.arange(y.numel(), dtype=dtype).reshape(y.shape).sin()
    (y * w).sum().backward()
    assert not os.listdir(tmp_path), "scratch files left after the step"
    return y.detach(), sink.grad, [p.grad.clone() for p in trunk.parameters()]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_overlapped_io_gives_the_sequential_results_bit_for_bit_and_the_plain_ones(dtype, tol, tmp_path):
    torch.manual_seed(0)
    trunk = TinyUNet().to(dtype)
    image = (
        np.random.default_rng(0)
        .standard_normal(SHAPE)
        .astype(np.float64 if dtype == torch.float64 else np.float32)
    )
    plan = _plan(trunk, dtype)
    overlapped = _step(trunk, plan, image, dtype, tmp_path)
    sequential = _step(trunk, _sequential(plan), image, dtype, tmp_path)
    # the same reads, writes and adds in the same order: identical, not merely close
    assert torch.equal(overlapped[0], sequential[0]) and torch.equal(overlapped[1], sequential[1])
    assert all(torch.equal(a, b) for a, b in zip(overlapped[2], sequential[2]))
    # and the plain computation
    trunk.zero_grad(set_to_none=True)
    x = torch.from_numpy(image).requires_grad_(True)
    y = trunk(x)
    (y * torch.arange(y.numel(), dtype=dtype).reshape(y.shape).sin()).sum().backward()
    assert rel_err(overlapped[0], y.detach()) < tol
    assert rel_err(overlapped[1], x.grad) < tol
    for p, g in zip(trunk.parameters(), overlapped[2]):
        assert rel_err(g, p.grad) < tol


def test_an_error_in_the_io_thread_is_raised_and_the_scratch_files_go(tmp_path):
    torch.manual_seed(0)
    trunk = TinyUNet().double()
    image = np.random.default_rng(0).standard_normal(SHAPE)
    plan = _plan(trunk, torch.float64)
    bad = _FailingArray(image)
    with pytest.raises(DataError, match="cannot decode"):
        run_plan(plan, trunk, bad, training=True, scratch_dir=tmp_path, device=torch.device("cpu"),
                 dtype=torch.float64)  # fmt: skip
    # the first tile was read on the main thread, the failing one ahead by the IO thread
    assert bad.reads[0] == threading.current_thread().name and bad.reads[1].startswith("tilegrad-io"), (
        bad.reads
    )
    assert not os.listdir(tmp_path)
    assert not [t for t in threading.enumerate() if t.name.startswith("tilegrad-io")]


def test_an_interrupt_while_io_runs_leaves_no_scratch_files(tmp_path):
    torch.manual_seed(0)
    trunk = TinyUNet().double()
    image = np.random.default_rng(0).standard_normal(SHAPE)
    plan = _plan(trunk, torch.float64)
    calls = []

    def interrupt(module, args):  # Ctrl-C in the decoder's second tile, with IO handed to the thread
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    handle = trunk.dec.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_plan(plan, trunk, image, training=True, scratch_dir=tmp_path, device=torch.device("cpu"),
                     dtype=torch.float64)  # fmt: skip
    finally:
        handle.remove()
    assert not os.listdir(tmp_path)
    assert not [t for t in threading.enumerate() if t.name.startswith("tilegrad-io")]


class _Skip(torch.nn.Module):
    """A residual net whose last segment recomputes its first layer from the image (the skip's cone): a segment
    after the first that reads the lazy input."""

    def __init__(self, c=6):
        super().__init__()
        nn = torch.nn
        self.a = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.c = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ReLU())
        self.d = nn.Conv2d(c, c, 3, padding=1)
        self.e = nn.Conv2d(2 * c, 2, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        a = self.a(x)
        b = a + self.b(a)
        c = self.c(b)
        d = c + self.d(c)
        return self.e(torch.cat([b, self.up(d)], 1))


def test_a_later_segment_reading_the_lazy_input_budgets_its_read_ahead():
    # review: only the first segment's lazy-input reads were counted, though every segment that reads the input
    # has them read ahead by the IO thread
    plan = tilegrad.plan_streaming(_Skip().double(), (2, 3, 192, 80), memory_budget="14MiB", dtype=torch.float64,
                                   input_in_memory=False, tiers="disk", mode="stages")  # fmt: skip
    later = [
        (k, sp) for k, sp in enumerate(plan.segments)
        if k > 0 and sp.io_bytes and any(s.op == "placeholder" for s in sp.segment.sources)
    ]  # fmt: skip
    assert later, str(plan)
    for _, sp in later:
        box = 2 * 3 * 8 * max(int(np.prod(sp.max_in_shape)), 1)  # N * C * float64 * the tile's input box
        assert sp.io_bytes >= box, (sp.io_bytes, box, str(plan))
