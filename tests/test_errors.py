"""One exception class per kind of mistake, at every public entry point (the rule in tilegrad/errors.py).

One table: each row calls an entry point with one misuse and names the class it must raise and a fragment of the
message. A configuration mistake (a value outside its choices, a missing partner option, an unknown name, a budget
that is not a byte count) is a ConfigError wherever it is made; the same misuse at two entry points gets the same
class and the same words.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import tilegrad
import tilegrad.io
from tilegrad import (
    CheckpointError,
    ConfigError,
    DataError,
    DiskFullError,
    GeometryError,
    LockedError,
    MemoryBudgetError,
    NotInvertibleError,
    NotStreamableError,
    ShapeError,
    heads,
)
from tilegrad.cli import build_parser


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).eval()


def _image() -> torch.Tensor:
    return torch.zeros(1, 3, 32, 32)


def _train_config(**overrides):
    from tilegrad.train import TrainConfig

    return TrainConfig(csv="slides.csv", model="small_cnn", **overrides)


def _exact_inferer(**options):
    from tilegrad.monai import ExactInferer

    return ExactInferer(**options)


def _scratch(directory, needed_bytes: int) -> None:
    from tilegrad.boundary import Scratch

    with Scratch(directory, needed_bytes):
        pass


def _cli(*argv: str) -> None:
    """Run a subcommand in-process and let its exception through (main() would turn it into exit code 2)."""
    args = build_parser().parse_args(list(argv))
    args.func(args)


def _locked(call):
    """``call(journal)`` while this process holds the journal's lock through another open file (flock conflicts)."""
    import tempfile

    from tilegrad._lock import FileLock

    journal = Path(tempfile.mkdtemp()) / "j.json"
    with FileLock(journal, what="inference journal"):
        return call(journal)


def _crafted() -> dict:
    """The settings of a training checkpoint naming code to run (never called: NOTE [ A checkpoint never runs code ])."""
    model = {
        "csv": "s.csv",
        "model": "subprocess:getoutput",
        "model_kwargs": {"cmd": "touch /tmp/tilegrad-pwned"},
    }
    return {"config": model, "num_classes": 2, "in_channels": 3}


# (id, call, class, fragment of the message)
CASES = [
    # ---- StreamingModule --------------------------------------------------------------------------------------
    ("stream-not-a-module", lambda: tilegrad.StreamingModule("trunk", 64), ConfigError, "wraps an nn.Module"),
    ("stream-tile-zero", lambda: tilegrad.StreamingModule(_net(), 0), ConfigError, "tile_size must hold positive"),
    ("stream-tile-word", lambda: tilegrad.StreamingModule(_net(), "big"), ConfigError, "tile_size must be an int"),
    ("stream-auto-no-budget", lambda: tilegrad.StreamingModule(_net(), "auto"), ConfigError, "needs memory_budget="),
    (
        "stream-bad-budget",
        lambda: tilegrad.StreamingModule(_net(), "auto", memory_budget="lots"),
        ConfigError,
        "cannot read 'lots' as a byte count",
    ),
    ("stream-mode", lambda: tilegrad.StreamingModule(_net(), 16, mode="fast"), ConfigError, "mode must be 'auto'"),
    (  # a valid tile that does not match the input is a shape mistake
        "stream-tile-rank",
        lambda: tilegrad.StreamingModule(_net(), (16, 16, 16))(_image()),
        ShapeError,
        "has 3 entries but the input has 2 spatial dims",
    ),
    (  # a tile too small for the receptive field is a geometry mistake
        "stream-tile-below-halo",
        lambda: tilegrad.StreamingModule(_net(), 2, mode="lean")(_image()),
        GeometryError,
        "use at least",
    ),
    (
        "stream-budget-too-small",
        lambda: tilegrad.StreamingModule(_net(), "auto", memory_budget=1000)(_image()),
        MemoryBudgetError,
        "no streaming plan fits the memory budget",
    ),
    (
        "stream-non-local",
        lambda: tilegrad.StreamingModule(nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1)), 16)(_image()),
        NotStreamableError,
        "AdaptiveAvgPool2d",
    ),
    # ---- plan_streaming ---------------------------------------------------------------------------------------
    (
        "plan-mode",
        lambda: tilegrad.plan_streaming(_net(), (1, 3, 32, 32), tile_size=16, mode="fast"),
        ConfigError,
        "mode must be 'auto'",
    ),
    (
        "plan-auto-no-budget",
        lambda: tilegrad.plan_streaming(_net(), (1, 3, 32, 32)),
        ConfigError,
        "needs memory_budget=",
    ),
    (
        "plan-bad-budget",
        lambda: tilegrad.plan_streaming(_net(), (1, 3, 32, 32), memory_budget="lots"),
        ConfigError,
        "cannot read 'lots' as a byte count",
    ),
    (
        "plan-tile-zero",
        lambda: tilegrad.plan_streaming(_net(), (1, 3, 32, 32), tile_size=0),
        ConfigError,
        "tile_size must hold positive",
    ),
    (
        "plan-batch-tiles",
        lambda: tilegrad.plan_streaming(_net(), (1, 3, 32, 32), tile_size=16, training=False, batch_tiles=0),
        ConfigError,
        "batch_tiles must be a positive int",
    ),
    (
        "plan-budget-too-small",
        lambda: tilegrad.plan_streaming(_net(), (1, 3, 64, 64), memory_budget="1KiB"),
        MemoryBudgetError,
        "no streaming plan fits the memory budget",
    ),
    # ---- infer ------------------------------------------------------------------------------------------------
    ("infer-no-tile-no-budget", lambda: tilegrad.infer(_net(), _image()), ConfigError, "tile_size= or memory_budget="),
    (
        "infer-batch-tiles",
        lambda: tilegrad.infer(_net(), _image(), tile_size=16, batch_tiles=0),
        ConfigError,
        "batch_tiles must be a positive int",
    ),
    (
        "infer-bad-budget",
        lambda: tilegrad.infer(_net(), _image(), memory_budget="lots"),
        ConfigError,
        "cannot read 'lots' as a byte count",
    ),
    ("infer-tile-zero", lambda: tilegrad.infer(_net(), _image(), tile_size=0), ConfigError, "tile_size must hold"),
    ("infer-source-rank", lambda: tilegrad.infer(_net(), torch.zeros(32, 32), tile_size=16), ShapeError, "(32, 32)"),
    # ---- estimate_memory, measure_peak_memory -----------------------------------------------------------------
    (
        "estimate-dtype",
        lambda: tilegrad.estimate_memory(_net(), (1, 3, 8, 8), dtype="float8"),
        ConfigError,
        "unknown dtype 'float8'",
    ),
    ("estimate-mode", lambda: tilegrad.estimate_memory(_net(), (1, 3, 8, 8), mode="fit"), ConfigError, "'train'"),
    ("estimate-device", lambda: tilegrad.estimate_memory(_net(), (1, 3, 8, 8), device="tpu"), ConfigError, "'cpu'"),
    (
        "estimate-optimizer",
        lambda: tilegrad.estimate_memory(_net(), (1, 3, 8, 8), optimizer="rmsprop"),
        ConfigError,
        "unknown optimizer 'rmsprop'",
    ),
    ("estimate-not-a-model", lambda: tilegrad.estimate_memory("net", (1, 3, 8, 8)), ConfigError, "torch.nn.Module"),
    ("estimate-shape", lambda: tilegrad.estimate_memory(_net(), (1, -3, 8)), ShapeError, "positive integers"),
    ("meter-device", lambda: tilegrad.PeakMemoryMeter("tpu"), ConfigError, "'cpu' or 'cuda'"),
    # ---- geometry, split, reversible, checkpointing, units ----------------------------------------------------
    ("receptive-field-ndim", lambda: tilegrad.receptive_field(_net(), ndim=4), ConfigError, "1, 2 or 3 spatial"),
    (
        "register-rule-not-callable",
        lambda: tilegrad.register_geometry_rule(nn.Conv2d, "same as conv"),
        ConfigError,
        "a geometry rule is a callable",
    ),
    (
        "split-at-unknown",
        lambda: tilegrad.split_model(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()), at="nope"),
        ConfigError,
        "expected the name of one of its children",
    ),
    (  # a family's split point is where its forward leaves the trunk
        "split-family-at",
        lambda: tilegrad.split_model(torchvision.models.mnasnet0_5(), at="layers.3"),
        ConfigError,
        "MNASNet is split after 'layers'",
    ),
    (
        "receptive-field-glu-width",
        lambda: tilegrad.receptive_field(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GLU())),
        NotStreamableError,
        "GLU splits dim -1",
    ),
    (
        "receptive-field-layer-norm-space",
        lambda: tilegrad.receptive_field(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(8))),
        NotStreamableError,
        "LayerNorm normalises over space",
    ),
    # ---- streamed heads (tilegrad.heads) ----------------------------------------------------------------------
    ("heads-pool-mode", lambda: heads.GlobalPool("min"), ConfigError, "mode must be 'max' or 'avg'"),
    ("heads-mil-features", lambda: heads.AttentionMIL(0), ConfigError, "in_features must be a positive int"),
    ("heads-mil-dropout", lambda: heads.AttentionMIL(4, dropout=1.0), ConfigError, "dropout must be in [0, 1)"),
    ("heads-pooled-input", lambda: heads.GlobalPool()(torch.zeros(2, 3)), ShapeError, "at least one spatial axis"),
    ("heads-mil-channels", lambda: heads.AttentionMIL(4)(_image()), ShapeError, "expects 4 channels"),
    (
        "heads-not-streamed",
        lambda: heads.streamed_head(nn.AdaptiveAvgPool2d(1)),
        NotStreamableError,
        "the head AdaptiveAvgPool2d is not one of the streamed reductions",
    ),
    (
        "reversible-threshold",
        lambda: tilegrad.ReversibleSequential(check_reconstruction=-1.0),
        ConfigError,
        "relative-error threshold",
    ),
    (
        "reversible-block",
        lambda: tilegrad.ReversibleSequential(nn.ReLU()),
        NotInvertibleError,
        "takes AdditiveCoupling blocks",
    ),
    (
        "coupling-split-dim",
        lambda: tilegrad.AdditiveCoupling(nn.Identity(), nn.Identity(), split_dim=7)(torch.zeros(1, 4, 2, 2)),
        ShapeError,
        "splits dim 7",
    ),
    ("checkpoint-not-sequential", lambda: tilegrad.checkpoint_sequential(nn.ReLU(), 1), ConfigError, "nn.Sequential"),
    ("checkpoint-segments", lambda: tilegrad.checkpoint_sequential(_net(), 9), ConfigError, "segments must be"),
    ("parse-bytes", lambda: tilegrad.parse_bytes("two gigs"), ConfigError, "cannot read 'two gigs' as a byte count"),
    ("parse-bytes-negative", lambda: tilegrad.parse_bytes(-1), ConfigError, "must be positive"),
    ("split-not-a-module", lambda: tilegrad.split_model(None), ConfigError, "split_model takes an nn.Module, received NoneType"),
    (
        "io-zero-size-image",
        lambda: tilegrad.io.open_image(np.zeros((3, 0, 5), np.float32)),
        ShapeError,
        "the array holds no pixels: its (C, *spatial) shape is (3, 0, 5)",
    ),
    ("parse-bytes-nan", lambda: tilegrad.parse_bytes(float("nan")), ConfigError, "must be positive and finite"),
    ("parse-bytes-inf", lambda: tilegrad.parse_bytes(float("inf")), ConfigError, "must be positive and finite"),
    ("parse-bytes-huge", lambda: tilegrad.parse_bytes("1e999GiB"), ConfigError, "must be positive and finite"),
    ("parse-bytes-under-a-byte", lambda: tilegrad.parse_bytes("0.5B"), ConfigError, "at least one byte"),
    # ---- shapes and dtypes handed to the public entry points -----------------------------------------------------
    (
        "plan-negative-shape",
        lambda: tilegrad.plan_streaming(_net(), (1, 3, -5, 64), memory_budget="1GiB"),
        ShapeError,
        "expected input_shape as positive integers (N, C, *spatial), e.g. (1, 3, 224, 224)",
    ),
    (
        "plan-shape-string",
        lambda: tilegrad.plan_streaming(_net(), "1,3,64,64", memory_budget="1GiB"),
        ShapeError,
        "received '1,3,64,64'",
    ),
    (
        "stream-empty-input",
        lambda: tilegrad.StreamingModule(_net(), tile_size=32)(torch.zeros(1, 3, 0, 64)),
        ShapeError,
        "received (1, 3, 0, 64)",
    ),
    (
        "stream-integer-input",
        lambda: tilegrad.StreamingModule(_net(), tile_size=32)(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)),
        DataError,
        "the input is a torch.uint8 tensor; the model computes in torch.float32: convert it first",
    ),
    (
        "infer-path-source",
        lambda: tilegrad.infer(_net().eval(), "/data/slide.tif", tile_size=32, progress=False),
        ConfigError,
        "infer reads arrays, received a path ('/data/slide.tif'): open the image first, e.g. tilegrad.io.open_image(",
    ),
    (
        "infer-none-source",
        lambda: tilegrad.infer(_net().eval(), None, tile_size=32, progress=False),
        ShapeError,
        "received NoneType",
    ),
    # ---- scratch directory of disk-tier boundary tensors (tilegrad/boundary.py), checked when a run starts ----
    ("scratch-missing", lambda: _scratch("/nonexistent-scratch", 2**30), ConfigError, "/nonexistent-scratch does not exist (this run needs 1.00 GiB"),
    ("scratch-a-file", lambda: _scratch(__file__, 2**30), ConfigError, "is not a directory"),
    ("scratch-too-small", lambda: _scratch(None, 2**62), DiskFullError, "4,611,686,018,427,387,904 bytes needed"),
    ("scratch-needed-bytes", lambda: _scratch(None, -1), ConfigError, "needed_bytes is a byte count"),
    # ---- io ---------------------------------------------------------------------------------------------------
    (
        "io-backend",
        lambda: tilegrad.io.open_image(np.zeros((1, 4, 4)), backend="magic"),
        ConfigError,
        "backend must be one of",
    ),
    ("io-writer-suffix", lambda: tilegrad.io.create_writer("out.png", (3, 4, 4)), ConfigError, "output format"),
    (
        "io-raw-order",
        lambda: __import__("tilegrad.io._rawfile", fromlist=["RawArrayFile"]).RawArrayFile("x", (2,), "u1", order="K"),
        ConfigError,
        "order must be 'C' or 'F'",
    ),
    # ---- training ---------------------------------------------------------------------------------------------
    ("train-optimizer", lambda: _train_config(optimizer="rmsprop").validate(), ConfigError, "optimizer must be"),
    ("train-dtype", lambda: _train_config(dtype="float16").validate(), ConfigError, "dtype must be"),
    ("train-tile", lambda: _train_config(tile_size=0).validate(), ConfigError, "tile_size must be"),
    ("train-budget", lambda: _train_config(budget="lots").validate(), ConfigError, "cannot read 'lots'"),
    ("train-head", lambda: _train_config(head="mean").validate(), ConfigError, "head must be 'max', 'avg' or 'attention'"),
    (
        "train-head-kwargs",
        lambda: __import__("tilegrad.train", fromlist=["x"]).build_model("small_cnn", 2, head="max", head_kwargs={"hidden": 8}),
        ConfigError,
        "takes no --head-kwargs",
    ),
    (
        "train-model",
        lambda: __import__("tilegrad.train", fromlist=["build_model"]).build_model("resnet7", 2),
        ConfigError,
        "unknown model 'resnet7'",
    ),
    (
        "demo-factor",
        lambda: __import__("tilegrad.train.demo", fromlist=["x"]).make_demo_slides(
            "/nonexistent-demo", __import__("tilegrad.train.demo", fromlist=["x"]).DemoSettings(factor=3)
        ),
        ConfigError,
        "power of 2",
    ),
    # ---- reliability (issue 13; tests/reliability replays each through the command line) ----------------------
    ("infer-journal-locked", lambda: _locked(lambda j: tilegrad.infer(_net(), _image(), tile_size=16, progress=False, journal=j)), LockedError, "is writing the inference journal"),
    ("trained-model-untrusted", lambda: __import__("tilegrad.train", fromlist=["x"]).load_trained_model(_crafted()), CheckpointError, "--trust-model-code"),
    ("predict-exists", lambda: __import__("tilegrad.train", fromlist=["x"]).predict("c.pt", "s.csv", __file__), ConfigError, "already exists: pass --overwrite"),
    ("saliency-max-side", lambda: __import__("tilegrad.train.saliency", fromlist=["x"]).saliency("c.pt", "i.png", "o.png", max_side=0), ConfigError, "max_side) must be a positive"),
    # ---- command line (the same classes: main() prints them as "tilegrad CMD: error: ...", exit code 2) -------
    ("cli-memory-budget", lambda: _cli("memory", "small_cnn", "--input", "3x64x64", "--budget", "lots"), ConfigError, "'lots'"),
    ("cli-memory-input", lambda: _cli("memory", "small_cnn", "--input", "3x6xabc"), ConfigError, "cannot read --input"),
    ("cli-memory-model", lambda: _cli("memory", "resnet81", "--input", "3x64x64"), ConfigError, "unknown model"),
    ("cli-plan-budget", lambda: _cli("plan", "small_cnn", "--input", "3x64x64", "--budget", "lots"), ConfigError, "'lots'"),
    ("cli-plan-model", lambda: _cli("plan", "nosuchpkg.mod:f", "--input", "3x64x64", "--tile", "32"), ConfigError, "cannot import"),
    (
        "cli-train-budget",
        lambda: _cli("train", "slides.csv", "--out", "/nonexistent-run", "--model", "small_cnn", "--budget", "lots"),
        ConfigError,
        "cannot read 'lots'",
    ),
    (
        "cli-train-kwargs",
        lambda: _cli("train", "slides.csv", "--out", "/nonexistent-run", "--model-kwargs", "[1]"),
        ConfigError,
        "--model-kwargs must be a JSON object",
    ),
    (
        "cli-train-head-kwargs",
        lambda: _cli("train", "slides.csv", "--out", "/nonexistent-run", "--head", "attention", "--head-kwargs", "8"),
        ConfigError,
        "--head-kwargs must be a JSON object",
    ),
    (
        "cli-saliency-attention-target",
        lambda: _cli("saliency", "run.pt", "slide.tiff", "out.png", "--attention", "--target", "1"),
        ConfigError,
        "Leave out --target with --attention",
    ),
    ("cli-demo-size", lambda: _cli("demo", "--size", "4096"), ConfigError, "--size sets the slides of --gigapixel"),
    ("cli-demo-gigapixel-size", lambda: _cli("demo", "--gigapixel", "--size", "1000"), ConfigError, "--size must be a positive multiple of 1024"),
    ("cli-infer-batch-tiles", lambda: _cli("infer", "small_cnn", "in.npy", "/nonexistent/out.npy", "--tile", "32", "--batch-tiles", "0"), ConfigError, "--batch-tiles"),
    # ---- tilegrad.monai.ExactInferer (MONAI's inferer interface over infer) -----------------------------------
    ("monai-no-size", lambda: _exact_inferer(), ConfigError, "needs memory_budget= (e.g."),
    ("monai-bad-budget", lambda: _exact_inferer(memory_budget="lots"), ConfigError, "cannot read 'lots' as a byte count"),
    ("monai-tile-zero", lambda: _exact_inferer(tile_size=0), ConfigError, "tile_size must hold positive"),
    ("monai-tile-auto", lambda: _exact_inferer(tile_size="auto", memory_budget="1GiB"), ConfigError, "'auto' is not needed"),
    ("monai-batch-tiles", lambda: _exact_inferer(tile_size=32, batch_tiles=0), ConfigError, "batch_tiles must be a positive int"),
    ("monai-lambda-network", lambda: _exact_inferer(tile_size=32)(_image(), lambda x: x), ConfigError, "needs the network as a torch.nn.Module"),
    ("monai-train-mode", lambda: _exact_inferer(tile_size=32)(_image(), _net().train()), ConfigError, "needs Sequential in eval mode"),
    ("monai-extra-args", lambda: _exact_inferer(tile_size=32)(_image(), _net(), None, flag=True), ConfigError, "received ['NoneType', 'flag']"),
    ("monai-not-a-tensor", lambda: _exact_inferer(tile_size=32)(np.zeros((1, 3, 32, 32)), _net()), ConfigError, "takes a tensor batch"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_misuse_raises_its_class_with_a_message(call, error, fragment):
    with pytest.raises(tilegrad.TilegradError) as info:
        call()
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert fragment in str(info.value)


def test_the_command_line_says_the_same(capsys, tmp_path):
    # main() turns the exception into one line on stderr and exit code 2
    code = tilegrad.cli.main(["plan", "small_cnn", "--input", "3x64x64", "--budget", "lots"])
    assert code == 2 and "tilegrad plan: error: cannot read 'lots' as a byte count" in capsys.readouterr().err


def test_infer_command_with_an_unreadable_budget(tmp_path):
    # the budget is read by tilegrad.infer itself, after the input is opened: one more row that needs a file
    np.save(tmp_path / "in.npy", np.zeros((3, 32, 32), np.float32))
    with pytest.raises(ConfigError, match="cannot read 'lots' as a byte count"):
        _cli("infer", "small_cnn", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), "--budget", "lots")


@pytest.mark.parametrize("budget", [64 * 2**20, "64MiB", "64 MiB", 64.0 * 2**20])
def test_every_entry_point_takes_budgets_as_bytes_or_strings(budget):
    plan = tilegrad.plan_streaming(_net(), (1, 3, 64, 64), memory_budget=budget)
    assert plan.budget == 64 * 2**20
    streamed = tilegrad.StreamingModule(_net(), "auto", memory_budget=budget)
    assert streamed.memory_budget == 64 * 2**20 and streamed.plan((1, 3, 64, 64)).budget == 64 * 2**20
    with torch.no_grad():
        out = tilegrad.infer(_net(), torch.zeros(3, 64, 64), memory_budget=budget, progress=False)
    assert out.shape == (2, 64, 64)


# Public names that take no option a user could get wrong, or are data (results, exceptions, the version).
NOT_IN_THE_TABLE = {
    "MemoryReport": "a result",
    "Plan": "a result",
    "ReceptiveField": "a result",
    "ReconstructionWarning": "a warning",
    "format_bytes": "formats any number",
    "measure_peak_memory": "runs a callable; its device errors are tests/memory/test_measure.py's",
    "__version__": "a string",
}
COVERED = {
    "StreamingModule": "stream-",
    "plan_streaming": "plan-",
    "infer": "infer-",
    "estimate_memory": "estimate-",
    "PeakMemoryMeter": "meter-",
    "receptive_field": "receptive-field-",
    "register_geometry_rule": "register-rule-",
    "split_model": "split-",
    "ReversibleSequential": "reversible-",
    "AdditiveCoupling": "coupling-",
    "checkpoint_sequential": "checkpoint-",
    "parse_bytes": "parse-bytes",
}


def test_the_table_walks_every_public_entry_point():
    ids = [c[0] for c in CASES]
    for name in tilegrad.__all__:
        obj = getattr(tilegrad, name)
        if (inspect.isclass(obj) and issubclass(obj, BaseException)) or name in NOT_IN_THE_TABLE:
            continue
        assert name in COVERED, f"tilegrad.{name} has no row in CASES (or a reason in NOT_IN_THE_TABLE)"
        assert any(i.startswith(COVERED[name]) for i in ids), name
    subcommands = {"memory", "plan", "infer", "train"}
    assert all(any(i.startswith(f"cli-{s}") for i in ids) for s in subcommands)
    assert Path(tilegrad.__file__).exists()
