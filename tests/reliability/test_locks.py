"""One writer per output (NOTE [ One writer per output ] in tilegrad/_lock.py), tested with two processes: a second
run refuses in command-line words naming the first one's PID, the first one finishes intact, and the lock a killed
run leaves is taken over with a warning naming it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tilegrad._lock import lock_path

from .conftest import PYTHON, SMALL, one_error_line, run_cli, subprocess_env

HOLD = """
import sys, time
from tilegrad._lock import FileLock
with FileLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _holder(path):
    """Another process holding the lock of ``path``; returns it once it holds it."""
    proc = subprocess.Popen(
        [PYTHON, "-c", HOLD, str(path)], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _commands(T, d):
    return {
        "train": (["train", T / "slides.csv", "--out", d / "run", "--epochs", "1", *SMALL], d / "run" / "checkpoint.pt"),
        "predict": (["predict", T / "run/checkpoint.pt", T / "slides.csv", d / "p.csv", "--no-progress"], d / "p.csv"),
        "saliency": (["saliency", T / "run/checkpoint.pt", T / "img/s0.png", d / "s.png"], d / "s.png"),
        "infer": (["infer", "small_cnn", T / "img/s0.png", d / "o.npy", "--tile", "48", "--no-progress"], d / "o.npy"),
    }  # fmt: skip


@pytest.mark.parametrize("command", ["train", "predict", "saliency", "infer"])
def test_a_second_writer_refuses_and_a_killed_ones_lock_is_taken_over(trained, tmp_path, capsys, command):
    argv, locked = _commands(trained, tmp_path)[command]
    locked.parent.mkdir(parents=True, exist_ok=True)
    holder = _holder(locked)
    try:
        code, err = run_cli(capsys, *argv)
        line = one_error_line(err)
        assert code == 2 and f"another tilegrad run (PID {holder.pid}) is writing the" in line, line
        assert f"{locked}; wait for it to finish or stop it (kill {holder.pid})" in line
        assert not locked.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(locked).exists()  # SIGKILL: nothing removed the file, the kernel dropped the lock
    code, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert (
        f"warning: {lock_path(locked)} was left by tilegrad run PID {holder.pid}, which is no longer running"
        in err
    )
    assert locked.exists() and not lock_path(locked).exists()


SLOW_NET = """
import time, torch
from torch import nn

class Slow(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(scale)
            self.conv.bias.zero_()
    def forward(self, x):
        time.sleep(0.15)  # unconditional: a branch on x would stop the geometry trace
        return self.conv(x)

def one():
    return Slow(0.01)

def two():
    return Slow(-0.02)
"""


def test_two_infer_runs_on_one_zarr_one_refuses_the_other_finishes(tmp_path, capsys):
    pytest.importorskip("zarr")
    from tilegrad.io import open_image

    (tmp_path / "slow.py").write_text(SLOW_NET)
    np.save(tmp_path / "in.npy", np.random.default_rng(0).random((3, 96, 96), dtype=np.float32))
    out = tmp_path / "out.zarr"
    first = subprocess.Popen(
        [PYTHON, "-m", "tilegrad", "infer", f"{tmp_path / 'slow.py'}:one", tmp_path / "in.npy", out, "--tile", "24", "--no-progress"],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not lock_path(out).exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    code, err = run_cli(capsys, "infer", f"{tmp_path / 'slow.py'}:two", tmp_path / "in.npy", out, "--tile", "24", "--no-progress")  # fmt: skip
    assert (
        code == 2
        and f"another tilegrad run (PID {first.pid}) is writing the output {out}" in one_error_line(err)
    )
    assert first.poll() is None, "the first run finished before the second started: make it slower"
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    # the store opens and holds the first model's output only
    import torch

    sys.path.insert(0, str(tmp_path))
    try:
        from slow import one
    finally:
        sys.path.remove(str(tmp_path))
    with torch.no_grad():
        expected = one().conv(torch.from_numpy(np.load(tmp_path / "in.npy"))[None])[0].numpy()
    stored = np.asarray(open_image(out)[...])
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy", "out.zarr", "slow.py"]


def test_the_python_infer_locks_its_journal(tmp_path):
    import torch

    import tilegrad
    from tilegrad import LockedError

    net = torch.nn.Conv2d(1, 1, 3, padding=1).eval()
    journal = tmp_path / "run.tiles.json"
    holder = _holder(journal)
    try:
        with pytest.raises(
            LockedError, match=rf"another tilegrad run \(PID {holder.pid}\) is writing the inference journal"
        ):
            tilegrad.infer(net, torch.zeros(1, 32, 32), tile_size=16, progress=False, journal=journal)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    warns = pytest.warns(tilegrad.TilegradWarning, match=f"PID {holder.pid}, which is no longer running")
    with warns, torch.no_grad():
        tilegrad.infer(net, torch.zeros(1, 32, 32), tile_size=16, progress=False, journal=journal)
    assert journal.exists() and not lock_path(journal).exists()
