"""A training process killed with SIGKILL mid-run, then resumed, ends bit-for-bit where an uninterrupted run does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
