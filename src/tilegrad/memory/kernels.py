"""Scratch memory that CPU kernels allocate inside one op, invisible to a dispatch mode: convolution workspaces.

NOTE [ CPU convolution workspaces ]
PyTorch picks a CPU convolution kernel per call (``torch._C._select_conv_backend``; the choice depends on batch
size, channels, kernel size, dtype and ``torch.get_num_threads()``), and each kernel allocates scratch buffers
below the dispatcher, freed before the op returns. They are transient, but they add to the peak at that op, and
for the unfold-based kernels they are large: ``C_in x k^d`` times the output positions, i.e. 27x the input of a
3x3x3 convolution. Rules below were calibrated on this machine's PyTorch by measuring single ops with
:func:`tilegrad.measure_peak_memory` (script: benchmarks/memory_kernel_calibration.py):

==================  ==============================================  ==============================================
backend             forward scratch                                 backward scratch
==================  ==============================================  ==============================================
Slow2d / Slow3d     N x C_in/g x prod(k) x prod(out) elements       same (the unfolded input is rebuilt)
(unfold, im2col)    (none for 1x1, stride 1, no padding)
SlowDilated2d/3d    same as Slow
SlowTranspose2d/3d  C_out x prod(k) x prod(in) (one sample at once;  same (one sample at once)
                    2D forward: N samples at once)
Mkldnn (oneDNN)     max(input*, output) bytes (layout reorders)     input + output (strided: max of that and
                    (channels padded to the 16- or 8-block;         2 x input); without grad_input: input* + output
                    input* = 0 when C_in < block: read in place)
Mkldnn transposed   max(input, 2 x output) bytes                    input + output bytes
==================  ==============================================  ==============================================

Every kernel also copies a non-contiguous input or gradient (e.g. the expanded gradient of ``sum`` arriving
through a view) into a contiguous buffer first. On CUDA the workspace depends on the cuDNN algorithm chosen at
run time and is not modelled.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["CONV_BACKWARD", "channel_block", "conv_workspace_bytes", "select_conv_backend"]

_aten = torch.ops.aten
_CONV = _aten.convolution.default
CONV_BACKWARD = _aten.convolution_backward.default  # the op whose workspace conv_workspace_bytes also prices


def _probe(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor with t's shape and dtype that owns no memory (stride 0), for backend selection only."""
    return torch.empty((), dtype=t.dtype).expand(t.shape)


def select_conv_backend(
    x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, transposed, output_padding, groups
):
    """The CPU kernel (``torch._C._ConvBackend``) PyTorch would pick for a convolution of ``x`` (meta or real) by
    ``w`` with these settings (NOTE [ CPU convolution workspaces ]); nothing is computed or allocated. None when
    ``x`` is too small for the kernel, so that no convolution runs on it (the planner asks about the box of a small
    tile at a deep scale: timm's NASNet crashed planning there)."""
    if not transposed:
        span = [d * (k - 1) + 1 for d, k in zip(dilation, w.shape[2:])]
        if any(n + 2 * p < s for n, p, s in zip(x.shape[2:], padding, span)):
            return None
    return torch._C._select_conv_backend(
        _probe(x),
        _probe(w),
        None,
        list(stride),
        list(padding),
        list(dilation),
        bool(transposed),
        list(output_padding),
        int(groups),
        None,
    )


def _bytes(shape, itemsize: int) -> int:
    return math.prod(shape) * itemsize


def conv_workspace_bytes(
    func: Any, args: tuple, kwargs: dict | None = None, *, onednn_forward: bool = False
) -> int:
    """Scratch bytes a CPU convolution op allocates internally (NOTE [ CPU convolution workspaces ]); 0 otherwise.
    ``onednn_forward``: a forward PyTorch would run on the unfold kernel runs on oneDNN instead (the streamed
    engine's float32 convolutions: NOTE [ Small-tile convolutions on oneDNN ] in execute.py).

    >>> import torch
    >>> x = torch.empty(1, 2, 48, 48, 48, device="meta"); w = torch.empty(2, 2, 3, 3, 3, device="meta")
    >>> conv_workspace_bytes(torch.ops.aten.convolution.default,
    ...                      (x, w, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], False, [0, 0, 0], 1))  # 2*27*48^3*4
    23887872
    """
    if func is _CONV:
        x, w, _bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
        grad_out = None
        backward = False
    elif func is CONV_BACKWARD:
        grad_out, x, w, _bias_sizes, stride, padding, dilation, transposed, output_padding, groups = args[:10]
        backward = True
    else:
        return 0
    if x.dim() not in (4, 5) or not x.dtype.is_floating_point:
        return 0
    backend = select_conv_backend(x, w, stride, padding, dilation, transposed, output_padding, groups)
    if backend is None:  # no convolution runs on an input this small
        return 0
    name = backend.name if hasattr(backend, "name") else str(backend).rsplit(".", 1)[-1]
    if onednn_forward and not backward and not transposed and name in ("Slow2d", "Slow3d"):
        name = "Mkldnn"
    itemsize = x.element_size()
    spatial_in = tuple(x.shape[2:])
    kernel = tuple(w.shape[2:])
    nd = len(kernel)
    if transposed:
        out_sp = tuple(
            (spatial_in[i] - 1) * stride[i]
            - 2 * padding[i]
            + dilation[i] * (kernel[i] - 1)
            + output_padding[i]
            + 1
            for i in range(nd)
        )
        c_out = w.shape[1] * groups
    else:
        out_sp = tuple(
            (spatial_in[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
            for i in range(nd)
        )
        c_out = w.shape[0]
    n = x.shape[0]
    in_bytes = x.numel() * itemsize
    out_bytes = n * c_out * math.prod(out_sp) * itemsize
    # Every kernel first makes strided inputs contiguous, e.g. the expanded gradient of a sum through a view.
    copies = sum(t.numel() * itemsize for t in (x, grad_out) if t is not None and not t.is_contiguous())
    need_grad_input = bool(args[10][0]) if backward and len(args) > 10 else True
    # fmt: off
    return copies + _scratch(name, int(backend), backward, need_grad_input, n, x, w, kernel, stride, padding,
                             spatial_in, out_sp, c_out, in_bytes, out_bytes, itemsize)
    # fmt: on


def channel_block() -> int:
    """oneDNN's channel block on this CPU: 16 with AVX-512, else 8 (its blocked layouts pad channels to it)."""
    return 16 if "AVX512" in torch.backends.cpu.get_cpu_capability() else 8


def _padded(channels: int, block: int) -> int:
    return -(-channels // block) * block


# fmt: off
def _scratch(name, backend_id, backward, args_need_grad_input, n, x, w, kernel, stride, padding, spatial_in, out_sp,
             c_out, in_bytes, out_bytes, itemsize) -> int:
    # fmt: on
    if name in ("Slow2d", "Slow3d", "SlowDilated2d", "SlowDilated3d"):
        pointwise = all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding)
        if pointwise:
            return 0
        return _bytes((n, w.shape[1], *kernel, *out_sp), itemsize)
    if name in ("SlowTranspose2d", "SlowTranspose3d"):
        # the 2D forward unfolds the whole batch at once (PyTorch 2.14: 3.1 / 6.3 / 12.5 MiB at N = 1 / 2 / 4 for a
        # 32->16 4x4 transposed convolution of 40^2, float64); its backward and the 3D kernel one sample at a time
        per_sample = _bytes((c_out, *kernel, *spatial_in), itemsize)
        return n * per_sample if name == "SlowTranspose2d" and not backward else per_sample
    if name == "Mkldnn":
        # oneDNN computes in channel-blocked layouts (nChw16c): reorder buffers for the source and the result, with
        # channels padded up to the block. Inputs with few channels (first layers) are read in place.
        block = channel_block()
        padded_in = _padded(x.shape[1], block) * (in_bytes // max(1, x.shape[1]))
        padded_out = _padded(c_out, block) * (out_bytes // max(1, c_out))
        src = padded_in if x.shape[1] >= block else 0
        if not backward:
            return max(src, padded_out)
        if not args_need_grad_input:
            return src + padded_out
        if any(s > 1 for s in stride):  # strided: the blocked gradient of the input and its reorder
            return max(padded_in + padded_out, 2 * padded_in)
        return padded_in + padded_out
    if backend_id == 9:  # MkldnnTranspose: the enum member prints as '???' in some PyTorch builds
        return in_bytes + out_bytes if backward else max(in_bytes, 2 * out_bytes)
    return 0
