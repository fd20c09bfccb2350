"""Generate docs/memory.md: the guide to memory accounting with its worked examples, every number computed here.

    python benchmarks/memory_worked_example.py            # about 10 minutes on 2 cores (one big measured run)

1. VGG-16 at 224x224x3: per-layer output counts against the CS231n table, row by row, and the true sums.
2. The seed post's brain MRI case (VGG-16, 5 sequences, 320x320, 15 slices as a batch of 15): predicted and
   measured training peak next to its 916.5 MB back-of-envelope figure.
3. ResNet-34 at 8192x8192: conventional training peak versus the trunk streamed in 1024 px tiles (predicted).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import memory_models  # noqa: E402
from tilegrad import estimate_memory  # noqa: E402
from tilegrad.memory.workload import measure_workload_subprocess  # noqa: E402
from tilegrad.units import format_bytes  # noqa: E402

MODELS = HERE / "memory_models.py"
OUT = HERE.parent / "docs" / "memory.md"

# CS231n "VGGNet in detail" (https://cs231n.github.io/convolutional-networks/#case): rows as printed there.
CS231N = [
    ("CONV3-64", "[224x224x64]", "3.2M", 1_728),
    ("CONV3-64", "[224x224x64]", "3.2M", 36_864),
    ("POOL2", "[112x112x64]", "800K", 0),
    ("CONV3-128", "[112x112x128]", "1.6M", 73_728),
    ("CONV3-128", "[112x112x128]", "1.6M", 147_456),
    ("POOL2", "[56x56x128]", "400K", 0),
    ("CONV3-256", "[56x56x256]", "800K", 294_912),
    ("CONV3-256", "[56x56x256]", "800K", 589_824),
    ("CONV3-256", "[56x56x256]", "800K", 589_824),
    ("POOL2", "[28x28x256]", "200K", 0),
    ("CONV3-512", "[28x28x512]", "400K", 1_179_648),
    ("CONV3-512", "[28x28x512]", "400K", 2_359_296),
    ("CONV3-512", "[28x28x512]", "400K", 2_359_296),
    ("POOL2", "[14x14x512]", "100K", 0),
    ("CONV3-512", "[14x14x512]", "100K", 2_359_296),
    ("CONV3-512", "[14x14x512]", "100K", 2_359_296),
    ("CONV3-512", "[14x14x512]", "100K", 2_359_296),
    ("POOL2", "[7x7x512]", "25K", 0),
    ("FC", "[1x1x4096]", "4096", 102_760_448),
    ("FC", "[1x1x4096]", "4096", 16_777_216),
    ("FC", "[1x1x1000]", "1000", 4_096_000),
]


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def meta(factory):
    with torch.device("meta"):
        return factory()


def vgg_section() -> tuple[list[str], dict]:
    model = meta(memory_models.vgg16)
    report = estimate_memory(model, (1, 3, 224, 224), mode="infer", name="VGG-16")
    rows = [r for r in report.layers if r.type in ("Conv2d", "MaxPool2d", "Linear")]
    assert len(rows) == len(CS231N), (len(rows), len(CS231N))
    lines = [
        "| CS231n layer | CS231n output | CS231n values | tilegrad layer | output shape | values | match | "
        "weights (CS231n, no bias) | parameters (with bias) |",
        "|---|---|---:|---|---|---:|:---:|---:|---:|",
    ]
    matches = 0
    for (name, shape, printed, weights), row in zip(CS231N, rows):
        _batch, c, *hw = row.output_shape
        ours = f"{'x'.join(map(str, hw))}x{c}" if hw else f"1x1x{c}"
        same = f"[{ours}]" == shape
        matches += same
        lines.append(
            f"| {name} | {shape} | {printed} | {row.name} ({row.type}) | {'x'.join(map(str, row.output_shape))} | "
            f"{row.output_elements:,} | {'yes' if same else 'NO'} | {weights:,} | {row.params:,} |"
        )
    input_values = 224 * 224 * 3
    true_sum = input_values + sum(r.output_elements for r in rows)
    leaf_sum = report.output_elements_total
    train = estimate_memory(model, (1, 3, 224, 224), mode="train", name="VGG-16")
    train_sgd = estimate_memory(model, (1, 3, 224, 224), mode="train", optimizer="sgd", name="VGG-16")
    facts = {
        "matches": matches,
        "rows": len(rows),
        "params": report.parameter_count,
        "param_bytes": report.parameter_bytes,
        "true_sum": true_sum,
        "leaf_sum": leaf_sum,
        "saved": train.activation_bytes,
        "train_peak": train.peak_bytes,
        "train_sgd_peak": train_sgd.peak_bytes,
        "infer_peak": report.peak_bytes,
    }
    return lines, facts


def mri_section() -> dict:
    model = meta(memory_models.vgg16_mri)
    shape = (15, 5, 320, 320)
    one = estimate_memory(model, (1, 5, 320, 320), mode="infer", name="VGG-16 (5 sequences)")
    rows = [r for r in one.layers if r.type in ("Conv2d", "MaxPool2d", "Linear")]
    per_slice_values = 320 * 320 * 5 + sum(r.output_elements for r in rows)
    plain = estimate_memory(model, shape, mode="train", name="VGG-16 MRI")
    sgd = estimate_memory(model, shape, mode="train", optimizer="sgd", name="VGG-16 MRI")
    t0 = time.perf_counter()
    measured = measure_workload_subprocess(f"{MODELS}:vgg16_mri", shape, optimizer="sgd", warmup=False)
    return {
        "per_slice_values": per_slice_values,
        "plain": plain,
        "sgd": sgd,
        "measured": measured,
        "measure_seconds": time.perf_counter() - t0,
    }


def resnet_section() -> dict:
    shape = (1, 3, 8192, 8192)
    t0 = time.perf_counter()
    conventional = estimate_memory(
        meta(memory_models.resnet34_frozen_bn), shape, optimizer="sgd", name="ResNet-34"
    )
    t1 = time.perf_counter()
    streamed = estimate_memory(
        meta(memory_models.resnet34_streamed_1024), shape, optimizer="sgd", name="ResNet-34 streamed"
    )
    t2 = time.perf_counter()
    return {"conventional": conventional, "streamed": streamed, "t_conv": t1 - t0, "t_stream": t2 - t1}


def main() -> None:
    vgg_lines, vgg = vgg_section()
    mri = mri_section()
    res = resnet_section()
    sgd, plain = mri["sgd"], mri["plain"]
    err = 100 * (sgd.peak_bytes - mri["measured"]) / mri["measured"]
    seed = 916.5e6
    doc = f"""# Memory accounting

*Generated by `python benchmarks/memory_worked_example.py`; every number below is computed by that script, except
those quoted from BENCHMARKS.md and from the papers.*

How much memory will this network need on my scans, and will it fit? `tilegrad.estimate_memory` answers without
allocating anything: it runs the model on PyTorch **meta tensors** (shapes, no data) under a dispatch mode that
records every tensor storage created and freed, in forward, in the autograd engine's backward and in the optimizer
step. The highest total is the predicted peak. Nothing is modelled by hand except the scratch buffers CPU
convolution kernels allocate internally (NOTE [ CPU convolution workspaces ] in `tilegrad/memory/kernels.py`).

```python
import torch, torchvision, tilegrad

model = torchvision.models.resnet34()
report = tilegrad.estimate_memory(model, (8, 3, 224, 224), mode="train", optimizer="sgd")
print(report.table(max_rows=10))     # per-layer rows, totals in human units, where the peak happens
report.peak_bytes                    # bytes: parameters + gradients + optimizer state + input + activations
report.layers[0]                     # LayerMemory(name='conv1', type='Conv2d', output_shape=(8, 64, 112, 112), ...)
report.fits("8GiB")                  # True
report.plot("layers.png")            # per-layer bar chart (matplotlib)

# prove it: the real peak of the same step, in this process
def step():
    model = torchvision.models.resnet34()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(torch.randn(8, 3, 224, 224)).sum().backward()
    opt.step()
print(tilegrad.measure_peak_memory(step))   # CPU here; on a GPU: with tilegrad.PeakMemoryMeter("cuda") as m: ...
```

From the shell (`MODEL` is a torchvision name, a tilegrad model name, or `package.module:factory` /
`file.py:factory`):

```
tilegrad memory resnet34 --input 3x224x224 --batch 8 --optimizer sgd
tilegrad memory resnet34 --input 3x8192x8192 --budget 8GiB      # does not fit: the planner's tile, simulated
tilegrad memory resnet34 --input 3x8192x8192 --tile 1024 --json # the streamed peak
tilegrad memory benchmarks/memory_models.py:unet3d --input 1x128x128x128 --mode infer --plot unet.png
```

What `mode="train"` simulates is one *steady-state* training step: parameters, buffers and optimizer state from
the previous step are alive; then the input batch, forward, `loss = output.sum()` (or your `loss_fn`), backward,
`optimizer.step()`, `zero_grad(set_to_none=True)`. `mode="infer"` is one forward under `torch.no_grad()` in eval
mode. A `tilegrad.StreamingModule` inside the model is simulated tile by tile like everything else, so the report
gives the streamed peak for its tile size.

Per layer, `saved_bytes` is what autograd really keeps for backward while that layer runs
(`torch.autograd.graph.saved_tensors_hooks`), each storage counted once (an in-place ReLU's result is the
BatchNorm output the next convolution saves too), never parameters or the model input.

## Accuracy

Predicted against measured peaks for VGG-16, ResNet-34, DenseNet-121, MONAI's 2D and 3D U-Net and an ESPCN-style
3D network at two input sizes each, and for a streamed trunk: the table is in BENCHMARKS.md ("Issue 3: memory accounting", `python benchmarks/memory_accuracy.py`), next to torchinfo's estimate.
Measurements (`tilegrad.memory.workload.measure_workload_subprocess`) run in a fresh process per configuration
and read the resident high-water mark with glibc told to return freed blocks to the kernel
(`MALLOC_MMAP_THRESHOLD_`), the CPU analogue of CUDA's `max_memory_allocated`; under glibc's default policy the
process keeps freed heap memory and the high-water mark adds fragmentation (the benchmark shows how much).

Measuring in your own process is therefore not the same experiment. `tilegrad.measure_peak_memory` reads this
process's resident high-water mark; under glibc's default malloc (freed heap blocks kept, the mmap threshold raised
after large frees) that reading is 7% to 60% above the tensor-level prediction on BENCHMARKS.md's rows (last column;
one row +0%), while the controlled measurement is within 2.1%. The difference is fragmentation, not tensors. To
measure like the benchmark: a fresh process, `MALLOC_MMAP_THRESHOLD_=65536` in its environment (glibc reads it at
start-up, so setting `os.environ` inside a running Python does nothing), one warm-up step, then the measured one.
`tilegrad.memory.workload.measure_workload_subprocess("benchmarks/memory_models.py:resnet34", (2, 3, 128, 128),
optimizer="sgd")` does all of that; for your own script, `MALLOC_MMAP_THRESHOLD_=65536 python my_step.py`.
`measure_peak_memory` guesses the device from the tensors, modules and optimizers the function can reach and refuses
to guess when CUDA is initialised and there are none; `tilegrad.PeakMemoryMeter(device)` is the explicit form.

## 1. VGG-16 at 224x224x3, against the CS231n table

All {vgg["rows"]} rows of CS231n's per-layer table match ({vgg["matches"]} of {vgg["rows"]}): 3,211,264 values
("3.2M") after each 64-channel convolution, down to 1,000 class scores. Parameters: **{vgg["params"]:,}** (CS231n's
"138M"; its weight column leaves out the 13,416 biases).

{chr(10).join(vgg_lines)}

The sums:

- CS231n's rows add up to **{vgg["true_sum"]:,} values** (input included), i.e.
  {format_bytes(4 * vgg["true_sum"])} in float32 per image. The table's "TOTAL memory: 24M * 4 bytes ~= 93MB / image"
  overstates its own rows by {100 * (24e6 / vgg["true_sum"] - 1):.0f}%.
- torchvision's VGG-16 has separate ReLU modules, so the outputs of all leaf modules add up to
  {vgg["leaf_sum"]:,} values ({format_bytes(4 * vgg["leaf_sum"])}).
- What a training step really keeps for backward at batch 1: **{format_bytes(vgg["saved"])}** (each convolution
  saves its input, each ReLU its output, each max-pool its input and int64 indices). "x2 for backward" is not how
  backward works either: the training peak is {format_bytes(vgg["train_peak"])} without an optimizer,
  {format_bytes(vgg["train_sgd_peak"])} with SGD momentum, dominated by the {format_bytes(vgg["param_bytes"])} of
  parameters counted three times (weights, gradients, momentum). One forward pass in eval mode peaks at {format_bytes(vgg["infer_peak"])}.

## 2. The seed post: VGG-16 on a brain MRI

The post (n2value.com, 2016) feeds 5 MRI sequences at 320x320 into VGG-16 (D), sums the layer outputs to
"30.5MB" per slice at one byte per value, doubles it for backward (61 MB) and multiplies by 15 slices:
**916.5 MB, "about a gigabyte"**. Here the same network (first convolution taking 5 channels), 15 slices as a batch
of 15, one training step:

| | bytes |
|---|---:|
| seed post's estimate | {mb(seed)} |
| per-slice sum of layer outputs, values (the post's "30.5MB" at 1 byte each) | {mri["per_slice_values"]:,} |
| predicted training peak, gradients only (no optimizer) | {mb(plain.peak_bytes)} ({format_bytes(plain.peak_bytes)}) |
| predicted training peak, SGD with momentum | **{mb(sgd.peak_bytes)}** ({format_bytes(sgd.peak_bytes)}) |
| measured training peak, SGD with momentum | **{mb(mri["measured"])}** ({format_bytes(mri["measured"])}); prediction {err:+.1f}% |

(Measured in a fresh process without a warm-up run, so the figure includes the tens of MB that oneDNN and the
thread pool set up once per process.)

Why the seed is {sgd.peak_bytes / seed:.1f}x too low:

1. **Bytes per value.** Activations are float32: 4 bytes, not 1 ({mri["per_slice_values"]:,} values are
   {mb(4 * mri["per_slice_values"])} per slice, not 30.5 MB).
2. **What is kept is not "each output, twice".** Autograd saves {mb(sgd.activation_bytes)} for the batch
   ({mb(sgd.activation_bytes / 15)} per slice): convolution inputs, ReLU outputs, max-pool indices. Gradients of
   activations exist only transiently during backward; the peak adds the few that are alive at once, not a copy of
   everything.
3. **Parameters are missing.** 138 million float32 weights are {mb(sgd.parameter_bytes)}, their gradients another
   {mb(sgd.gradient_bytes)}, momentum another {mb(sgd.optimizer_bytes)} (Adam: twice that).
4. **Kernels need scratch space.** The CPU convolution kernels reorder inputs and outputs into blocked layouts;
   the peak is reached at {sgd.peak_at}.

## 3. ResNet-34 on an 8192x8192 slide patch

Training ResNet-34 conventionally on one 8192x8192 image (BatchNorm frozen, SGD with momentum) versus with its
trunk streamed by `tilegrad.StreamingModule(trunk, tile_size=1024)` (head conventional):

| | predicted peak | saved for backward | estimate took |
|---|---:|---:|---:|
| conventional | **{format_bytes(res["conventional"].peak_bytes)}** | {format_bytes(res["conventional"].activation_bytes)} | {res["t_conv"]:.1f} s |
| streamed, tile 1024 | **{format_bytes(res["streamed"].peak_bytes)}** | {format_bytes(res["streamed"].activation_bytes)} | {res["t_stream"]:.0f} s |

Streaming saves {format_bytes(res["conventional"].peak_bytes - res["streamed"].peak_bytes)} per image ({(res["conventional"].peak_bytes - res["streamed"].peak_bytes) / 1e9:.1f} GB in the paper's decimal units).
The streaming paper (Pinckaers et al., TPAMI 2020) reports "approximately 50GB of memory per image" saved at
8192x8192. That figure belongs to its own networks and training setup, measured on GPUs with its framework, and the
abstract does not break it down, so the two are not comparable term by term. What is counted here: the live
tensor bytes of one float32 training step on CPU (parameters, gradients, SGD momentum, the input, what autograd saves
for backward, the gradient buffers alive at once inside backward, and the CPU convolution kernels' scratch), for the
conventional step minus the streamed one. Not counted: a CUDA context, cuDNN workspaces, and memory a caching
allocator reserves but does not use or loses to fragmentation, all of which add to what a GPU measurement of the
conventional step shows. Streamed, autograd keeps almost nothing for backward:
the tiles are recomputed; what stays are the feature maps between the plan's segments. The streamed figure comes from simulating every tile of the forward pass and of
the recomputing backward on meta tensors (that is why it takes longer); the plan it simulated:

```
{chr(10).join(n.replace(";  ", chr(10) + "  ") for n in res["streamed"].notes)}
```

Neither figure is measured by this script: the conventional step needs more memory than this machine has, and the
streamed one takes about 8 minutes on 2 CPU cores. `benchmarks/streaming_resnet34.py --sizes 8192 --methods
stream1024` measures the streamed step (BENCHMARKS.md, issue 2: 2.36 GiB resident with tilegrad's allocator
policy); the memory-accuracy table there checks a streamed small CNN at 2048x2048 against its prediction.

## What the estimate does not see

- Allocator behaviour: rounding, caching and fragmentation (CUDA's caching allocator, glibc's heap). Leave
  headroom, or measure with `tilegrad.measure_peak_memory`.
- cuDNN workspaces (`device="cuda"`): chosen at run time by the algorithm search.
- Kernels whose internals differ by device: meta follows PyTorch's CPU composite paths (e.g. dropout keeps a float
  mask; CUDA's fused dropout a bool mask).
- Models that read tensor values (`.item()`, data-dependent shapes) cannot run on meta tensors; the error says so.
"""
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(doc)
    print(doc)


if __name__ == "__main__":
    main()
