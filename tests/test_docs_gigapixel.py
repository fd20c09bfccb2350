"""The examples in docs/gigapixel.md run, in order, in one namespace, at the guide's small SIDE."""

from __future__ import annotations

import numpy as np


def test_gigapixel_guide_examples_run(tmp_path, monkeypatch, doc_blocks, doc_examples):
    assert len(doc_blocks("gigapixel.md")) == 4
    monkeypatch.chdir(tmp_path)
    namespace = doc_examples("gigapixel.md", shared=True)[-1]
    slide = namespace["slide"]
    assert slide.shape == (3, namespace["SIDE"], namespace["SIDE"]) and len(slide.levels) > 1
    plan = namespace["plan"]
    assert plan.peak_bytes <= 2 * 2**30 and plan.time_ratio >= 1
    assert namespace["result"].history[-1]["epoch"] == 1
    found = namespace["found"]
    assert abs(float(found.map.sum()) - 1) < 1e-5 and found.stride == (16.0, 16.0)
    assert np.array_equal(np.load(tmp_path / "slide_1_attention.npy"), found.map)
