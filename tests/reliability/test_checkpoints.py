"""Checkpoints never run code (NOTE [ A checkpoint never runs code ] in models/resolve.py) and carry a checksum
(NOTE [ Checkpoint checksum ] in train/checkpoint.py)."""

from __future__ import annotations

import pytest

from tilegrad import CheckpointError
from tilegrad.train import load_checkpoint, predict
from tilegrad.train.checkpoint import save_checkpoint

from .conftest import one_error_line, run_cli


def _crafted(trained, tmp_path, model: str, kwargs: dict):
    """A valid checkpoint (checksum included) whose config names ``model(**kwargs)``: what an attacker can send."""
    state = load_checkpoint(trained / "run" / "checkpoint.pt")
    state["config"] = {**state["config"], "model": model, "model_kwargs": kwargs}
    return save_checkpoint(tmp_path / "crafted.pt", state)


def _image(trained):
    return trained / "img" / "s0.png"


@pytest.mark.parametrize("command", ["predict", "saliency", "infer"])
def test_a_crafted_checkpoint_runs_no_shell_command(trained, tmp_path, capsys, command):
    marker = tmp_path / "pwned"
    crafted = _crafted(trained, tmp_path, "subprocess:getoutput", {"cmd": f"touch {marker}"})
    argv = {
        "predict": ["predict", crafted, trained / "slides.csv", tmp_path / "p.csv", "--no-progress"],
        "saliency": ["saliency", crafted, _image(trained), tmp_path / "s.png"],
        "infer": ["infer", crafted, _image(trained), tmp_path / "f.npy", "--tile", "32", "--no-progress"],
    }[command]
    code, err = run_cli(capsys, *argv)
    assert not marker.exists(), "the checkpoint ran a shell command"
    line = one_error_line(err)
    assert code == 2 and "'subprocess:getoutput'" in line and "--trust-model-code" in line
    assert not any(p.name.startswith(("p.csv", "s.", "f.npy")) for p in tmp_path.iterdir())


def test_a_factory_file_named_by_a_checkpoint_needs_consent_and_runs_with_it(trained, tmp_path, capsys):
    factory = tmp_path / "net.py"
    marker = tmp_path / "imported"
    channels = load_checkpoint(trained / "run" / "checkpoint.pt")["model"]["head.fc.weight"].shape[1]
    factory.write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).touch()\n"
        "from tilegrad.models import small_cnn\n"
        "from tilegrad.train.model import PoolingHead\n"
        f"def build(**kw):\n    return small_cnn(**kw), PoolingHead({channels}, 2)\n"
    )
    crafted = _crafted(trained, tmp_path, f"{factory}:build", {"width": 4})
    code, err = run_cli(
        capsys, "predict", crafted, trained / "slides.csv", tmp_path / "p.csv", "--no-progress"
    )
    assert code == 2 and "--trust-model-code" in one_error_line(err) and not marker.exists()
    code, err = run_cli(
        capsys,
        "predict",
        crafted,
        trained / "slides.csv",
        tmp_path / "p.csv",
        "--no-progress",
        "--trust-model-code",
    )
    assert code == 0 and marker.exists() and (tmp_path / "p.csv").exists(), err


@pytest.mark.parametrize(
    "model, kwargs, trusted",
    [
        ("small_cnn", {"width": 4}, True),  # a tilegrad model by name
        ("resnet18", {}, True),  # a torchvision name
        ("torchvision.models:resnet18", {}, True),  # a known library, by module:name
        ("monai.networks.nets:DenseNet121", {"spatial_dims": 2}, True),
        ("os:system", {"command": "true"}, False),  # anything else
        ("torchvision.models:_private", {}, False),
        ("resnet18", {"weights": "/tmp/evil.pt"}, False),  # a known model asked to load a file
    ],
)
def test_which_specs_a_checkpoint_may_name(model, kwargs, trusted):
    from tilegrad.models.resolve import needs_trust

    assert (needs_trust(model, kwargs) is None) == trusted


def test_a_flipped_bit_is_found_by_the_checksum(trained, tmp_path, capsys):
    path = tmp_path / "flipped.pt"
    data = bytearray((trained / "run" / "checkpoint.pt").read_bytes())
    # flip one bit inside the largest stored tensor (the first conv's weights): torch.load itself does not notice
    import zipfile

    with zipfile.ZipFile(trained / "run" / "checkpoint.pt") as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged: its contents do not match the checksum"):
        load_checkpoint(path)
    code, err = run_cli(capsys, "predict", path, trained / "slides.csv", tmp_path / "p.csv", "--no-progress")
    assert code == 2 and str(path) in one_error_line(err) and "checksum" in err
    code, err = run_cli(
        capsys, "infer", path, _image(trained), tmp_path / "f.npy", "--tile", "32", "--no-progress"
    )
    assert code == 2 and "checksum" in one_error_line(err)


def test_an_intact_checkpoint_passes_its_checksum(trained, tmp_path):
    state = load_checkpoint(trained / "run" / "checkpoint.pt")
    assert len(state["checksum"]) == 64
    result = predict(
        trained / "run" / "checkpoint.pt", trained / "slides.csv", tmp_path / "p.csv", progress=False
    )
    assert result["probs"].shape == (6, 2)
