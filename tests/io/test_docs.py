"""The examples in docs/io.md run, in order, in a scratch directory."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "io.md"


def test_io_guide_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {})
