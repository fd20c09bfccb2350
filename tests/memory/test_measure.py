import functools
from pathlib import Path

import pytest
import torch

import tilegrad.memory.measure as measure
from tilegrad import PeakMemoryMeter, TilegradError, measure_peak_memory


def test_cpu_peak_sees_a_transient_allocation():
    # 64 MB written then freed inside fn: the peak must see it although nothing is left at the end.
    def fn():
        x = torch.ones(16_000_000)
        y = x * 2
        del x, y

    peak = measure_peak_memory(fn)
    assert 120e6 < peak < 200e6, peak


def test_cpu_peak_is_not_hidden_by_memory_freed_earlier():
    # Regression: without malloc_trim, memory freed before the meter starts is reused silently and the peak reads ~0.
    # The small pinned tensors between the freed large ones keep glibc from shrinking the heap by itself (a heap
    # only shrinks from its top), so only malloc_trim hands those pages back; without it this reads 0.
    junk, pins = [], []
    for _ in range(400):
        junk.append(torch.ones(100_000))  # 400 KB each, 160 MB in all
        pins.append(torch.ones(1000))
    del junk
    with PeakMemoryMeter("cpu") as meter:
        chunks = [torch.ones(100_000) for _ in range(200)]  # 80 MB
        del chunks
    assert meter.peak_bytes > 60e6, meter.peak_bytes
    del pins


def test_nested_cpu_meters_keep_the_outer_peak():
    # Regression: the inner meter's reset of the process high-water mark erased the outer meter's 200 MB.
    with PeakMemoryMeter("cpu") as outer:
        x = torch.ones(52_000_000)  # 208 MB written
        del x
        with PeakMemoryMeter("cpu") as inner:
            y = torch.ones(1_000_000)  # 4 MB
            del y
    assert outer.peak_bytes >= 200e6, outer.peak_bytes
    assert inner.peak_bytes < 100e6, inner.peak_bytes


# ---- which device measure_peak_memory measures (NOTE [ Device of measure_peak_memory ]) -------------------------
CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("hinted", "cuda_initialized", "expected"),
    [
        ([], False, CPU),  # nothing to go by, no CUDA in this process: CPU
        ([CPU], True, CPU),  # only CPU tensors, although CUDA is initialised
        ([CPU, CUDA0], False, CUDA0),  # any CUDA tensor: CUDA (CPU inputs are often moved inside fn)
        ([CUDA0, CUDA0], True, CUDA0),
    ],
)
def test_device_choice(hinted, cuda_initialized, expected):
    assert measure._choose_device(hinted, cuda_initialized) == expected


@pytest.mark.parametrize(
    ("hinted", "needle"),
    [
        ([], "PeakMemoryMeter('cuda')"),  # CUDA initialised, no hint: refuse to guess
        ([CUDA0, CUDA1], "cuda:0, cuda:1"),  # two GPUs: say which were seen
    ],
)
def test_ambiguous_device_is_refused(hinted, needle):
    with pytest.raises(TilegradError) as info:
        measure._choose_device(hinted, True)
    assert needle in str(info.value)


_GLOBAL_MODEL = torch.nn.Linear(2, 2)


def _uses_global_model():
    return _GLOBAL_MODEL(torch.ones(1, 2))


class _Holder:
    def __init__(self):
        self.net = torch.nn.Conv2d(1, 1, 1)

    def run(self):
        return self.net


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (lambda t: t.sum(), (torch.ones(2),)),  # a tensor argument
        (torch.nn.Linear(2, 2), ()),  # a module's parameters
        ((lambda w: lambda: w * 2)(torch.ones(2)), ()),  # a closure variable
        (functools.partial(torch.add, torch.ones(2)), ()),  # a partial's arguments
        (_uses_global_model, ()),  # a global the function names
        (_Holder().run, ()),  # a bound method's object: its attributes
        ((lambda: lambda: _uses_global_model())(), ()),  # a function reached through another one
    ],
)
def test_device_hints_are_found(fn, args):
    assert CPU in measure._hinted_devices(fn, args, {})


def test_no_hint_with_cuda_initialised_asks_for_a_meter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(TilegradError, match=r"PeakMemoryMeter\('cuda'\)"):
        measure_peak_memory(lambda: torch.ones(10).sum())


def test_cuda_initialised_while_measuring_cpu_is_refused(monkeypatch):
    state = {"initialized": False}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: state["initialized"])

    def fn():  # stands in for a function whose first CUDA call initialises CUDA
        state["initialized"] = True

    with pytest.raises(TilegradError, match="initialised CUDA while its CPU memory was measured"):
        measure_peak_memory(fn)


# ---- NOTE [ Resident pages of a measurement ] (tilegrad/memory/workload.py) ----------------------------------------
_MODELS = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_models.py"


def test_a_measurement_below_its_floor_or_in_swap_is_named_disturbed():
    """Once in CI ResNet-34 at 2x3x128^2 measured 114 MB, below the 174 MB its parameters and gradients hold at once
    (275.5 MB estimated, 275.3-275.9 MB measured here): such a measurement is not compared with anything."""
    from tilegrad.memory.workload import disturbed

    clean = {"peak_bytes": 275_783_680, "floor_bytes": 174_381_376, "swap_before": 0, "swap_after": 0}
    assert disturbed(clean) == ""
    assert "below the 166.3 MiB" in disturbed(dict(clean, peak_bytes=114_000_000))
    assert "3.0 MiB of the measuring process went to swap" in disturbed(dict(clean, swap_after=3 * 2**20))
    # pages in swap all along (a CI machine with swap) do not hide the measured run's peak
    assert disturbed(dict(clean, swap_before=4096, swap_after=4096)) == ""


@pytest.mark.parametrize("mode, grads", [("train", 2), ("infer", 1)])
def test_the_measuring_child_reports_its_floor_and_swap(mode, grads):
    """The child's report (a real subprocess): its floor is the parameters' bytes (twice in training), its measured
    peak is above it, and it reports its pages in swap before and after the measured run."""
    import json
    import os
    import subprocess
    import sys

    from tilegrad.models.resolve import resolve_model

    spec = f"{_MODELS}:tilegrad_espcn3d"
    request = {"model": spec, "input_shape": [1, 6, 16, 16, 16], "mode": mode, "dtype": "float32",
               "optimizer": "sgd", "steps": 2, "threads": 1}  # fmt: skip
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(Path(measure.__file__).parents[2]))
    proc = subprocess.run(
        [sys.executable, "-m", "tilegrad.memory.workload", json.dumps(request)],
        env=env, capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    factory, _ = resolve_model(spec)
    params = sum(p.numel() * p.element_size() for p in factory().parameters())
    assert result["floor_bytes"] == grads * params
    assert result["peak_bytes"] >= result["floor_bytes"] > 0
    assert result["swap_after"] >= 0 and result["swap_before"] >= 0  # VmSwap read (0 where it cannot be)


def test_a_measurement_disturbed_twice_is_refused_with_the_reason(monkeypatch):
    from tilegrad.memory import workload

    seen = []
    monkeypatch.setattr(workload, "disturbed", lambda result: seen.append(result) or "12.0 MiB were in swap")
    with pytest.raises(TilegradError, match=r"disturbed twice: 12\.0 MiB were in swap"):
        workload.measure_workload_subprocess(f"{_MODELS}:tilegrad_espcn3d", (1, 6, 8, 8, 8), timeout=300)
    assert len(seen) == 2 and all(r["peak_bytes"] > 0 for r in seen)
