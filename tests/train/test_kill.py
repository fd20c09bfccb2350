"""A `tilegrad train` or `tilegrad infer` process killed with SIGKILL, at a fixed or a random point, then resumed,
ends bit-for-bit where an uninterrupted run does (issue 13: keep that property)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tilegrad
from tilegrad.train import load_checkpoint

SRC = str(Path(tilegrad.__file__).resolve().parents[1])


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, make_slides):
    csv_path = make_slides(tmp_path, n=10, n_val=2)  # 8 training slides: 8 steps per epoch
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }

    def command(out: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tilegrad",
            "train",
            str(csv_path),
            "--out",
            str(tmp_path / out),
            "--model",
            "small_cnn",
            "--model-kwargs",
            '{"width": 4}',
            "--tile",
            "32",
            "--epochs",
            "4",
            "--lr",
            "0.01",
            "--seed",
            "7",
            "--save-every",
            "1",
            "--no-progress",
            "--device",
            "cpu",
            *extra,
        ]

    reference = subprocess.run(command("ref"), env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr

    victim = subprocess.Popen(command("cut"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "cut" / "checkpoint.pt"
    step = 0
    while victim.poll() is None and step < 11:  # kill somewhere in the second epoch
        if (
            checkpoint.exists()
        ):  # os.replace is atomic: never a torn file (a CheckpointError here fails the test)
            step = load_checkpoint(checkpoint)["global_step"]
        time.sleep(0.05)
    assert victim.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL
    killed_at = load_checkpoint(checkpoint)["global_step"]
    assert 11 <= killed_at < 32

    resumed = subprocess.run(command("cut", "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = load_checkpoint(tmp_path / "ref" / "checkpoint.pt"), load_checkpoint(checkpoint)
    assert a["global_step"] == b["global_step"] == 32
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_train_killed_at_random_points_resumes_bit_for_bit(tmp_path, make_slides, seed):
    """Three SIGKILLs at random moments (wherever they land: a tile, a backward, a checkpoint write, the log), each
    followed by the same command with --resume (which also starts a run that never reached a checkpoint)."""
    csv_path = make_slides(tmp_path, n=8, n_val=2)
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }

    def command(out: str) -> list[str]:
        return [sys.executable, "-m", "tilegrad", "train", str(csv_path), "--out", str(tmp_path / out), "--model",
                "small_cnn", "--model-kwargs", '{"width": 4}', "--tile", "32", "--epochs", "3", "--lr", "0.01",
                "--seed", "7", "--save-every", "2", "--no-progress", "--device", "cpu", "--resume"]  # fmt: skip

    reference = subprocess.run(command("ref"), env=env, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr
    rng = random.Random(seed)
    kills = 0
    for _ in range(3):
        victim = subprocess.Popen(command("cut"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(3.0, 8.0))
        if victim.poll() is not None:
            assert victim.returncode == 0, victim.stderr.read()
            break
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
        victim.stderr.close()
        kills += 1
    done = subprocess.run(command("cut"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert kills >= 1
    a = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert a["global_step"] == b["global_step"] == 18
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [h["val_loss"] for h in a["history"]] == [h["val_loss"] for h in b["history"]]
    assert not [p.name for p in (tmp_path / "cut").iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]


SLOW_NET = """
import time, torch
from tilegrad.models import small_cnn

class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = small_cnn(width=4)
    def forward(self, x):
        time.sleep(0.03)  # unconditional: a branch on x would stop the geometry trace
        return self.net(x)

def build():
    return Slow()
"""


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_infer_killed_at_random_points_resumes_to_the_identical_output(tmp_path, seed):
    """SIGKILL at random moments (inside a tile, a journal write, the final rename: wherever it lands), then the same
    command with --resume when partial files exist; the result equals an uninterrupted run bit for bit."""
    (tmp_path / "slow.py").write_text(SLOW_NET)
    np.save(tmp_path / "in.npy", np.random.default_rng(seed).random((3, 256, 256), dtype=np.float32))
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }

    def command(out: Path, *extra: str) -> list[str]:
        model = f"{tmp_path / 'slow.py'}:build"
        return [sys.executable, "-m", "tilegrad", "infer", model, str(tmp_path / "in.npy"), str(out), "--tile", "64",
                "--no-progress", *extra]  # fmt: skip

    reference = subprocess.run(
        command(tmp_path / "ref.npy"), env=env, capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "cut.npy"
    rng = random.Random(seed)
    kills = 0
    for _ in range(3):
        resume = ["--resume"] if list(tmp_path.glob("cut.npy.partial*")) else []
        victim = subprocess.Popen(
            command(out, *resume), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        time.sleep(rng.uniform(1.0, 3.0))
        if victim.poll() is not None:
            assert victim.returncode == 0, victim.stderr.read()
            break
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
        victim.stderr.close()
        kills += 1
        if out.exists():  # killed after the final rename: the output is complete (checked below)
            break
    if not out.exists():
        resume = ["--resume"] if list(tmp_path.glob("cut.npy.partial*")) else []
        done = subprocess.run(command(out, *resume), env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    assert kills >= 1, "every run finished before it could be killed; make the model slower"
    np.testing.assert_array_equal(np.load(out), np.load(tmp_path / "ref.npy"))
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]  # NOTE [ Stale temporary files ]
