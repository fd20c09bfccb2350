"""Halo recomputation against halo reuse (line buffers) for a ResNet-34 first-stage trunk (issue 11, item 2).

Streaming recomputes each tile's halo: neighbouring tiles read overlapping input boxes and every layer computes
the overlap again. Halide's sliding-window schedules avoid that with line buffers: tiles are visited in raster
order and each layer keeps the last columns of its input that the next tile needs, so a column is computed once
along a row of tiles (the rows of the halo above and below are still recomputed).

For torchvision ResNet-34's conv1, bn1, relu, maxpool, layer1 (eval mode) on a --size^2 float32 input on the CPU:

1. the fraction of recomputed work per tile size: overlap = sum of the tiles' input areas / image area (from
   tilegrad.tiling.tile_grid and tilegrad.geometry.module_geometry), and the part of it a line buffer along rows
   removes (what remains is the vertical overlap: sum of the tile rows' input heights / image height);
2. measured (each run's minimum over --repeat interleaved runs, and the plain forward of the whole image for
   reference): a tiled forward with halos (each tile runs the trunk on its input box, the core is cropped out) and
   the same forward with line buffers (implemented here only: each layer runs as a valid convolution on the
   strip's rows, padded at the image border only, and keeps the columns of its input that are still needed; a
   residual block keeps its input columns until the add). Both produce the trunk's output; the script first checks
   both against the plain forward in float64 on a small image.

One thread by default: on a machine whose 2 cores are shared with other jobs, 2 threads made a 256^2 tile take
0.9 s instead of 0.09 s (the threads wait for each other at every small op), which buries what is measured here.

Run:

    python benchmarks/halo_reuse.py --size 4096 --tiles 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tilegrad.geometry import module_geometry
from tilegrad.tiling import tile_grid


def trunk() -> nn.Sequential:
    m = torchvision.models.resnet34()
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1).eval()


# ---- tiles with halos -------------------------------------------------------------------------------------------


def grid_of(net: nn.Module, size: int, tile: int):
    geometry = module_geometry(net, 2)
    out = copy.deepcopy(net).to("meta")(torch.zeros(1, 3, size, size, device="meta")).shape[2:]
    return tile_grid(geometry, (size, size), tuple(out), (tile, tile)), tuple(out)


@torch.no_grad()
def halo_forward(net: nn.Module, x: torch.Tensor, grid, out_hw) -> torch.Tensor:
    out = None
    for t in grid:
        y = net(x[(slice(None), slice(None), *t.inputs)])
        if out is None:
            out = x.new_empty((x.shape[0], y.shape[1], *out_hw))
        out[(slice(None), slice(None), *t.outputs)] = y[(slice(None), slice(None), *t.crop)]
    return out


# ---- line buffers -----------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """Rows [r0, r1) and columns [c0, c1) of one layer's map, in that map's global coordinates."""

    data: torch.Tensor
    r0: int
    r1: int
    c0: int
    c1: int


class Window:
    """A convolution or pooling (square kernel k, stride s, padding p) fed column chunks of a strip of rows."""

    def __init__(self, fn, k: int, s: int, p: int, pad_value: float = 0.0) -> None:
        self.fn, self.k, self.s, self.p, self.pad_value = fn, k, s, p, pad_value

    def reset(self, hw: tuple[int, int]) -> tuple[int, int]:
        self.hw, self.carry, self.carry_c0, self.next_j = hw, None, 0, 0
        return tuple((n + 2 * self.p - self.k) // self.s + 1 for n in hw)

    def push(self, c: Chunk) -> Chunk | None:
        k, s, p = self.k, self.s, self.p
        top, bottom = (p if c.r0 == 0 else 0), (p if c.r1 == self.hw[0] else 0)
        left, right = (p if c.c0 == 0 else 0), (p if c.c1 == self.hw[1] else 0)
        x = c.data
        if top or bottom or left or right:  # zero (or -inf) padding only where the image ends
            x = F.pad(x, (left, right, top, bottom), value=self.pad_value)
        R0, R1, C0, C1 = c.r0 - top, c.r1 + bottom, c.c0 - left, c.c1 + right
        if self.carry is not None:
            x, C0 = torch.cat([self.carry, x], dim=3), self.carry_c0
        jr0, jr1 = -(-(R0 + p) // s), (R1 + p - k) // s + 1
        jc0, jc1 = self.next_j, (C1 + p - k) // s + 1
        keep = max(jc0, jc1) * s - p  # the first input column a later output needs
        assert C0 <= keep <= C1, (C0, keep, C1)  # k >= s
        self.carry, self.carry_c0 = x[..., keep - C0 :], keep
        if jc1 <= jc0:
            return None
        self.next_j = jc1
        rows = slice(jr0 * s - p - R0, (jr1 - 1) * s - p + k - R0)
        cols = slice(jc0 * s - p - C0, (jc1 - 1) * s - p + k - C0)
        return Chunk(self.fn(x[:, :, rows, cols]), jr0, jr1, jc0, jc1)


class Pointwise:
    def __init__(self, fn) -> None:
        self.fn = fn

    def reset(self, hw):
        return hw

    def push(self, c: Chunk) -> Chunk:
        return Chunk(self.fn(c.data), c.r0, c.r1, c.c0, c.c1)


class Residual:
    """relu(branch(x) + x) with the block input kept until the branch's output columns catch up."""

    def __init__(self, branch: list) -> None:
        self.branch = branch

    def reset(self, hw):
        for op in self.branch:
            hw_out = op.reset(hw)
            assert hw_out == hw  # layer1's blocks keep the size
        self.x, self.x_c0 = None, 0
        return hw

    def push(self, c: Chunk) -> Chunk | None:
        if self.x is None:
            self.x, self.x_c0, self.x_r0 = c.data, c.c0, c.r0
        else:
            self.x = torch.cat([self.x, c.data], dim=3)
        y: Chunk | None = c
        for op in self.branch:
            y = op.push(y)
            if y is None:
                return None
        rows = slice(y.r0 - self.x_r0, y.r1 - self.x_r0)
        out = (y.data + self.x[:, :, rows, y.c0 - self.x_c0 : y.c1 - self.x_c0]).relu_()
        self.x, self.x_c0 = self.x[..., y.c1 - self.x_c0 :], y.c1
        return Chunk(out, y.r0, y.r1, y.c0, y.c1)


def _conv(conv: nn.Conv2d) -> Window:
    (k, _), (s, _), (p, _) = conv.kernel_size, conv.stride, conv.padding
    return Window(lambda x: F.conv2d(x, conv.weight, conv.bias, s), k, s, p)


def _bn(bn: nn.BatchNorm2d) -> Pointwise:
    return Pointwise(
        lambda x: F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0, bn.eps)
    )


def line_ops(net: nn.Sequential) -> list:
    conv1, bn1, _, pool, layer1 = net
    ops = [_conv(conv1), _bn(bn1), Pointwise(F.relu_)]
    ops.append(Window(lambda x: F.max_pool2d(x, pool.kernel_size, pool.stride), pool.kernel_size, pool.stride,
                      pool.padding, float("-inf")))  # fmt: skip
    for block in layer1:
        assert block.downsample is None
        branch = [_conv(block.conv1), _bn(block.bn1), Pointwise(F.relu_), _conv(block.conv2), _bn(block.bn2)]
        ops.append(Residual(branch))
    return ops


@torch.no_grad()
def line_forward(net: nn.Sequential, x: torch.Tensor, grid, out_hw) -> torch.Tensor:
    """Rows of tiles from the grid (their input rows, halo included); along a row, each tile feeds only the input
    columns the previous one did not, and every layer reuses the columns it kept."""
    ops = line_ops(net)
    rows_spans, cols_spans = grid.spans
    out = None
    for rs in rows_spans:
        hw = x.shape[2:]
        for op in ops:
            hw = op.reset(hw)
        start = 0
        for cs in cols_spans:
            y: Chunk | None = Chunk(x[:, :, rs.in_start : rs.in_stop, start : cs.in_stop], rs.in_start,
                                    rs.in_stop, start, cs.in_stop)  # fmt: skip
            start = cs.in_stop
            for op in ops:
                y = op.push(y)
                if y is None:
                    break
            if y is None:
                continue
            if out is None:
                out = x.new_empty((x.shape[0], y.data.shape[1], *out_hw))
            core = slice(max(rs.out_start, y.r0), min(rs.out_stop, y.r1))
            out[:, :, core, y.c0 : y.c1] = y.data[:, :, core.start - y.r0 : core.stop - y.r0]
    return out


# ---- the measurement --------------------------------------------------------------------------------------------


def check(net: nn.Sequential) -> None:
    """Both tiled forwards equal the plain one (float64, a small odd-sized image, tiles of two sizes)."""
    net64 = trunk().double()
    net64.load_state_dict(net.state_dict())
    for m in net64.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    net64.eval()
    x = torch.randn(1, 3, 136, 152, dtype=torch.float64)
    with torch.no_grad():
        ref = net64(x)
    for tile in (64, 96):
        geometry = module_geometry(net64, 2)
        grid = tile_grid(geometry, x.shape[2:], ref.shape[2:], (tile, tile))
        for fn in (halo_forward, line_forward):
            got = fn(net64, x, grid, ref.shape[2:])
            err = (got - ref).abs().max().item()
            assert err < 1e-10, (fn.__name__, tile, err)
    print("check: halo and line-buffer forwards equal the plain forward (float64, 136x152, tiles 64 and 96)")


@torch.no_grad()
def plain_forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net(x)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tiles", type=int, nargs="+", default=[256, 384, 512, 768, 1024, 1536, 2048])
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per method (interleaved); the minimum counts"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: see the note in the docstring)"
    )
    parser.add_argument("--no-time", action="store_true", help="only the overlap table")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    net = trunk()
    start = time.perf_counter()
    check(net)
    print(f"(check took {time.perf_counter() - start:.1f} s)")
    size = args.size
    x = torch.randn(1, 3, size, size)
    print(f"ResNet-34 conv1..layer1, {size}^2 float32, {torch.get_num_threads()} threads")
    print(
        "| tile | tiles | overlap (recomputed work) | left after a line buffer along rows | "
        "halo time (s) | line-buffer time (s) | halo / line | bound: overlap / vertical overlap |"
    )
    print("|---|---|---|---|---|---|---|---|")
    plain = math.inf
    if not args.no_time:  # warm-up
        grid, out_hw = grid_of(net, 512, 256)
        halo_forward(net, x[:, :, :512, :512], grid, out_hw)
        line_forward(net, x[:, :, :512, :512], grid, out_hw)
    for tile in args.tiles:
        grid, out_hw = grid_of(net, size, tile)
        overlap = grid.input_area / size**2
        vertical = sum(s.in_length for s in grid.spans[0]) / size
        cells = [f"{tile}", f"{len(grid)}", f"x{overlap:.3f}", f"x{vertical:.3f}"]
        if args.no_time:
            cells += ["-", "-", "-"]
        else:
            halo, line = math.inf, math.inf
            for _ in range(args.repeat):
                halo = min(halo, timed(halo_forward, net, x, grid, out_hw))
                line = min(line, timed(line_forward, net, x, grid, out_hw))
                plain = min(plain, timed(plain_forward, net, x))
            cells += [f"{halo:.2f}", f"{line:.2f}", f"{halo / line:.3f}"]
        cells.append(f"{overlap / vertical:.3f}")
        print("| " + " | ".join(cells) + " |", flush=True)
    if not args.no_time:
        print(f"plain forward of the whole image (no tiles): {plain:.2f} s (minimum over all runs above)")


if __name__ == "__main__":
    main()
