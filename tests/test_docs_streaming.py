"""The examples in docs/streaming.md run, in order, in one namespace (later blocks use earlier names)."""

import numpy as np
import torch


def test_streaming_guide_examples_run(doc_blocks, doc_examples):
    assert len(doc_blocks("streaming.md")) >= 3
    namespace = doc_examples("streaming.md", shared=True)[-1]
    # the sink example really collected the input gradient: compare with the plain computation
    trunk, head, lazy, sink = (namespace[k] for k in ("trunk", "head", "lazy", "sink"))
    x = torch.from_numpy(np.array(lazy)).requires_grad_(True)
    head(trunk(x))[0, 1].backward()
    scale = x.grad.abs().max().item()
    assert np.abs(sink.grad - x.grad.numpy()).max() <= 1e-4 * scale
