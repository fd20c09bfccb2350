"""The dataset CSV: every bad input gives a DataError naming the file, the line and the problem."""

from __future__ import annotations

import numpy as np
import pytest

from tilegrad import DataError
from tilegrad.train import SlideInput, random_orientation, read_slide_csv

from .conftest import write_damaged_tiff


def test_reads_rows_with_paths_relative_to_the_csv(slides):
    records = read_slide_csv(slides)
    assert [r.label for r in records] == [0, 1, 0, 1, 0, 1]
    assert [r.split for r in records] == ["train"] * 4 + ["val"] * 2
    assert all(r.image.is_file() and r.image.parent == slides.parent / "img" for r in records)
    assert records[2].where() == "slides.csv line 4"


def _rewrite(csv, line, text):
    lines = csv.read_text().splitlines()
    lines[line - 1] = text
    csv.write_text("\n".join(lines) + "\n")


# (what is wrong, how the CSV is edited (line, new text) or a file is damaged, expected message fragments)
BAD_INPUTS = [
    ("missing file", (3, "img/nope.png,1,train"), ["slides.csv line 3", "'img/nope.png' does not exist"]),
    (
        "bad label (word)",
        (4, "img/s2.png,maybe,train"),
        ["slides.csv line 4", "label 'maybe'", "class index"],
    ),
    ("bad label (fraction)", (2, "img/s0.png,0.5,train"), ["slides.csv line 2", "label '0.5'"]),
    ("bad label (negative)", (5, "img/s3.png,-1,train"), ["slides.csv line 5", "label '-1'"]),
    ("bad header", (1, "path,target"), ["slides.csv line 1", "bad header", "image,label"]),
    ("unknown column", (1, "image,label,weight"), ["slides.csv line 1", "unknown: 'weight'"]),
    ("wrong field count", (6, "img/s4.png,0"), ["slides.csv line 6", "expected 3 fields"]),
    ("bad split", (7, "img/s5.png,1,holdout"), ["slides.csv line 7", "split 'holdout'"]),
]


@pytest.mark.parametrize("case, edit, fragments", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_rows_name_the_line_and_the_problem(slides, case, edit, fragments):
    _rewrite(slides, *edit)
    with pytest.raises(DataError) as info:
        read_slide_csv(slides)
    for fragment in fragments:
        assert fragment in str(info.value), (case, str(info.value))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_image_names_the_line(slides, damage):
    path = slides.parent / "img" / "s3.png"
    data = path.read_bytes()
    path.write_bytes(
        {"garbage": b"not an image at all" * 10, "truncated": data[: len(data) // 3], "empty": b""}[damage]
    )
    with pytest.raises(DataError) as info:
        read_slide_csv(slides)
    assert "slides.csv line 5" in str(info.value)
    assert "img/s3.png" in str(info.value) or "s3.png" in str(info.value)


def test_damaged_tile_inside_a_tiff_is_found_by_decode_all_and_names_the_line(slides):
    write_damaged_tiff(slides.parent / "img" / "damaged.tif")
    _rewrite(slides, 5, "img/damaged.tif,1,train")
    assert (
        len(read_slide_csv(slides)) == 6
    )  # the quick check reads headers and one pixel: the tile looks fine
    with pytest.raises(DataError) as info:
        read_slide_csv(slides, decode_all=True)
    message = str(info.value)
    assert message.startswith("slides.csv line 5: image 'img/damaged.tif' cannot be decoded")
    assert "cannot decode image data in region" in message


def test_empty_csv_and_missing_csv(tmp_path):
    (tmp_path / "a.csv").write_text("")
    with pytest.raises(DataError, match=r"a\.csv: the file is empty"):
        read_slide_csv(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("image,label\n")
    with pytest.raises(DataError, match=r"b\.csv: no slides listed"):
        read_slide_csv(tmp_path / "b.csv")
    with pytest.raises(DataError, match="does not exist"):
        read_slide_csv(tmp_path / "c.csv")


def test_labels_optional_for_prediction(slides):
    slides.write_text("image\nimg/s0.png\nimg/s1.png\n")
    assert [r.label for r in read_slide_csv(slides, require_labels=False)] == [None, None]
    with pytest.raises(DataError, match="bad header"):
        read_slide_csv(slides)


def test_random_orientation_reaches_all_eight_and_reads_only_the_sliced_region():
    a = np.arange(2 * 6 * 8).reshape(2, 6, 8)
    dihedral = {
        np.ascontiguousarray(np.rot90(np.flip(a, 2) if f else a, k, axes=(1, 2))).tobytes()
        for k in range(4)
        for f in (0, 1)
    }
    seen = set()
    for seed in range(100):
        view = random_orientation(a, np.random.default_rng(seed))
        seen.add(np.ascontiguousarray(view[...]).tobytes())
    assert seen == dihedral  # all eight, and nothing else

    class Recorder:
        def __init__(self, data):
            self.data, self.shape, self.dtype, self.keys = data, data.shape, data.dtype, []

        def __getitem__(self, key):
            self.keys.append(key)
            return self.data[key]

    src = Recorder(a)
    view = random_orientation(src, np.random.default_rng(3))
    assert src.keys == []  # nothing read when the view is made
    view[:, 1:3, 2:4]
    assert len(src.keys) == 1 and np.asarray(src.data[src.keys[0]]).size == 2 * 2 * 2


def test_crop_is_a_lazy_region():
    from tilegrad.train.dataset import crop

    a = np.arange(3 * 10 * 12).reshape(3, 10, 12)
    c = crop(a, (slice(2, 9), slice(3, 11)))
    assert c.shape == (3, 7, 8)
    np.testing.assert_array_equal(c[...], a[:, 2:9, 3:11])
    np.testing.assert_array_equal(c[1, ::-2, 5], a[1, 2:9, 3:11][::-2, 5])


def test_slide_input_reads_only_what_is_sliced_and_normalises():
    class Recorder:
        def __init__(self, data):
            self.data, self.shape, self.keys = data, data.shape, []

        def __getitem__(self, key):
            self.keys.append(key)
            return self.data[key]

    data = np.random.default_rng(0).integers(0, 256, (3, 20, 30), dtype=np.uint8)
    src = Recorder(data)
    x = SlideInput(src, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5), dtype=np.float64)
    assert x.shape == (1, 3, 20, 30)
    tile = x[:, :, 4:9, 10:20]
    assert src.keys == [(slice(None), slice(4, 9), slice(10, 20))]
    expected = (data[:, 4:9, 10:20] / 255.0 - np.array([0.5, 0.4, 0.3])[:, None, None]) / np.array(
        [0.2, 0.25, 0.5]
    )[:, None, None]
    np.testing.assert_allclose(tile[0], expected, rtol=1e-12)
    np.testing.assert_allclose(x[0, 1, 6, 10:20], expected[1, 2], rtol=1e-12)  # integer channel index
    assert x.materialize().shape == (1, 3, 20, 30)
    with pytest.raises(IndexError):
        x[1]
