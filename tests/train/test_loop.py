"""The training loop: a 2-epoch run, exact resume after an interruption, checkpoints, precision, prediction."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch

from tilegrad import CheckpointError, ConfigError, DataError
from tilegrad.train import TrainConfig, build_model, load_checkpoint, predict, train
from tilegrad.train.checkpoint import save_checkpoint

from .conftest import write_damaged_tiff


def config(csv_path, out, **overrides):
    settings = dict(
        csv=str(csv_path),
        out=str(out),
        model="small_cnn",
        model_kwargs={"width": 4},
        tile_size=32,
        epochs=2,
        lr=1e-2,
        optimizer="adam",
        schedule="cosine",
        seed=3,
        progress=False,
        device="cpu",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_two_epoch_run_trains_logs_and_checkpoints(slides, tmp_path):
    before = build_model("small_cnn", 2, model_kwargs={"width": 4}).state_dict()
    result = train(config(slides, tmp_path / "run"))
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.global_step == 8  # 4 training slides, 1 per step, 2 epochs
    for h in result.history:
        assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"])
        assert 0.0 <= h["val_auc"] <= 1.0
    # every parameter moved, trunk included
    after = result.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    with open(tmp_path / "run" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "val_auc", "lr", "seconds", "steps", "skipped"}
    # the checkpoint holds only tensors and plain containers: it loads with weights_only=True
    raw = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert raw["epoch"] == 2 and raw["step_in_epoch"] == 0
    assert {"model", "optimizer", "scheduler", "rng", "config", "history"} <= raw.keys()
    assert {"torch", "cuda", "numpy", "python"} == raw["rng"].keys()
    assert_same_state(raw["model"], after)
    assert (tmp_path / "run" / "best.pt").exists()


class Interrupt(Exception):
    pass


def interrupt_at(step):
    def on_step(info):
        if info.global_step == step:
            raise Interrupt

    return on_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, make_slides):
    """One uninterrupted 3-epoch run, shared by the resume cases."""
    root = tmp_path_factory.mktemp("reference")
    csv_path = make_slides(root)
    return csv_path, train(config(csv_path, root / "ref", accumulate=2, epochs=3))


@pytest.mark.parametrize(
    "save_every, stop_at",
    [
        (1, 3),  # killed right after a mid-epoch checkpoint
        (3, 5),  # killed two steps after a mid-epoch checkpoint (in the third epoch): steps 4-5 are redone
        (0, 6),  # only end-of-epoch checkpoints: the third epoch is redone from its start
        (0, 1),  # killed before any checkpoint: the run starts over
    ],
)
def test_resume_after_interruption_equals_uninterrupted_run_bit_for_bit(
    uninterrupted, tmp_path, save_every, stop_at
):
    slides, reference = uninterrupted
    with pytest.raises(Interrupt):
        train(
            config(slides, tmp_path / "cut", accumulate=2, epochs=3, save_every=save_every),
            on_step=interrupt_at(stop_at),
        )
    resumed = train(
        config(slides, tmp_path / "cut", accumulate=2, epochs=3, save_every=save_every), resume=True
    )
    assert resumed.global_step == reference.global_step == 6
    assert_same_state(reference.model.state_dict(), resumed.model.state_dict())
    ref_ckpt = load_checkpoint(reference.checkpoint)
    cut_ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for a, b in zip(ref_ckpt["optimizer"]["state"].values(), cut_ckpt["optimizer"]["state"].values()):
        assert_same_state(a, b)
    assert ref_ckpt["scheduler"] == cut_ckpt["scheduler"]
    assert [h["val_loss"] for h in ref_ckpt["history"]] == [h["val_loss"] for h in cut_ckpt["history"]]
    assert [h["train_loss"] for h in ref_ckpt["history"]] == [h["train_loss"] for h in cut_ckpt["history"]]


def test_resume_can_extend_epochs_but_not_change_settings(slides, tmp_path):
    train(config(slides, tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(config(slides, tmp_path / "run", epochs=1))
    with pytest.raises(CheckpointError, match=r"lr: checkpoint 0.01, now 0.02"):
        train(config(slides, tmp_path / "run", epochs=2, lr=2e-2), resume=True)
    longer = train(config(slides, tmp_path / "run", epochs=2), resume=True)
    assert [h["epoch"] for h in longer.history] == [1, 2]


def test_resume_without_checkpoint_starts_fresh(slides, tmp_path):
    result = train(config(slides, tmp_path / "new", epochs=1), resume=True)
    assert result.global_step == 4


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a checkpoint"])
def test_corrupt_checkpoint_raises_checkpoint_error(slides, tmp_path, damage):
    train(config(slides, tmp_path / "run", epochs=1))
    path = tmp_path / "run" / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    else:
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        train(config(slides, tmp_path / "run", epochs=2), resume=True)


def test_atomic_write_leaves_previous_checkpoint_when_writing_fails(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", {"epoch": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("tilegrad._atomic.os.replace", broken_replace)  # the one atomic-replace helper
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_bf16_autocast_still_trains_the_streamed_layers(slides, tmp_path):
    model = build_model("small_cnn", 2, model_kwargs={"width": 4}, tile_size=32)
    x = torch.rand(1, 3, 48, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    result = train(config(slides, tmp_path / "amp", epochs=1, amp="bf16"))
    assert math.isfinite(result.history[0]["train_loss"])


def test_unsupported_precision_combination_is_refused(slides, tmp_path):
    with pytest.raises(ConfigError, match="needs float32"):
        train(config(slides, tmp_path / "x", amp="bf16", dtype="float64"))


def test_predict_writes_probabilities_per_slide(slides, tmp_path):
    result = train(config(slides, tmp_path / "run", epochs=1))
    out = tmp_path / "pred.csv"
    pred = predict(tmp_path / "run" / "checkpoint.pt", slides, out, progress=False)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [f"img/s{i}.png" for i in range(6)]
    assert [int(r["label"]) for r in rows] == [0, 1, 0, 1, 0, 1]
    probs = [float(r["probability"]) for r in rows]
    assert all(0 <= p <= 1 for p in probs)
    # the same numbers as the model in memory
    with torch.no_grad():
        from tilegrad.train.dataset import SlideInput, open_slide

        x = SlideInput(open_slide(slides.parent / "img" / "s1.png"))
        direct = torch.softmax(result.model.eval()(x), 1)[0, 1].item()
    assert probs[1] == pytest.approx(direct, rel=1e-5)
    assert pred["probs"].shape == (6, 2)


# Regression (issue 6 review): the scheduler state saved T_max, so a 3-epoch cosine run resumed with --epochs 4 ran
# its fourth epoch at lr 0 (0.01, 0.0075, 0.0025, 0).
@pytest.mark.parametrize(
    "schedule, epochs, longer, factors",
    [
        # cosine: the fourth epoch at the 4-epoch schedule's rate (1 + cos(3 pi / 4)) / 2
        ("cosine", 3, 4, [1.0, 0.75, 0.25, (1 + math.cos(3 * math.pi / 4)) / 2]),
        # step (x0.1 every epochs // 3 epochs): epochs 4-6 at the 6-epoch schedule's rates (step size 2)
        ("step", 3, 6, [1.0, 0.1, 0.01, 0.1, 0.01, 0.01]),
    ],
)
def test_resume_with_more_epochs_follows_the_schedule_of_the_new_length(
    slides, tmp_path, schedule, epochs, longer, factors
):
    train(config(slides, tmp_path / "run", epochs=epochs, schedule=schedule))
    train(config(slides, tmp_path / "run", epochs=longer, schedule=schedule), resume=True)
    with open(tmp_path / "run" / "log.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == pytest.approx([1e-2 * f for f in factors], rel=1e-5)


def test_resume_with_the_same_epochs_keeps_the_learning_rate_bit_for_bit(slides, tmp_path):
    with pytest.raises(Interrupt):
        train(config(slides, tmp_path / "cut", epochs=3, save_every=1), on_step=interrupt_at(6))
    resumed = train(config(slides, tmp_path / "cut", epochs=3, save_every=1), resume=True)
    reference = train(config(slides, tmp_path / "ref", epochs=3))
    assert [h["lr"] for h in resumed.history] == [h["lr"] for h in reference.history]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, make_slides):
    """An uninterrupted 2-epoch run whose second epoch lowers the validation loss (so it rewrites best.pt)."""
    root = tmp_path_factory.mktemp("two_epochs")
    csv_path = make_slides(root)
    result = train(config(csv_path, root / "ref", epochs=2))
    assert load_checkpoint(root / "ref" / "best.pt")["epoch"] == 2, "precondition: epoch 2 improves"
    return csv_path, result


def _log_rows(path):
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.parametrize("killed_after", ["best.pt", "log.csv", "checkpoint.pt"])
def test_killed_between_the_epoch_end_writes_resume_completes_log_and_best(
    two_epochs, tmp_path, monkeypatch, killed_after
):
    """Each window between the files written at the end of epoch 2, simulated by raising right after one write."""
    from tilegrad.train import loop

    slides, reference = two_epochs
    real_save, real_log = loop.save_checkpoint, loop._write_log

    def save(path, state):
        written = real_save(path, state)
        if path.name == killed_after and state["epoch"] == 2:
            raise Interrupt
        return written

    def write_log(path, history):
        real_log(path, history)
        if killed_after == "log.csv" and len(history) == 2:
            raise Interrupt

    monkeypatch.setattr(loop, "save_checkpoint", save)
    monkeypatch.setattr(loop, "_write_log", write_log)
    with pytest.raises(Interrupt):
        train(config(slides, tmp_path / "cut", epochs=2))
    monkeypatch.undo()
    train(config(slides, tmp_path / "cut", epochs=2), resume=True)

    assert _log_rows(tmp_path / "cut" / "log.csv") == _log_rows(reference.out / "log.csv")
    best, ref_best = load_checkpoint(tmp_path / "cut" / "best.pt"), load_checkpoint(reference.out / "best.pt")
    assert best["epoch"] == ref_best["epoch"] == 2
    assert_same_state(best["model"], ref_best["model"])
    assert_same_state(
        load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["model"], reference.model.state_dict()
    )


def test_without_validation_slides_best_pt_is_the_last_epoch(tmp_path, make_slides, capsys):
    slides = make_slides(tmp_path, n_val=0)
    result = train(config(slides, tmp_path / "run", epochs=2))
    assert "best.pt holds the last epoch's model" in capsys.readouterr().out
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == 2
    assert_same_state(best["model"], result.model.state_dict())
    predict(tmp_path / "run" / "best.pt", slides, tmp_path / "pred.csv", progress=False)
    assert (tmp_path / "pred.csv").exists()


# Regression (issue 6 review): a damaged tile surfaced mid-training as "<path>: cannot decode ..." without the row.
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "unstreamed"])
def test_damaged_tile_found_during_training_names_the_csv_row(slides, tmp_path, stream):
    write_damaged_tiff(slides.parent / "img" / "damaged.tif")
    slides.write_text(slides.read_text().replace("img/s3.png,1,train", "img/damaged.tif,1,train"))  # line 5
    run = config(slides, tmp_path / "run", epochs=1, tile_size=32 if stream else None)
    with pytest.raises(
        DataError, match=r"^slides\.csv line 5: .*damaged\.tif: cannot decode image data"
    ) as info:
        train(run)
    assert "--check-images" in str(info.value)
    run.check_images = True  # the full decode finds it before any training
    with pytest.raises(DataError, match=r"^slides\.csv line 5: image 'img/damaged\.tif' cannot be decoded"):
        train(dataclasses.replace(run, out=str(tmp_path / "checked")))
    assert not (tmp_path / "checked").exists()


def test_damaged_tile_found_during_prediction_names_the_csv_row(slides, tmp_path):
    train(config(slides, tmp_path / "run", epochs=1))
    write_damaged_tiff(tmp_path / "damaged.tif")
    (tmp_path / "test.csv").write_text("image\nimg/s0.png\ndamaged.tif\n")
    with pytest.raises(DataError, match=r"^test\.csv line 3: .*damaged\.tif: cannot decode image data"):
        predict(
            tmp_path / "run" / "checkpoint.pt", tmp_path / "test.csv", tmp_path / "pred.csv", progress=False
        )
    assert not (tmp_path / "pred.csv").exists()


BN_NET = """
from torch import nn

def net(in_channels=3):
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
    )
"""


# Issue 12: normalisation in training mode is streamed exactly, so an unfrozen run trains as the conventional one.
def test_unfrozen_normalisation_trains_streamed_as_on_the_whole_image(slides, tmp_path):
    factory = tmp_path / "bn_net.py"
    factory.write_text(BN_NET)
    # SGD: the bias of a convolution followed by BatchNorm has a gradient of zero up to rounding (1e-17), which
    # Adam would normalise into full-size steps of either sign
    common = dict(
        model=f"{factory}:net", model_kwargs={}, freeze_norm=False, dtype="float64", epochs=1, optimizer="sgd"
    )
    streamed = train(config(slides, tmp_path / "streamed", tile_size=24, **common))
    whole = train(config(slides, tmp_path / "whole", tile_size=None, **common))
    assert streamed.model.is_streamed and not whole.model.is_streamed
    a, b = streamed.model.state_dict(), whole.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12, msg=key)
    initial = build_model(f"{factory}:net", 2, model_kwargs={}).state_dict()
    assert not torch.equal(a["trunk.1.running_var"], initial["trunk.1.running_var"])  # statistics trained
    assert streamed.history[0]["train_loss"] == pytest.approx(whole.history[0]["train_loss"], rel=1e-10)
