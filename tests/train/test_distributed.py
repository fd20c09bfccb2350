"""Data-parallel training with torchrun on CPU (gloo) equals one process over the same slides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tilegrad
from tilegrad.train import TrainConfig, load_checkpoint, train
from tilegrad.train.distributed import step_shard

SRC = str(Path(tilegrad.__file__).resolve().parents[1])


def test_step_shard_covers_every_slide_once():
    step = [9, 4, 7, 1, 3]
    shards = [step_shard(step, r, 3) for r in range(3)]
    assert sorted(i for s in shards for i in s) == sorted(step)
    assert shards == [[9, 1], [4, 3], [7]]


def test_two_processes_equal_one_process(tmp_path, make_slides):
    # 7 training slides: 4 optimizer steps of 2 slides, the last one partial (rank 1 idles, contributes zero)
    csv_path = make_slides(tmp_path, n=9, n_val=2)
    common = [
        "--model",
        "small_cnn",
        "--model-kwargs",
        '{"width": 4}',
        "--tile",
        "32",
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--optimizer",
        "adam",
        "--dtype",
        "float64",
        "--seed",
        "5",
        "--no-progress",
        "--device",
        "cpu",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tilegrad",
        "train",
        str(csv_path),
        "--out",
        str(tmp_path / "ddp"),
        "--accumulate",
        "1",
        *common,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    single = train(
        TrainConfig(
            csv=str(csv_path),
            out=str(tmp_path / "single"),
            model="small_cnn",
            model_kwargs={"width": 4},
            tile_size=32,
            epochs=2,
            lr=0.01,
            optimizer="adam",
            dtype="float64",
            seed=5,
            progress=False,
            device="cpu",
            accumulate=2,
        )
    )
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert ddp["global_step"] == single.global_step == 8
    # one all-reduce per optimizer step (not per slide, not per tile)
    assert ddp["allreduce_calls"] == 8
    reference = single.model.state_dict()
    for key, value in ddp["model"].items():
        torch.testing.assert_close(value, reference[key], rtol=1e-10, atol=1e-12, msg=key)
    # validation is sharded across the two processes and gathered: same metrics
    for a, b in zip(ddp["history"], single.history):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
