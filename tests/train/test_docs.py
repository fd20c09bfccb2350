"""The runnable example at the end of docs/training.md runs and learns its toy task."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def test_training_guide_miniature_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    miniature = blocks[
        -1
    ]  # the earlier block refers to files the reader has (slides.csv); this one makes its own
    assert "tempfile.mkdtemp()" in miniature
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(miniature, str(DOC), "exec"), namespace)
    assert len(namespace["result"].history) == 3
    assert "val_auc" in namespace["result"].history[-1]
