"""The examples in docs/streaming.md run, in order, in one namespace (later blocks use earlier names)."""

import re
from pathlib import Path

import numpy as np
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "streaming.md"


def test_streaming_guide_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    # the sink example really collected the input gradient: compare with the plain computation
    trunk, head, lazy, sink = (namespace[k] for k in ("trunk", "head", "lazy", "sink"))
    x = torch.from_numpy(np.array(lazy)).requires_grad_(True)
    head(trunk(x))[0, 1].backward()
    scale = x.grad.abs().max().item()
    assert np.abs(sink.grad - x.grad.numpy()).max() <= 1e-4 * scale
