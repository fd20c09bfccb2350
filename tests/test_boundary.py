"""Boundary stores against a plain tensor, and the scratch directory's checks and cleanup (tilegrad/boundary.py:
NOTE [ Storage tiers ], NOTE [ Scratch lifetime ])."""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tilegrad import ConfigError, DiskFullError, ShapeError, WriterStateError
from tilegrad.boundary import DiskStore, Scratch, Store, TensorStore, remove_stale_runs

from .conftest import SRC

CUDA = torch.cuda.is_available()


def _runs(root: Path) -> list[Path]:
    return sorted(root.glob("tilegrad-scratch-*"))


def _make(kind: str, shape: tuple[int, ...], dtype: torch.dtype, scratch: Scratch) -> Store:
    if kind == "device":
        return TensorStore(shape, dtype, "cpu")
    if kind == "host":  # pinned host memory, reads copied to the GPU
        return TensorStore(shape, dtype, "cpu", compute_device="cuda")
    store = DiskStore(shape, dtype, scratch, "store", "cpu")
    if kind == "disk-whole":  # the path an accelerator takes (whole box in file layout), run on the CPU
        store._fused = False
    if (
        kind == "disk-5"
    ):  # a staging buffer of 5 positions: runs split into pieces and groups, one run a call;
        store._piece = 5  # writes in calls of 3 bytes
        store._write_bytes = 3
        store._span_bytes, store._gap_bytes = 5 * store._position_bytes, 0
    if kind == "disk-spans":  # spans of a few runs with their gaps, whatever the gap (NOTE [ Storage tiers ])
        store._span_bytes, store._gap_bytes = 24 * store._position_bytes, 2**20
    return store


def _random_box(rng: random.Random, spatial: tuple[int, ...]) -> tuple[slice, ...]:
    box = []
    for size in spatial:
        kind = rng.random()
        if kind < 0.2:  # the whole dim: joins runs in the file (NOTE [ Storage tiers ])
            box.append(slice(None) if rng.random() < 0.5 else slice(0, size))
        elif kind < 0.25:  # empty
            start = rng.randint(0, size)
            box.append(slice(start, start))
        else:
            a, b = sorted(rng.sample(range(size + 1), 2))
            box.append(slice(a, b))
    return tuple(box)


def _value(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


KINDS = [
    "device",
    pytest.param("host", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA")),
    "disk",
    "disk-whole",
    "disk-5",
    "disk-spans",
]
SHAPES = [
    (2, 3, 37),  # 1D, N > 1
    (2, 3, 19, 23),  # 2D, odd sizes
    (1, 2, 7, 9, 11),  # 3D
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_store_matches_a_plain_tensor_on_random_boxes(tmp_path, kind, shape, dtype):
    rng = random.Random(hash((kind, shape, str(dtype))) & 0xFFFF)
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    ref = torch.zeros(shape, dtype=dtype)
    with Scratch(tmp_path, 0) as scratch:
        store = _make(kind, shape, dtype, scratch)
        assert isinstance(store, Store) and store.nbytes == ref.numel() * ref.element_size()
        for step in range(60):
            box = _random_box(rng, shape[2:])
            index = (slice(None), slice(None), *box)
            op = ("write", "add", "add", "read")[step % 4]
            # shared: the store's own memory where it can (NOTE [ Storage tiers ]), read only
            if op == "read":
                got = store.read(box, shared=rng.random() < 0.5)
                assert got.is_contiguous() and got.shape == ref[index].shape
                assert torch.equal(got.cpu(), ref[index]), (op, box)
                continue
            value = _value(tuple(ref[index].shape), dtype, gen)
            if op == "write":
                store.write(box, value)
                ref[index] = value
            else:  # add: boxes overlap earlier ones, as tile gradients do; same rounding as +=
                store.add(box, value)
                ref[index] += value
        assert torch.equal(store.read(tuple(slice(None) for _ in shape[2:])).cpu(), ref)
        store.close()


@pytest.mark.parametrize("seed", range(4))
def test_disk_store_on_random_call_geometries(tmp_path, seed):
    # any staging and call sizes (spans, gaps, accelerator pieces, pwrite calls), 1-3 spatial dims, N > 1, float32
    # and float64, on random boxes: reads, writes and adds give exactly what a plain tensor does
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(25):
        spatial = tuple(rng.randint(1, 11) for _ in range(rng.randint(1, 3)))
        shape = (rng.randint(1, 3), rng.randint(1, 3), *spatial)
        dtype = rng.choice([torch.float32, torch.float64])
        ref = torch.zeros(shape, dtype=dtype)
        with Scratch(tmp_path, 0) as scratch:
            store = DiskStore(shape, dtype, scratch, "map", "cpu")
            pb = store._position_bytes
            store._fused = rng.random() < 0.8
            store._piece = rng.randint(1, 7)
            store._span_bytes = rng.choice([1, pb * rng.randint(1, 9), 2**20])
            store._gap_bytes = rng.choice([0, pb * rng.randint(1, 9), 2**20])
            store._write_bytes = rng.choice([1, 5, pb * rng.randint(1, 9), 2**20])
            for _ in range(16):
                box = _random_box(rng, spatial)
                index = (slice(None), slice(None), *box)
                op = rng.choice(["write", "add", "read"])
                if op == "read":
                    assert torch.equal(store.read(box), ref[index]), (shape, box)
                    continue
                value = _value(tuple(ref[index].shape), dtype, gen)
                if op == "write":
                    store.write(box, value)
                    ref[index] = value
                else:
                    store.add(box, value)
                    ref[index] += value
            assert torch.equal(store.read(tuple(slice(None) for _ in spatial)), ref), shape


@pytest.mark.parametrize("kind", KINDS)
def test_read_returns_a_copy_not_a_view(tmp_path, kind):
    with Scratch(tmp_path, 0) as scratch:
        store = _make(kind, (1, 1, 4, 4), torch.float64, scratch)
        got = store.read((slice(0, 2), slice(0, 2)))
        got += 5
        assert torch.equal(
            store.read((slice(None), slice(None))).cpu(), torch.zeros(1, 1, 4, 4, dtype=torch.float64)
        )


def test_a_shared_read_of_a_contiguous_box_is_the_stores_own_memory():
    # a one-tile segment reads its sources whole: BENCHMARKS.md: about 0.5 s of an EfficientNet-B0 step copying them
    store = TensorStore((1, 2, 6, 5), torch.float64, "cpu")
    value = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    store.write((slice(None), slice(None)), value)
    whole = store.read((slice(None), slice(None)), shared=True)
    rows = store.read((slice(2, 4), slice(0, 5)), shared=True)  # not contiguous: the second channel's rows
    copied = store.read((slice(None), slice(None)))
    assert whole.data_ptr() == store.read((slice(None), slice(None)), shared=True).data_ptr()
    assert not _same_memory(rows, whole) and not _same_memory(copied, whole)
    assert torch.equal(whole, value) and torch.equal(rows, value[:, :, 2:4]) and torch.equal(copied, value)
    assert whole.is_contiguous() and rows.is_contiguous()
    # one sample of one channel: a box of whole rows of the first spatial dim is contiguous too
    single = TensorStore((1, 1, 6, 5), torch.float64, "cpu")
    base = single.read((slice(None), slice(None)), shared=True)
    assert single.read((slice(2, 4), slice(0, 5)), shared=True).data_ptr() == base.data_ptr() + 10 * 8
    assert not _same_memory(single.read((slice(2, 4), slice(1, 3)), shared=True), base)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_writing_into_a_shared_read_is_caught():
    # a caller that breaks the read-only promise would change the map under every later reader: the store refuses
    store = TensorStore((1, 1, 4, 4), torch.float64, "cpu")
    store.write((slice(None), slice(None)), torch.ones(1, 1, 4, 4, dtype=torch.float64))
    store.add((slice(0, 2), slice(None)), torch.ones(1, 1, 2, 4, dtype=torch.float64))  # its own: fine
    store.read((slice(None), slice(None)), shared=True).mul_(2)
    with pytest.raises(WriterStateError, match=r"read\(shared=True\)"):
        store.read((slice(0, 1), slice(0, 1)))
    with pytest.raises(WriterStateError, match="must not write into the result"):
        store.write((slice(0, 1), slice(0, 1)), torch.zeros(1, 1, 1, 1, dtype=torch.float64))


def test_a_store_made_under_inference_mode():
    # inference tensors have no version counter: the store still works, without the check above
    with torch.inference_mode():
        store = TensorStore((1, 1, 4, 4), torch.float32, "cpu")
        store.write((slice(None), slice(None)), torch.ones(1, 1, 4, 4))
        store.add((slice(0, 2), slice(None)), torch.ones(1, 1, 2, 4))
        got = store.read((slice(None), slice(None)), shared=True)
        assert got.sum().item() == 24.0 and store.read((slice(0, 1), slice(0, 1))).item() == 2.0


def test_overlapping_adds_of_a_tile_grid_sum_exactly(tmp_path):
    # gradients of 3x3 overlapping tile boxes (halo 2) added into a disk store: each pixel gets the count of boxes
    # covering it
    shape = (1, 2, 20, 20)
    expected = torch.zeros(shape, dtype=torch.float64)
    with Scratch(tmp_path, 0) as scratch:
        store = DiskStore(shape, torch.float64, scratch, "grad", "cpu")
        for y in range(0, 20, 7):
            for x in range(0, 20, 7):
                box = (slice(max(y - 2, 0), min(y + 9, 20)), slice(max(x - 2, 0), min(x + 9, 20)))
                ones = torch.ones(
                    1, 2, box[0].stop - box[0].start, box[1].stop - box[1].start, dtype=torch.float64
                )
                store.add(box, ones)
                expected[:, :, box[0], box[1]] += 1
        assert torch.equal(store.read((slice(None), slice(None))), expected)
        assert expected.max() == 4  # the fixture does overlap


def test_file_layout_runs():
    # shape (1, 2, 4, 5) float32: the file is (4, 5, 1, 2), 8 bytes per position, 40 per row (hand-computed)
    store = DiskStore.__new__(DiskStore)
    store._spatial, store._strides = (4, 5), (40, 8)
    chunk, offsets = store._runs([(1, 3), (0, 5)])  # whole rows: one run
    assert (chunk, list(offsets)) == (80, [40])
    chunk, offsets = store._runs([(1, 3), (1, 3)])  # two rows of two positions
    assert (chunk, list(offsets)) == (16, [48, 88])


def test_file_layout_of_3d_maps_is_rows_of_channels(tmp_path):
    # a 3D map with short rows is the file (D, H, N*C, W) (NOTE [ Storage tiers ]); 1D, 2D and 3D maps whose rows
    # are longer than _GAP_BYTES are (*spatial, N*C). Checked on the file's bytes, hand-computed
    shape = (2, 3, 4, 5, 6)  # N*C = 6 rows of W = 6 per (d, h)
    value = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    with Scratch(tmp_path, 0) as scratch:
        store = DiskStore(shape, torch.float64, scratch, "rows", "cpu")
        assert store.layout == "rows"
        store.write((slice(None),) * 3, value)
        raw = torch.from_numpy(np.fromfile(store.path, dtype=np.float64))
        assert torch.equal(raw, value.reshape(6, 4, 5, 6).permute(1, 2, 0, 3).flatten())
        # a box cut in every dim, written over the map, then read back and added into
        box = (slice(1, 3), slice(2, 5), slice(1, 4))
        store.write(box, -value[(slice(None), slice(None), *box)])
        value[(slice(None), slice(None), *box)] *= -1
        store.add(box, value[(slice(None), slice(None), *box)])
        value[(slice(None), slice(None), *box)] *= 2
        assert torch.equal(store.read(box), value[(slice(None), slice(None), *box)])
        assert torch.equal(store.read((slice(None),) * 3), value)
        long_rows = (1, 8, 2, 2, 600)  # 8 * 600 * 4 bytes = 18.75 KiB a row
        assert DiskStore(long_rows, torch.float32, scratch, "long", "cpu").layout == "positions"
        assert DiskStore((1, 3, 4, 5), torch.float64, scratch, "2d", "cpu").layout == "positions"


@pytest.mark.parametrize("reserve", [True, False])
def test_unwritten_regions_read_as_zero(tmp_path, reserve):
    shape = (1, 16, 1024, 1024)  # 64 MiB
    with Scratch(tmp_path, 0) as scratch:
        store = DiskStore(shape, torch.float32, scratch, "act", "cpu", reserve=reserve)
        assert torch.equal(store.read((slice(0, 64), slice(0, 64))), torch.zeros(1, 16, 64, 64))
        store.write((slice(512, 576), slice(0, 64)), torch.ones(1, 16, 64, 64))
        around = store.read((slice(500, 600), slice(0, 80)))
        assert around.sum() == 16 * 64 * 64 and around[:, :, 12:76, :64].min() == 1
        assert os.stat(store.path).st_size == store.nbytes
        taken = os.stat(store.path).st_blocks * 512
        if reserve and store.reserved:  # fallocate: the blocks are the file's from the start
            assert taken >= store.nbytes
        else:  # sparse: only the written box takes blocks
            assert not store.reserved and taken < 2 * 2**20


def test_close_deletes_the_file_and_is_idempotent(tmp_path):
    with Scratch(tmp_path, 0) as scratch:
        store = DiskStore((1, 1, 8), torch.float32, scratch, "act", "cpu")
        assert store.path.exists()
        store.close()
        store.close()
        assert not store.path.exists()
        with pytest.raises(WriterStateError, match="was closed"):
            store.read((slice(0, 2),))
        memory = TensorStore((1, 1, 8), torch.float32, "cpu")
        memory.close()
        memory.close()
        with pytest.raises(WriterStateError, match="was closed"):
            memory.write((slice(0, 2),), torch.zeros(1, 1, 2))


def test_leaving_the_scratch_closes_its_stores_and_removes_the_directory(tmp_path):
    with Scratch(tmp_path, 0) as scratch:
        store = DiskStore((1, 1, 8), torch.float32, scratch, "act", "cpu")
        store.write((slice(0, 8),), torch.ones(1, 1, 8))
        run_dir = scratch.run_dir
        assert run_dir.name.startswith(f"tilegrad-scratch-{os.getpid()}-") and store.path.parent == run_dir
    assert not run_dir.exists() and _runs(tmp_path) == []
    with pytest.raises(WriterStateError, match="was closed"):
        store.read((slice(0, 2),))


def test_the_scratch_is_removed_on_an_error_and_on_keyboard_interrupt(tmp_path):
    for error in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(error)), Scratch(tmp_path, 0) as scratch:
            DiskStore((1, 1, 8), torch.float32, scratch, "act", "cpu")
            raise error
        assert _runs(tmp_path) == []


@pytest.mark.parametrize(
    ("box", "value", "fragment"),
    [
        ((slice(0, 2),), torch.zeros(1, 2, 2), "a box is a tuple of 2 slices"),  # one slice for a 2D map
        ([slice(0, 2), slice(0, 2)], torch.zeros(1, 2, 2, 2), "a box is a tuple of 2 slices"),  # a list
        ((slice(0, 4, 2), slice(0, 2)), torch.zeros(1, 2, 2, 2), "step 1"),
        ((slice(-2, 8), slice(0, 2)), torch.zeros(1, 2, 10, 2), "does not lie inside"),  # no negative bounds
        ((slice(0, 9), slice(0, 2)), torch.zeros(1, 2, 9, 2), "does not lie inside"),  # no clipping
        ((slice(0, 2), slice(0, 2)), torch.zeros(1, 2, 2, 3), "must have shape (1, 2, 2, 2)"),
        ((slice(0, 2), slice(0, 2)), torch.zeros(1, 2, 2, 2, dtype=torch.float64), "dtype torch.float32"),
        ((slice(0, 2), slice(0, 2)), [[0.0]], "from a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("kind", ["device", "disk", "disk-whole"])
def test_bad_boxes_and_values_are_refused(tmp_path, kind, box, value, fragment):
    with Scratch(tmp_path, 0) as scratch:
        store = _make(kind, (1, 2, 8, 8), torch.float32, scratch)
        with pytest.raises(ShapeError) as info:
            store.add(box, value)
        assert fragment in str(info.value)


def test_bad_store_arguments(tmp_path):
    with pytest.raises(ShapeError, match="at least one spatial dim"):
        TensorStore((1, 2), torch.float32, "cpu")
    # storage on an accelerator, compute on the CPU
    with pytest.raises(ConfigError, match="pass device='cpu'"):
        TensorStore((1, 2, 3), torch.float32, "cuda", compute_device="cpu")
    with Scratch(tmp_path, 0) as scratch:
        DiskStore((1, 2, 3), torch.float32, scratch, "a", "cpu")
        with pytest.raises(ConfigError, match="already exists"):
            DiskStore((1, 2, 3), torch.float32, scratch, "a", "cpu")
        for name in ("", ".lock", "sub/a"):
            with pytest.raises(ConfigError, match="plain file name"):
                DiskStore((1, 2, 3), torch.float32, scratch, name, "cpu")
    with pytest.raises(WriterStateError, match="needs an open Scratch"):
        scratch.path("a")


def test_a_full_disk_names_the_file(tmp_path):
    # /dev/full answers every write with ENOSPC: put it behind the store's descriptor
    with Scratch(tmp_path, 0) as scratch:
        store = DiskStore((1, 2, 8, 8), torch.float32, scratch, "act", "cpu")
        full = os.open(
            "/dev/full", os.O_RDWR
        )  # like the store's own descriptor: a write may read its span first
        os.dup2(full, store._fd)
        os.close(full)
        with pytest.raises(DiskFullError) as info:
            store.write((slice(0, 2), slice(0, 2)), torch.ones(1, 2, 2, 2))
        assert isinstance(info.value, OSError) and str(store.path) in str(info.value)
        assert "--scratch-dir" in str(info.value)


def test_a_file_size_limit_is_a_full_disk_too(tmp_path):
    # ulimit -f below the store's size: the sparse file cannot even be sized (EFBIG), in a child process
    script = textwrap.dedent(
        """
        import resource, signal, sys, torch
        from tilegrad import DiskFullError
        from tilegrad.boundary import DiskStore, Scratch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))
        with Scratch(sys.argv[1], 0) as scratch:
            try:
                DiskStore((1, 4, 1024, 1024), torch.float32, scratch, "act", "cpu")
            except DiskFullError as err:
                print("DiskFullError", err)
        """
    )
    done = _python(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("DiskFullError") and "act (16,777,216 bytes needed" in done.stdout
    assert _runs(tmp_path) == []


# ---- the scratch directory ------------------------------------------------------------------------------------


def test_a_missing_scratch_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as info, Scratch(missing, 3 * 2**30):
        pass
    message = str(info.value)
    assert f"scratch directory {missing} does not exist" in message and "3,221,225,472 bytes" in message
    assert "create it" in message and "--scratch-dir" in message


def test_a_file_instead_of_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"), Scratch(tmp_path / "f", 0):
        pass


def test_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not stop writing")
        with pytest.raises(ConfigError, match="is not writable"), Scratch(ro, 0):
            pass
    finally:
        ro.chmod(0o700)


def test_too_little_space_names_the_path_and_the_bytes(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    needed = free + 2**40
    with pytest.raises(DiskFullError) as info, Scratch(tmp_path, needed):
        pass
    message = str(info.value)
    assert str(tmp_path) in message and f"{needed:,} bytes needed" in message and " free)" in message
    assert "--scratch-dir" in message and "larger memory budget" in message
    assert _runs(tmp_path) == []  # nothing created before the check


def test_needed_bytes_is_a_byte_count():
    for bad in (-1, 1.5, "1GiB", True):
        with pytest.raises(ConfigError, match="needed_bytes"):
            Scratch(None, bad)


def test_the_default_directory_is_the_system_temp_dir():
    import tempfile

    with Scratch(None, 0) as scratch:
        assert scratch.run_dir.parent == Path(tempfile.gettempdir())


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_directories_of_dead_pids_are_removed(tmp_path):
    dead = tmp_path / f"tilegrad-scratch-{_dead_pid()}-0abc"
    dead.mkdir()
    (dead / "act").write_bytes(b"x" * 100)
    alive = tmp_path / f"tilegrad-scratch-{os.getpid()}-0def"  # a live PID without a lock file: kept
    alive.mkdir()
    other = tmp_path / "tilegrad-scratch-notapid"  # not a run directory name: kept
    other.mkdir()
    with Scratch(tmp_path, 0) as first:
        assert first.removed == [dead] and not dead.exists() and alive.exists() and other.exists()
        with Scratch(tmp_path, 0) as second:  # an open run (its lock is held) is never stale
            assert second.removed == [] and first.run_dir.exists()
        assert remove_stale_runs(tmp_path) == []


def test_the_sigterm_handler_is_installed_only_while_a_scratch_is_open(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Scratch(tmp_path, 0), Scratch(tmp_path, 0):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


# ---- a run killed from outside (subprocesses) -----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, torch
    from tilegrad.boundary import DiskStore, Scratch
    with Scratch(sys.argv[1], 0) as scratch:
        store = DiskStore((1, 4, 256, 256), torch.float32, scratch, "act", "cpu")
        store.write((slice(0, 256), slice(0, 256)), torch.ones(1, 4, 256, 256))
        print(scratch.run_dir, flush=True)
        while True:  # tiles being added when the signal comes
            store.add((slice(0, 128), slice(64, 192)), torch.ones(1, 4, 128, 128))
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _python(script: str, *argv: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, argv)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _killed(tmp_path: Path, sig: signal.Signals, script: str = CHILD) -> tuple[Path, int]:
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        run_dir = Path(child.stdout.readline().decode().strip())
        assert run_dir.is_dir() and (run_dir / "act").exists(), child.stderr.read().decode()[-2000:]
        child.send_signal(sig)
        code = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    return run_dir, code


def test_ctrl_c_leaves_nothing_behind(tmp_path):
    run_dir, code = _killed(tmp_path, signal.SIGINT)
    assert code != 0 and not run_dir.exists() and _runs(tmp_path) == []


def test_sigterm_leaves_nothing_behind_and_still_terminates(tmp_path):
    run_dir, code = _killed(tmp_path, signal.SIGTERM)
    assert code == -signal.SIGTERM  # died of SIGTERM, as without the handler
    assert not run_dir.exists() and _runs(tmp_path) == []


def test_sigterm_with_the_programs_own_handler_lets_it_decide(tmp_path):
    # a program that turns SIGTERM into SystemExit: its handler runs, and leaving the `with` removes the directory
    script = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n" + CHILD
    run_dir, code = _killed(tmp_path, signal.SIGTERM, script)
    assert code == 3 and not run_dir.exists() and _runs(tmp_path) == []


def test_sigkill_leaves_the_directory_for_the_next_run_to_remove(tmp_path):
    run_dir, code = _killed(tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL and run_dir.exists()  # nothing runs on SIGKILL
    with Scratch(tmp_path, 0) as scratch:
        assert scratch.removed == [run_dir] and not run_dir.exists()
        assert _runs(tmp_path) == [scratch.run_dir]


# ---- memory -----------------------------------------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, tilegrad
    from tilegrad.boundary import DiskStore, Scratch
    torch.set_num_threads(1)
    box = 128
    with Scratch(sys.argv[1], 0) as scratch, tilegrad.PeakMemoryMeter("cpu") as meter:
        store = DiskStore((1, 64, 1024, 1024), torch.float32, scratch, "act", "cpu")  # 256 MiB
        tile = torch.ones(1, 64, box, box)
        for y in range(0, 1024, box):
            for x in range(0, 1024, box):
                store.write((slice(y, y + box), slice(x, x + box)), tile)
        total = 0.0
        for y in range(0, 1024, box):
            for x in range(0, 1024, box):
                store.add((slice(y, y + box), slice(x, x + box)), tile)
                total += float(store.read((slice(y, y + box), slice(x, x + box))).sum())
        assert total == 2 * 64 * 1024 * 1024, total
    print(json.dumps({"peak": meter.peak_bytes}))
    """
)


def test_a_disk_store_far_larger_than_memory_does_not_grow_rss(tmp_path, subprocess_peak):
    # 256 MiB written, added into and read back in 4 MiB boxes: the process holds a few boxes, never the map
    # (NOTE [ Storage tiers ]: pread/pwrite, no memory map)
    peak = subprocess_peak(RSS_SCRIPT, tmp_path, threads=1, mmap_threshold=65536)
    assert peak < 64 * 2**20, peak
    assert _runs(tmp_path) == []


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_a_disk_store_reads_to_the_compute_device(tmp_path):
    with Scratch(tmp_path, 0) as scratch:
        store = DiskStore((1, 2, 8, 8), torch.float32, scratch, "act", "cuda")
        store.write((slice(0, 8), slice(0, 8)), torch.ones(1, 2, 8, 8, device="cuda"))
        got = store.read((slice(2, 4), slice(0, 8)))
        assert got.device.type == "cuda" and got.sum().item() == 32
