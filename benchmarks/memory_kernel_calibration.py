"""Measure the scratch memory of single CPU convolution ops next to tilegrad's model of it.

NOTE [ CPU convolution workspaces ] in src/tilegrad/memory/kernels.py was calibrated with this script. For each
configuration it runs ``aten.convolution`` and ``aten.convolution_backward`` on real tensors inside
``tilegrad.measure_peak_memory`` and subtracts the op's outputs; the rest is scratch the kernel allocated internally.
The model's figure comes from ``conv_workspace_bytes`` on meta tensors. The script re-runs itself with
``MALLOC_MMAP_THRESHOLD_`` set (NOTE [ Allocator policy for CPU measurements ]).

    python benchmarks/memory_kernel_calibration.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch

from tilegrad.memory.kernels import conv_workspace_bytes
from tilegrad.memory.measure import measure_peak_memory

aten = torch.ops.aten
MIB = 2**20

# (input shape, weight shape, stride, padding, transposed, output_padding, dtype)
CASES = [
    ((1, 2, 48, 48, 48), (2, 2, 3, 3, 3), 1, 1, False, 0, torch.float32),  # Slow3d, few channels
    ((1, 16, 32, 32, 32), (16, 16, 3, 3, 3), 1, 1, False, 0, torch.float32),  # Slow3d
    (
        (2, 8, 32, 32, 32),
        (8, 8, 3, 3, 3),
        1,
        1,
        False,
        0,
        torch.float64,
    ),  # Slow3d, batch 2 (no oneDNN in f64)
    ((2, 8, 64, 64), (8, 8, 3, 3), 1, 1, False, 0, torch.float64),  # Slow2d
    ((1, 32, 16, 16, 16), (32, 16, 3, 3, 3), 2, 1, True, 1, torch.float32),  # SlowTranspose3d
    ((2, 16, 32, 32, 32), (32, 16, 3, 3, 3), 1, 1, False, 0, torch.float32),  # oneDNN 3D
    ((2, 64, 112, 112), (64, 64, 3, 3), 1, 1, False, 0, torch.float32),  # oneDNN
    ((2, 64, 112, 112), (128, 64, 3, 3), 2, 1, False, 0, torch.float32),  # oneDNN strided
    ((2, 2, 256, 256), (2, 2, 3, 3), 1, 1, False, 0, torch.float32),  # oneDNN, channels padded to the block
    ((2, 3, 224, 224), (64, 3, 3, 3), 1, 1, False, 0, torch.float32),  # oneDNN, first layer
    ((2, 32, 128, 128), (32, 2, 3, 3), 2, 1, True, 1, torch.float32),  # oneDNN transposed
    ((1, 6, 24, 24, 24), (50, 6, 3, 3, 3), 1, 0, False, 0, torch.float32),  # ESPCN first layer
]


def measure(case) -> tuple[str, float, float, float, float]:
    ishape, wshape, s, p, transposed, op, dtype = case
    nd = len(ishape) - 2
    stride, padding, dilation, outpad = [s] * nd, [p] * nd, [1] * nd, [op] * nd
    x = torch.randn(ishape, dtype=dtype)
    w = torch.randn(wshape, dtype=dtype)
    b = torch.randn(wshape[1] if transposed else wshape[0], dtype=dtype)
    backend = torch._C._select_conv_backend(x, w, b, stride, padding, dilation, transposed, outpad, 1, None)
    args = (stride, padding, dilation, transposed, outpad, 1)
    y = aten.convolution(x, w, b, *args)
    grad = torch.randn(y.shape, dtype=dtype)
    mask = [True, True, True]
    aten.convolution_backward(grad, x, w, [b.shape[0]], *args, mask)  # warm up oneDNN primitives
    fwd = measure_peak_memory(lambda: aten.convolution(x, w, b, *args)) - y.numel() * y.element_size()
    bwd = measure_peak_memory(lambda: aten.convolution_backward(grad, x, w, [b.shape[0]], *args, mask))
    bwd -= x.numel() * x.element_size() + w.numel() * w.element_size()
    mx, mw, mg = (torch.empty(t.shape, dtype=dtype, device="meta") for t in (x, w, grad))
    model_fwd = conv_workspace_bytes(aten.convolution.default, (mx, mw, None, *args))
    model_bwd = conv_workspace_bytes(
        aten.convolution_backward.default, (mg, mx, mw, [b.shape[0]], *args, mask)
    )
    name = backend.name if backend.name != "???" else "MkldnnTranspose"
    return name, fwd / MIB, model_fwd / MIB, bwd / MIB, model_bwd / MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(args.threads)
    print(
        f"{'backend':16s} {'input':22s} {'weight':20s} | fwd scratch MiB: measured model | bwd: measured model"
    )
    for case in CASES:
        name, fwd, mfwd, bwd, mbwd = measure(case)
        print(f"{name:16s} {case[0]!s:22s} {case[1]!s:20s} | {fwd:8.2f} {mfwd:8.2f} | {bwd:8.2f} {mbwd:8.2f}")


if __name__ == "__main__":
    main()
