"""Slides with slide-level labels: the CSV format, lazy opening, random orientation and the model's input view.

A dataset is a CSV file with a header naming the columns ``image`` and ``label`` and optionally ``split``::

    image,label,split
    slides/a.tif,1,train
    slides/b.tif,0,val

Paths are relative to the CSV file. Labels are class indices 0, 1, ... . ``split`` is ``train``, ``val`` or ``test``
(rows without a split column are training rows). Every problem is reported as a :class:`~tilegrad.DataError` that
names the file, the line and the problem, e.g. ``slides.csv line 3: image 'slides/b.tif' does not exist``.

Images are opened lazily (:func:`open_slide`): nothing is read until a region is sliced, so a slide larger than
memory can be streamed tile by tile. :func:`random_orientation` flips and rotates the lazy image by 90-degree steps
without reading it, and :class:`SlideInput` adds the batch axis and the float conversion the model expects, still
lazily: slicing it reads only the requested region.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError, DataWarning
from .config import TrainConfig

__all__ = [
    "SPLITS",
    "SlideInput",
    "SlideRecord",
    "check_labels",
    "check_rows",
    "check_same_channels",
    "count_nonfinite",
    "crop",
    "nonfinite_message",
    "open_slide",
    "random_orientation",
    "read_slide_csv",
    "slide_input",
    "tissue_box",
]

SPLITS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
"""Accepted values of the ``split`` column and the split each one means."""


@dataclass(frozen=True)
class SlideRecord:
    """One row of a dataset CSV: an image path (absolute), a class index (None when unlabelled) and a split."""

    image: Path
    label: int | None
    split: str
    line: int
    source: str

    def where(self) -> str:
        """``"slides.csv line 3"``: where this row came from, for error messages."""
        return f"{self.source} line {self.line}"


def read_slide_csv(
    path: str | Path,
    *,
    require_labels: bool = True,
    check_images: bool = True,
    decode_all: bool = False,
    level: int | None = None,
    mpp: float | None = None,
) -> list[SlideRecord]:
    """Read and validate a dataset CSV (columns ``image,label[,split]``; paths relative to the CSV).

    With ``check_images`` every image is opened (headers only, plus one pixel) so that a missing or unreadable file
    is reported before training starts rather than hours into it. A damaged tile inside a tiled TIFF shows only when
    that tile is decoded: ``decode_all`` decodes every image completely (block by block, at ``level``/``mpp``), which
    reads the whole dataset once. Without it such a tile is reported when training reaches it, naming the row too.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "slides.csv").write_text("image,label\\nmissing.png,1\\n")
    >>> read_slide_csv(d / "slides.csv")
    Traceback (most recent call last):
    ...
    tilegrad.errors.DataError: slides.csv line 2: image 'missing.png' does not exist (looked for .../missing.png)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"dataset CSV {str(path)!r} does not exist: expected a CSV file with columns image,label"
        )
    name = path.name
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{name}: not a UTF-8 text file ({err}); expected a CSV with columns image,label"
        ) from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise DataError(
            f"{name}: the file is empty; expected a header line 'image,label[,split]' and one row per slide"
        )
    header = [h.strip().lower() for h in rows[0]]
    needed = ["image", "label"] if require_labels else ["image"]
    unknown = [h for h in header if h not in ("image", "label", "split")]
    if any(h not in header for h in needed) or unknown or len(set(header)) != len(header):
        raise DataError(
            f"{name} line 1: bad header {rows[0]!r}; expected the column names image,label and optionally split "
            f"(e.g. 'image,label,split'){'; unknown: ' + ', '.join(map(repr, unknown)) if unknown else ''}"
        )
    col = {h: i for i, h in enumerate(header)}
    records: list[SlideRecord] = []
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"{name} line {number}"
        if len(row) != len(header):
            raise DataError(
                f"{where}: expected {len(header)} fields ({','.join(header)}), found {len(row)}: {row!r}"
            )
        image_text = row[col["image"]].strip()
        if not image_text:
            raise DataError(f"{where}: the image field is empty; expected a path relative to the CSV")
        image = (path.parent / image_text).resolve()
        label = _parse_label(row[col["label"]], where) if "label" in col else None
        split = "train"
        if "split" in col:
            split_text = row[col["split"]].strip().lower()
            if split_text not in SPLITS:
                raise DataError(f"{where}: split {row[col['split']]!r} is not one of train, val, test")
            split = SPLITS[split_text]
        if not image.is_file():
            raise DataError(f"{where}: image {image_text!r} does not exist (looked for {image})")
        record = SlideRecord(image=image, label=label, split=split, line=number, source=name)
        if check_images or decode_all:
            array = open_slide(record.image, level=level, mpp=mpp, where=where)
            _check_readable(array, where, image_text, everything=decode_all)
        records.append(record)
    if not records:
        raise DataError(f"{name}: no slides listed; expected one row per slide after the header")
    return records


def _parse_label(text: str, where: str) -> int:
    stripped = text.strip()
    try:
        value = float(stripped)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise DataError(
            f"{where}: label {text!r} is not a class index; expected a whole number 0, 1, 2, ... "
            f"(0/1 for negative/positive)"
        )
    return int(value)


_DECODE_BLOCK = 2048
"""Side of the blocks in which ``decode_all`` reads an image (3 x 2048 x 2048 uint8 is 12 MiB)."""


def _check_readable(array: Any, where: str, image_text: str, everything: bool = False) -> None:
    shape = tuple(array.shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(
            f"{where}: image {image_text!r} has shape {shape}; expected a 2D image read as (channels, height, width)"
        )
    h, w = shape[1:]
    if everything:
        blocks = [
            (slice(y, min(y + _DECODE_BLOCK, h)), slice(x, min(x + _DECODE_BLOCK, w)))
            for y in range(0, h, _DECODE_BLOCK)
            for x in range(0, w, _DECODE_BLOCK)
        ]
    else:
        blocks = [(slice(h - 1, h), slice(w - 1, w))]  # one pixel: the headers and the last tile
    try:
        for rows, cols in blocks:
            np.asarray(array[:, rows, cols])
    except DataError as err:
        raise DataError(f"{where}: image {image_text!r} cannot be decoded: {err}") from None


def open_slide(
    path: str | Path, *, level: int | None = None, mpp: float | None = None, where: str = ""
) -> Any:
    """Open an image lazily as a (C, H, W) :class:`tilegrad.io.LazyImage`, at a pyramid ``level`` or ``mpp``.

    ``where`` prefixes error messages (e.g. ``"slides.csv line 3"``).
    """
    from ..io import open_image

    try:
        image = open_image(path, level=level, mpp=mpp)
    except DataError as err:
        raise DataError(f"{where}: {err}" if where else str(err)) from None
    if image.ndim != 3:
        raise DataError(
            f"{where + ': ' if where else ''}{Path(path).name} has shape {image.shape}; expected a 2D slide "
            f"(channels, height, width)"
        )
    return image


def random_orientation(array: Any, rng: np.random.Generator) -> Any:
    """One of the 8 flips/90-degree rotations of a (C, H, W) image, chosen by ``rng``, as a lazy view.

    Nothing is read: slicing the view reads the matching region of ``array`` (see :mod:`tilegrad.io.transforms`).

    >>> a = np.arange(6).reshape(1, 2, 3)
    >>> sorted({random_orientation(a, np.random.default_rng(s)).shape for s in range(20)})
    [(1, 2, 3), (1, 3, 2)]
    """
    from ..io import open_image, random_flip_rotate

    return random_flip_rotate(open_image(array), rng)


def tissue_box(image: Any, margin: int = 2) -> tuple[slice, ...] | None:
    """Bounding box (spatial slices) of the tissue in a slide, from a thresholded thumbnail; None if no tissue.

    ``margin`` is in thumbnail pixels.
    """
    from ..io import tissue_mask

    return tissue_mask(image, max_size=512).bbox(margin=margin)


def _crop_view() -> type:
    from ..io import LazyImage

    class CropView(LazyImage):
        """A lazy rectangular region of a (C, *spatial) image: reads only what is sliced."""

        def __init__(self, image: Any, box: tuple[slice, ...]) -> None:
            self.base = image
            self._offsets = (0, *(int(b.start) for b in box))
            self._shape = (image.shape[0], *(int(b.stop) - int(b.start) for b in box))
            self._dtype = image.dtype
            self._spacing = image.spacing
            self.path = image.path

        def _read(self, bounds: Any) -> np.ndarray:
            return self.base.read_bounds(
                tuple((lo + o, hi + o, step) for (lo, hi, step), o in zip(bounds, self._offsets))
            )

        def close(self) -> None:
            self.base.close()

    return CropView


def crop(image: Any, box: tuple[slice, ...]) -> Any:
    """The region ``box`` (one slice per spatial axis) of a lazy image, as a lazy image.

    >>> crop(np.arange(24).reshape(1, 4, 6), (slice(1, 3), slice(2, 5)))[0].tolist()
    [[8, 9, 10], [14, 15, 16]]
    """
    from ..io import open_image

    return _crop_view()(open_image(image), box)


class SlideInput:
    """A lazy (1, C, H, W) float view of a (C, H, W) image: ``(pixel * scale - mean) / std``, read on slicing.

    This is what the streamed model consumes: slicing a tile reads only that tile from disk. ``where`` (e.g.
    ``"slides.csv line 3"``) prefixes the error raised when a region cannot be read, e.g. a damaged tile.

    >>> img = np.full((3, 4, 5), 255, dtype=np.uint8)
    >>> x = SlideInput(img, scale=1 / 255)
    >>> x.shape, x[:, :, :2, :2].dtype, float(x[0, 0, 0, 0])
    ((1, 3, 4, 5), dtype('float32'), 1.0)
    """

    def __init__(
        self,
        array: Any,
        *,
        scale: float = 1 / 255,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dtype: torch.dtype | np.dtype | str = np.float32,
        where: str = "",
    ) -> None:
        if isinstance(dtype, torch.dtype):
            dtype = torch.empty((), dtype=dtype).numpy().dtype
        self.array = array
        self.where = where
        self.dtype = np.dtype(dtype)
        channels = int(array.shape[0])
        self.scale = float(scale)
        self.mean = np.zeros(channels) if mean is None else np.asarray(mean, dtype=np.float64)
        self.std = np.ones(channels) if std is None else np.asarray(std, dtype=np.float64)
        if self.mean.shape != (channels,) or self.std.shape != (channels,):
            raise DataError(
                f"normalisation needs one mean and one std per channel ({channels}), "
                f"received {self.mean.shape[0]} means and {self.std.shape[0]} stds"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, *(int(s) for s in self.array.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _expand_key(key, self.ndim)
        batch, channel, spatial = key[0], key[1], key[2:]
        if isinstance(batch, slice):
            if range(1)[batch] != range(1):
                raise IndexError(f"SlideInput has a batch of 1; index {batch} selects no image")
        elif batch not in (0, -1):
            raise IndexError(f"batch index {batch} out of range for a batch of 1")
        try:
            data = np.asarray(self.array[(channel, *spatial)])
        except DataError as err:
            if not self.where:
                raise
            raise DataError(
                f"{self.where}: {err}. The image is damaged: re-export it or remove its row "
                f"(--check-images decodes every image before training starts)"
            ) from None
        out = data.astype(self.dtype) * self.dtype.type(self.scale)
        mean, std = self.mean[channel], self.std[channel]
        if np.ndim(mean):
            shape = (-1,) + (1,) * (out.ndim - 1)
            mean, std = mean.reshape(shape), std.reshape(shape)
        if np.any(self.mean != 0) or np.any(self.std != 1):
            out = (out - mean.astype(self.dtype)) / std.astype(self.dtype)
        return out[None] if isinstance(batch, slice) else out

    def materialize(self) -> torch.Tensor:
        """The whole (1, C, H, W) input as a tensor (for conventional, unstreamed training)."""
        return torch.from_numpy(np.ascontiguousarray(self[:]))


def _expand_key(key: Any, ndim: int) -> tuple:
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (ndim - len(key) + 1) + key[i + 1 :]
    if len(key) > ndim:
        raise IndexError(f"too many indices ({len(key)}) for a {ndim}-dimensional input")
    return key + (slice(None),) * (ndim - len(key))


def slide_input(
    record: SlideRecord,
    config: TrainConfig,
    norm: tuple[Sequence[float] | None, Sequence[float] | None],
    dtype: torch.dtype,
    rng: np.random.Generator | None = None,
    boxes: dict[Path, Any] | None = None,
) -> SlideInput:
    """The lazy (1, C, H, W) model input for one slide: cropped to its tissue (``config.tissue_crop``; boxes are
    cached in ``boxes``), randomly flipped/rotated by ``rng`` when given, converted to float on reading."""
    array = open_slide(record.image, level=config.level, mpp=config.mpp, where=record.where())
    if config.tissue_crop:
        if boxes is not None and record.image in boxes:
            box = boxes[record.image]
        else:
            box = tissue_box(array)  # None when the threshold finds no tissue: the whole slide is used
            if boxes is not None:
                boxes[record.image] = box
        if box is not None:
            array = crop(array, box)
    if rng is not None:
        array = random_orientation(array, rng)
    mean, std = norm
    return SlideInput(array, mean=mean, std=std, dtype=dtype, where=record.where())


def count_nonfinite(array: Any, block: int = _DECODE_BLOCK) -> tuple[int, int, tuple[int, ...] | None]:
    """(NaN count, infinite count, index of the first) over a (C, H, W) lazy image, read block by block.

    Integer images hold no such values and are not read.

    >>> a = np.zeros((1, 3, 3), np.float32); a[0, 1, 2] = np.nan; a[0, 2, 0] = -np.inf
    >>> count_nonfinite(a)
    (1, 1, (0, 1, 2))
    """
    if np.dtype(array.dtype).kind not in "fc":
        return 0, 0, None
    h, w = (int(n) for n in array.shape[1:3])
    nans = infs = 0
    first = None
    for y in range(0, h, block):
        for x in range(0, w, block):
            data = np.asarray(array[:, y : y + block, x : x + block])
            bad = ~np.isfinite(data)
            if bad.any():
                nans += int(np.isnan(data).sum())
                infs += int(np.isinf(data).sum())
                if first is None:
                    c, r, q = (int(i[0]) for i in np.nonzero(bad))
                    first = (c, y + r, x + q)
    return nans, infs, first


def nonfinite_message(where: str, image: Any, x: Any, what: str) -> str:
    """The message for non-finite ``what`` (class scores, a loss, gradients) computed from image ``image``: what the
    image holds (read again to count NaN/Inf pixels) and what to do."""
    array = getattr(x, "array", x)
    nans, infs, first = count_nonfinite(array)
    prefix = f"{where}: " if where else ""
    name = Path(image).name if image is not None else "the image"
    verb = "is" if what == "loss" else "are"
    if nans or infs:
        at = f" (the first at channel {first[0]}, row {first[1]}, column {first[2]})" if first else ""
        return (
            f"{prefix}image {name!r} holds {nans} NaN and {infs} infinite pixel values{at}, so its {what} {verb} not "
            f"finite. Replace them (e.g. np.nan_to_num) or remove the image"
        )
    return (
        f"{prefix}the {what} of image {name!r} {verb} not finite (NaN or Inf) although its pixels are finite: the "
        "model's weights or its arithmetic overflowed (try --amp none, a lower --lr, or another checkpoint)"
    )


# NOTE [ Dataset checks ]
# Before training, the rows of the dataset CSV (and --val-csv) are checked as a whole; each finding names the rows:
#
# * one image with two different labels: DataError (one of them is wrong);
# * one image in the training split and in validation or test: DataError (leakage: validation would score slides
#   the model was trained on);
# * one image listed twice with the same label and split: DataWarning (it counts twice per epoch, which may be
#   intended oversampling);
# * training labels that skip a class ({0, 2}: a 3-class head with class 1 never trained): DataError (class indices
#   must be 0..K-1, each with a training slide);
# * a training split with one class: DataError (a classifier learns nothing from it);
# * images with different numbers of channels (grayscale or RGBA among RGB): DataError.
#
# docs/training.md lists the same; tests/reliability replays each.


def check_rows(records: Sequence[SlideRecord]) -> None:
    """Duplicate rows, conflicting labels and train/validation leakage (NOTE [ Dataset checks ])."""
    first: dict[Path, SlideRecord] = {}
    for r in records:
        seen = first.get(r.image)
        if seen is None:
            first[r.image] = r
            continue
        both = f"{seen.where()} and {r.where()}"
        if seen.label != r.label:
            raise DataError(
                f"{both} give image {r.image.name!r} two labels ({seen.label} and {r.label}); keep the right one"
            )
        if seen.split != r.split and "train" in (seen.split, r.split):
            raise DataError(
                f"{both} put image {r.image.name!r} in both the {seen.split} and the {r.split} split: a slide "
                "validated on must not be trained on (leakage). Keep it in one split"
            )
        if seen.split == r.split:
            warnings.warn(
                f"{both} list image {r.image.name!r} twice with the same label and split: it counts twice per "
                "epoch. Remove one row unless the oversampling is intended",
                DataWarning,
                stacklevel=2,
            )


def check_labels(train: Sequence[SlideRecord], source: Any) -> None:
    """Training labels must be 0..K-1 with every class present, and at least two classes (NOTE [ Dataset checks ])."""
    labels = sorted({int(r.label) for r in train if r.label is not None})
    name = Path(str(source)).name
    if len(labels) < 2:
        raise DataError(
            f"{name}: all {len(train)} training slides have label {labels[0] if labels else None}; a classifier "
            "needs training slides of at least two classes. Add slides of the other class(es)"
        )
    missing = sorted(set(range(labels[-1] + 1)) - set(labels))
    if missing:
        raise DataError(
            f"{name}: the training labels are {labels}: class{'es' * (len(missing) > 1)} "
            f"{', '.join(map(str, missing))} {'have' if len(missing) > 1 else 'has'} no training slide, yet the "
            f"model would get {labels[-1] + 1} outputs. Number the classes 0..{len(labels) - 1} (e.g. labels "
            "1, 2 become 0, 1)"
        )


def check_same_channels(records: Sequence[SlideRecord], level: int | None, mpp: float | None) -> None:
    """Every image has the channels of the first one (a grayscale or RGBA image among RGB slides is a DataError)."""
    first: tuple[SlideRecord, int] | None = None
    for r in records:
        channels = int(open_slide(r.image, level=level, mpp=mpp, where=r.where()).shape[0])
        if first is None:
            first = (r, channels)
        elif channels != first[1]:
            raise DataError(
                f"{r.where()}: image {r.image.name!r} has {channels} channel{'s' * (channels != 1)}, the images "
                f"before it {first[1]} (from {first[0].where()}): convert it to match, e.g. with PIL "
                f"Image.open(path).convert({'RGB' if first[1] == 3 else 'L'!r})"
            )
