"""Training checkpoints: written atomically, loadable with ``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors and plain containers (dict, list, str, int, float, bool, None) -- nothing that
needs unpickling of arbitrary classes -- so it loads with ``weights_only=True``. It holds the model, optimizer,
scheduler and grad-scaler states, the position in the run (epoch, optimizer steps done in that epoch), the history
of finished epochs, the run's configuration and the random number generator states of torch (CPU and every CUDA
device), numpy and Python.

NOTE [ Atomic checkpoints ]: the file is written to a temporary name in the same directory, flushed to disk, then
renamed over the old one with ``os.replace`` (atomic on POSIX). A process killed at any moment therefore leaves
either the previous complete checkpoint or the new complete one, never a torn file. A checkpoint's lock
(tilegrad/_lock.py) is held by the training run that writes it, and temporary files of killed writers are removed
by the next write (NOTE [ Stale temporary files ] in _atomic.py).

NOTE [ Checkpoint checksum ]: every checkpoint carries ``checksum``, the sha256 of its contents (every tensor's
dtype, shape and bytes, every other value's repr, in key order; :func:`state_checksum`), checked by
:func:`load_checkpoint`. torch.load does not check the bytes of tensors, so a bit flipped on disk or in a copy
would otherwise load silently as a slightly different model. Checkpoints written before the checksum existed
load without the check.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_write
from ..errors import CheckpointError

__all__ = [
    "FORMAT",
    "get_rng_state",
    "load_checkpoint",
    "load_torch_file",
    "save_checkpoint",
    "set_rng_state",
    "state_checksum",
    "verify_checksum",
]

FORMAT = "tilegrad.train/1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus a format tag) to ``path`` atomically; see NOTE [ Atomic checkpoints ].

    >>> import tempfile
    >>> p = save_checkpoint(Path(tempfile.mkdtemp()) / "c.pt", {"epoch": 3, "w": torch.ones(2)})
    >>> load_checkpoint(p)["epoch"]
    3
    """
    state = {"format": FORMAT, **{k: v for k, v in state.items() if k != "checksum"}}
    buffer = io.BytesIO()
    torch.save({**state, "checksum": state_checksum(state)}, buffer)
    return atomic_write(path, buffer.getvalue(), durable=True)


def state_checksum(state: Any) -> str:
    """sha256 of a checkpoint's contents (NOTE [ Checkpoint checksum ]), independent of how torch lays out the file.

    >>> a = {"w": torch.ones(2), "step": 3}
    >>> state_checksum(a) == state_checksum({"step": 3, "w": torch.ones(2)}) != state_checksum({**a, "step": 4})
    True
    """
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode() + b":")
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
            digest.update(b",")
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())


def verify_checksum(state: dict[str, Any], path: str | Path) -> None:
    """Raise :class:`~tilegrad.CheckpointError` when ``state`` (loaded from ``path``) disagrees with its checksum."""
    stored = state.get("checksum")
    if stored is None:  # written before NOTE [ Checkpoint checksum ]
        return
    found = state_checksum({k: v for k, v in state.items() if k != "checksum"})
    if found != stored:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: its contents do not match the checksum stored in it (sha256 "
            f"{found[:12]}..., stored {str(stored)[:12]}...), e.g. a bit flipped on disk or in a copy. Use an intact "
            "copy (best.pt holds the best epoch's model)"
        )


def load_torch_file(
    path: str | Path, map_location: str | torch.device = "cpu", *, what: str = "checkpoint"
) -> Any:
    """``torch.load(path, weights_only=True)``; a missing, truncated, corrupt or unsafe file raises
    :class:`~tilegrad.CheckpointError` naming ``what`` it was meant to be (a checkpoint, a weights file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if not refused:  # not a pickle of tensors at all: junk or a torn file
            raise CheckpointError(
                f"{what} {str(path)!r} is corrupt or not a torch file and cannot be loaded (UnpicklingError); "
                "use an intact copy"
            ) from None
        # weights_only refuses pickled classes, e.g. a whole torch.save(model)
        raise CheckpointError(
            f"{what} {str(path)!r} holds Python objects that torch.load(weights_only=True) refuses to unpickle "
            f"({refused[0]}). Save tensors only: torch.save(model.state_dict(), path)"
        ) from None
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        ValueError,
        OSError,
        KeyError,
        IndexError,
        TypeError,
    ) as err:
        # a junk file can trip the unpickler anywhere (KeyError: 101 for a text file)
        raise CheckpointError(
            f"{what} {str(path)!r} is corrupt or truncated and cannot be loaded ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); use an intact copy"
        ) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises :class:`~tilegrad.CheckpointError` when the file is missing, truncated, corrupt or not a tilegrad
    training checkpoint.
    """
    state = load_torch_file(path, map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{str(path)!r} is not a tilegrad training checkpoint (expected format {FORMAT!r}, found {found!r})"
        )
    verify_checksum(state, path)
    return state


def get_rng_state() -> dict[str, Any]:
    """The states of torch (CPU and all CUDA devices), numpy's global and Python's ``random`` generators."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generator states saved by :func:`get_rng_state`.

    >>> saved = get_rng_state(); a = (torch.rand(1), np.random.rand(), random.random())
    >>> set_rng_state(saved); a == (torch.rand(1), np.random.rand(), random.random())
    True
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
