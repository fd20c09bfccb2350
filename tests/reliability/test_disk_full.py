"""A full disk (NOTE [ A full disk ] in tilegrad/_atomic.py): one line naming the file and the bytes; infer keeps
the tiles it computed so that --resume finishes once space is freed; saliency leaves no truncated file under its
final name; temporary files of killed checkpoint writers are removed by the next write.

The disk is real: a tmpfs of a few KiB mounted for the test (it needs root, as in this project's CI container; the
tests skip elsewhere). Freeing space is a remount with a larger size.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tilegrad._atomic import atomic_write
from tilegrad.train.checkpoint import save_checkpoint

from .conftest import PYTHON, SMALL, one_error_line, run_cli


@pytest.fixture
def small_disk(tmp_path):
    mounted = []

    def mount(size: str):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _grow(where, size="4m"):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


NET = """
import torch
from tilegrad.models import small_cnn

def build():
    torch.manual_seed(0)
    return small_cnn(width=8)
"""


def test_infer_keeps_its_tiles_on_a_full_disk_and_resume_finishes_identically(tmp_path, small_disk, capsys):
    (tmp_path / "net.py").write_text(NET)
    np.save(tmp_path / "in.npy", np.random.default_rng(0).random((3, 512, 512), dtype=np.float32))
    model = f"{tmp_path / 'net.py'}:build"
    argv = ["infer", model, tmp_path / "in.npy", None, "--tile", "128", "--no-progress"]
    reference = tmp_path / "ref.npy"
    assert run_cli(capsys, *[reference if a is None else a for a in argv])[0] == 0
    disk = small_disk("64k")  # the output is 8 x 128 x 128 float32 = 512 KiB
    out = disk / "out.npy"
    code, err = run_cli(capsys, *[out if a is None else a for a in argv])
    line = one_error_line(err)
    assert code == 2 and "no space left on the device writing" in line and "bytes needed" in line, line
    assert "kept" in line and "continue with the same command plus --resume" in line
    assert not out.exists() and (disk / "out.npy.partial").exists()
    _grow(disk)
    code, err = run_cli(capsys, *[out if a is None else a for a in argv], "--resume")
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out), np.load(reference))
    assert sorted(p.name for p in disk.iterdir()) == ["out.npy"]


def test_saliency_leaves_nothing_under_its_final_names(trained, small_disk, capsys):
    disk = small_disk("8k")
    code, err = run_cli(
        capsys, "saliency", trained / "run/checkpoint.pt", trained / "img/s0.png", disk / "s.png"
    )
    line = one_error_line(err)
    assert code == 2 and "no space left on the device writing" in line and "bytes needed" in line, line
    assert [p.name for p in disk.iterdir()] == []  # no s.npy, no s.png, no temporary file


def test_train_names_the_file_it_could_not_write(trained, small_disk, capsys):
    disk = small_disk("16k")
    code, err = run_cli(
        capsys, "train", trained / "slides.csv", "--out", disk / "run", "--epochs", "1", *SMALL
    )
    line = one_error_line(err)
    assert (
        code == 2 and f"no space left on the device writing {disk / 'run'}" in line and "bytes needed" in line
    )
    assert not [p for p in (disk / "run").iterdir() if ".tmp-" in p.name]


def test_atomic_write_on_a_full_disk_keeps_the_old_version(small_disk):
    from tilegrad import DiskFullError

    disk = small_disk("16k")
    target = atomic_write(disk / "a.bin", b"old")
    with pytest.raises(DiskFullError) as info:
        atomic_write(target, b"x" * 100_000)
    assert info.value.needed == 100_000 and str(target) in str(info.value)
    assert target.read_bytes() == b"old" and [p.name for p in disk.iterdir()] == ["a.bin"]


def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # that process has exited: its PID is no longer running
    stale = tmp_path / f".checkpoint.pt.tmp-{pid}"
    stale.write_bytes(b"half a checkpoint")
    alive = tmp_path / f".checkpoint.pt.tmp-{1}"  # PID 1 runs: maybe a concurrent writer, left alone
    alive.write_bytes(b"someone else's")
    save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    assert not stale.exists() and alive.exists()
