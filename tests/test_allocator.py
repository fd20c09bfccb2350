"""The CPU heap policy while streaming (NOTE [ Heap growth under a budget ] in tilegrad/_allocator.py)."""

from __future__ import annotations

import torch

from tilegrad import _allocator, execute


def test_the_heap_is_trimmed_after_cpu_work_only(monkeypatch):
    """Tiles computed on CUDA leave nothing on the CPU heap to hand back: no malloc_trim for them (it ran per tile
    there too once a CPU run had fixed the threshold in the same process)."""
    calls = []
    monkeypatch.setattr(_allocator, "_trim", lambda pad: calls.append(pad))
    _allocator.trim_heap(torch.device("cuda", 0))
    _allocator.trim_heap("meta")
    assert calls == []
    _allocator.trim_heap("cpu")
    _allocator.trim_heap(torch.device("cpu"))
    assert calls == [0, 0]


def test_the_engine_trims_for_its_own_device(monkeypatch):
    """A segmented no-grad forward (tilegrad.infer with a budget) trims after each tile and each segment, asking for
    the device it computes on."""
    import tilegrad
    from tilegrad.execute import Execution, Reader

    devices = []
    monkeypatch.setattr(execute, "trim_heap", lambda device: devices.append(torch.device(device)))
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.Conv2d(4, 4, 3, stride=2, padding=1),
        torch.nn.Conv2d(4, 1, 3),
    )
    x = torch.randn(1, 1, 64, 64)
    plan = tilegrad.plan_streaming(net, tuple(x.shape), tile_size=24, mode="stages", training=False)
    tiles = sum(len(s.grid) for s in plan.segments)
    ex = Execution(plan, Reader(x, torch.device("cpu"), torch.float32))
    try:
        with torch.no_grad():
            out = ex.forward(training=False)
    finally:
        ex.close()
    torch.testing.assert_close(out, net(x))
    assert len(devices) == tiles + len(plan.segments) and set(devices) == {torch.device("cpu")}
