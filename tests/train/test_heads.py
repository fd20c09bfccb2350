"""Heads of the slide classifier (tilegrad train --head max|avg|attention): checkpoints record the head, old ones
(with ``pool``) still load and resume; attention maps through the streamed trunk equal the plain computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tilegrad import CheckpointError, ConfigError
from tilegrad.cli import build_parser, main
from tilegrad.heads import AttentionMIL, streamed_head
from tilegrad.train import PoolingHead, TrainConfig, build_model, load_trained_model
from tilegrad.train.config import check_resumable, config_dict, config_from_dict
from tilegrad.train.dataset import SlideInput
from tilegrad.train.saliency import _streamed_attention, attention_map

from .conftest import SMALL


@pytest.mark.parametrize("head", ["max", "avg", "attention"])
def test_build_model_heads_are_streamed_heads(head):
    model = build_model("small_cnn", 3, model_kwargs={"width": 4}, head=head, head_kwargs={})
    assert streamed_head(model.head) is model.head
    assert isinstance(model.head, AttentionMIL if head == "attention" else PoolingHead)
    assert model(torch.rand(2, 3, 48, 40)).shape == (2, 3)


def test_pooling_head_state_dict_keys_are_unchanged():
    """Checkpoints written before the heads module hold head.fc.weight and head.fc.bias only."""
    assert sorted(PoolingHead(8, 2, pool="avg").state_dict()) == ["fc.bias", "fc.weight"]


def test_attention_head_kwargs_reach_the_head():
    model = build_model(
        "small_cnn", 2, model_kwargs={"width": 4}, head="attention", head_kwargs={"hidden": 5}
    )
    assert model.head.attention_v.out_features == 5
    with pytest.raises(ConfigError, match="take hidden, gated and dropout"):
        build_model("small_cnn", 2, model_kwargs={"width": 4}, head="attention", head_kwargs={"width": 5})


def test_config_of_an_old_checkpoint_with_pool_becomes_head():
    old = {k: v for k, v in config_dict(TrainConfig(csv="s.csv")).items() if k not in ("head", "head_kwargs")}
    old["pool"] = "avg"
    config = config_from_dict(old)
    assert config.head == "avg" and config.head_kwargs == {}
    check_resumable(old, TrainConfig(csv="s.csv", head="avg"))  # resuming an old run with the same pooling
    with pytest.raises(CheckpointError, match="head: checkpoint 'avg', now 'max'"):
        check_resumable(old, TrainConfig(csv="s.csv", head="max"))


def test_old_pool_option_still_parses_as_head():
    args = build_parser().parse_args(["train", "s.csv", "--out", "r", "--pool", "avg"])
    assert args.head == "avg"
    assert build_parser().parse_args(["train", "s.csv", "--out", "r"]).head == "max"


def test_streamed_attention_map_equals_the_plain_one_float64():
    torch.manual_seed(0)
    streamed = build_model("small_cnn", 2, model_kwargs={"width": 4}, head="attention", tile_size=64).double()
    plain = build_model("small_cnn", 2, model_kwargs={"width": 4}, head="attention").double()
    plain.load_state_dict(streamed.state_dict())
    pixels = np.random.default_rng(0).integers(0, 256, (3, 150, 131), dtype=np.uint8)
    weights, probs = attention_map(streamed, SlideInput(pixels, dtype=torch.float64))
    _, partials = _streamed_attention(streamed, streamed.head, SlideInput(pixels, dtype=torch.float64))
    assert len(partials) > 4, "really tiled"
    x = torch.from_numpy(SlideInput(pixels, dtype=torch.float64)[:])
    with torch.no_grad():
        features = plain.trunk(x)
        expected = torch.softmax(plain.head.logits(features).flatten(), 0).reshape(features.shape[2:])
        expected_probs = torch.softmax(plain.head(features), 1)[0]
    np.testing.assert_allclose(weights, expected.numpy(), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(probs, expected_probs.numpy(), rtol=1e-10)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_attention_map_refuses_a_pooling_model():
    model = build_model("small_cnn", 2, model_kwargs={"width": 4}, head="max")
    with pytest.raises(ConfigError, match="tilegrad train --head attention"):
        attention_map(model, torch.rand(1, 3, 32, 32))


def test_train_attention_then_attention_saliency(tmp_path, make_slides, capsys):
    from tilegrad.io import open_image

    slides = make_slides(tmp_path / "data", n=4, n_val=1, size=(96, 80))
    out = tmp_path / "run"
    argv = ["train", str(slides), "--out", str(out), "--epochs", "1", "--head", "attention"]
    assert main([*argv, "--head-kwargs", '{"hidden": 8}', *SMALL]) == 0
    model, config = load_trained_model(out / "checkpoint.pt", device="cpu")
    assert config.head == "attention" and config.head_kwargs == {"hidden": 8}
    assert isinstance(model.head, AttentionMIL) and model.head.attention_v.out_features == 8
    capsys.readouterr()
    png = tmp_path / "att.png"
    image = slides.parent / "img" / "s1.png"
    argv = ["saliency", str(out / "checkpoint.pt"), str(image), str(png), "--attention", "--device", "cpu"]
    assert main(argv) == 2  # the training tile (32) is too small for one segment holding the whole halo
    assert "Pass --tile or --budget to tilegrad saliency" in capsys.readouterr().err
    assert main([*argv, "--tile", "64"]) == 0
    printed = capsys.readouterr().out
    assert "1 value per 16x16 px, summing to 1" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = np.load(png.with_suffix(".npy"))
    assert weights.shape == (6, 5) and weights.dtype == np.float32  # 96 x 80 at the trunk's stride 16
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(np.asarray(open_image(png.with_suffix(".tiff"))[:])[0], weights)
    # a checkpoint without an attention head: refused by name, with the alternative
    pooled = tmp_path / "pooled"
    assert main(["train", str(slides), "--out", str(pooled), "--epochs", "1", *SMALL]) == 0
    capsys.readouterr()
    other = tmp_path / "pooled.png"
    assert main(["saliency", str(pooled / "checkpoint.pt"), str(image), str(other), "--attention"]) == 2
    assert (
        "trained with --head max: --attention needs a model trained with --head attention"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("head", ["max", "avg", "attention"])
def test_streamed_model_reduces_its_head_in_the_engine_exactly(head):
    """A streamed head runs inside StreamingModule (the trunk output never whole): output, input gradient and
    every parameter gradient equal head(trunk(x)) in float64."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 2, model_kwargs={"width": 4}, head=head, tile_size=64).double()
    assert model.streams_head and model.streamed.head is model.head
    plain = build_model("small_cnn", 2, model_kwargs={"width": 4}, head=head).double()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 150, 131, dtype=torch.float64)
    leaf, ref_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = model(leaf), plain.head(plain.trunk(ref_leaf))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad = torch.tensor([[0.3, -1.1]], dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-13)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=name)
    assert len(model.streamed.last_plan.segments[0].grid) > 4, "really streamed"
