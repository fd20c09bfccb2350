"""The examples in docs/monai.md run, in order, in one namespace, and say what the guide says they do."""

import torch
from monai.inferers import SimpleInferer

import tilegrad
from tilegrad.monai import ExactInferer


def test_monai_guide_examples_run(doc_blocks, doc_examples):
    assert len(doc_blocks("monai.md")) == 3
    namespace = doc_examples("monai.md", shared=True)[-1]
    net, volume, pred = namespace["net"], namespace["volume"], namespace["pred"]
    with torch.no_grad():
        assert (pred - SimpleInferer()(volume, net)).abs().max() <= 1e-5
    plan = tilegrad.plan_streaming(
        net, tuple(volume.shape), tile_size="auto", memory_budget=namespace["inferer"].memory_budget, mode="lean",
        training=False, output_in_memory=True,
    )  # fmt: skip
    assert len(plan.segments[0].grid) == 8  # as the guide says: the budget cuts the volume
    assert 0.0 < namespace["evaluator"].state.metrics["dice"] < 1.0
    inferer = namespace["bundle_inferer"]
    assert isinstance(inferer, ExactInferer) and inferer.memory_budget == 2 * 2**30
