"""Streamed head reductions: global pooling and gated attention-MIL as ordinary ``nn.Module`` s.

``head(features)`` on a whole (N, C, *spatial) feature map is the reference computation. The same modules can also
reduce a map that is never held whole, tile by tile (see NOTE [ Streamed heads ]): the streaming engine calls
:meth:`StreamedHead.partial` on each tile's disjoint output core and :meth:`StreamedHead.combine` on the list of
partials, and gets the same result as ``head(features)``.

>>> import torch
>>> head = AttentionMIL(8, hidden=4, classes=2)
>>> features = torch.randn(1, 8, 6, 10)
>>> left, right = features[..., :4], features[..., 4:]
>>> out = head.combine([head.partial(left), head.partial(right)])
>>> torch.allclose(out, head(features), atol=1e-6)
True

NOTE [ Streamed heads ]
~~~~~~~~~~~~~~~~~~~~~~~
A streamed head reduces all positions of one image to a vector. It implements three methods besides ``forward``:

* ``partial(core) -> tuple[Tensor, ...]``: small statistics of one tile's disjoint output core ``(N, C, *box)``.
  The cores of the tiles must partition the map (every position in exactly one core), in any order:

  - ``GlobalPool("max")``: ``(values,)``, the per-channel maximum ``(N, C)``; its gradient goes to the position of
    the maximum in the core (the first one in the core's raster order on a tie).
  - ``GlobalPool("avg")``: ``(sum, count)``: the per-channel sum ``(N, C)`` accumulated in float64 for float32 or
    float64 input (float32 for float16/bfloat16 input or on MPS), and the number of positions ``(N, 1)`` in the
    dtype of the result (the input's dtype, float32 for half inputs: counts are exact there).
  - ``AttentionMIL``: ``(m, s, v)``: ``m = max_i a_i`` ``(N, 1)`` over the core's attention logits, detached (the
    softmax does not depend on the shift, so ``m`` carries no gradient), ``s = sum_i exp(a_i - m)`` ``(N, 1)`` and
    ``v = sum_i exp(a_i - m) h_i`` ``(N, C)``.

* ``merge(partials) -> tuple``: one partial equivalent to a list of them (associative, differentiable): the max of
  the maxima, the sums of sums and counts, and for attention the running log-sum-exp ``M = max_t m_t``,
  ``S = sum_t s_t exp(m_t - M)``, ``V = sum_t v_t exp(m_t - M)``. Merges are computed in float64 for float32 and
  float64 partials and cast back to the partials' dtype. An engine may merge as it goes instead of keeping every
  tile's partial: ``merge([merge(a), merge(b)]) == merge(a + b)``.

* ``combine(partials) -> Tensor``: merges the list and finishes: ``(N, C)`` for pooling (``V / S`` pooled features
  through the classifier for attention, ``(N, classes)``). It is differentiable with respect to the partials and to
  the head's parameters. So the backward of a streamed head is: call ``combine`` on partials made leaves (no
  graph to the trunk), backpropagate the loss into them, then for each tile recompute ``partial(core)`` with a graph
  and push that tile's partial gradients into it (``torch.autograd.backward(partial, grads)``, skipping ``None``
  gradients such as ``m``'s); this yields the core's gradient and adds each tile's share to the head's parameter
  gradients (the classifier's share comes from ``combine``). The sum over tiles equals the gradient of
  ``head(features)``: exact, see tests/test_heads.py.

``AttentionMIL.logits(core)`` gives the attention logits ``(N, 1, *box)`` of a core, and
:func:`normalise_attention` turns them into the attention map ``softmax over all positions`` =
``exp(logit - M) / S`` with ``M, S`` from the merged partials, so the map can be written tile by tile.

Ties for ``max``: ``head(features)`` sends the gradient to the first maximum in raster order of the whole map; the
streamed form sends it to the first maximum (in its raster order) of the first tile in the partials list that holds
the maximum. The two differ only on exact ties between positions in different tiles, where both are valid
subgradients. ``torch.amax`` would split the gradient among ties instead; ``AdaptiveMaxPool`` picks one, as here.

Dropout (``AttentionMIL(dropout=p)`` in training mode) draws a mask per position: the streamed forward and the
recomputation of a tile in the backward must draw the same masks, so the engine restores the RNG state per tile
(as ``torch.utils.checkpoint`` does); the streamed result then equals ``head(features)`` in distribution, not
number for number (the masks of a whole map are drawn in a different order). Exactness tests use ``dropout=0`` or
eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, NotStreamableError, ShapeError

__all__ = [
    "STREAMED_HEADS",
    "AttentionMIL",
    "GlobalPool",
    "StreamedHead",
    "normalise_attention",
    "streamed_head",
]

Partial = tuple[Tensor, ...]

# What streamed_head() lists when it refuses a module.
STREAMED_HEADS = ('GlobalPool("max")', 'GlobalPool("avg")', "AttentionMIL")


class StreamedHead(nn.Module):
    """Base class of the heads that reduce a feature map tile by tile (NOTE [ Streamed heads ])."""

    def partial(self, core: Tensor) -> Partial:
        raise NotImplementedError

    def merge(self, partials: Sequence[Partial]) -> Partial:
        raise NotImplementedError

    def finish(self, merged: Partial) -> Tensor:
        raise NotImplementedError

    def combine(self, partials: Sequence[Partial]) -> Tensor:
        """The head's output from the partials of cores that partition the map (NOTE [ Streamed heads ])."""
        return self.finish(self.merge(partials))


def _spatial(core: Tensor, name: str) -> Tensor:
    """(N, C, *spatial) -> (N, C, P), a view when the core is contiguous channels-first."""
    if core.dim() < 3:
        raise ShapeError(
            f"{name} expects a feature map (N, C, *spatial) with at least one spatial axis, received shape "
            f"{tuple(core.shape)}; pass the trunk's output map, not pooled features"
        )
    return core.flatten(2)


def _merge_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _check_partials(partials: Sequence[Partial], length: int, name: str) -> None:
    if len(partials) == 0:
        raise ShapeError(f"{name}.combine needs the partials of at least one tile, received an empty list")
    for p in partials:
        if not isinstance(p, tuple) or len(p) != length:
            raise ShapeError(
                f"{name}.combine expects a list of {length}-tuples from {name}.partial, received an item of type "
                f"{type(p).__name__}" + (f" with {len(p)} entries" if isinstance(p, tuple) else "")
            )


class GlobalPool(StreamedHead):
    """Global max or average pooling over all spatial axes: (N, C, *spatial) -> (N, C).

    ``max`` sends the gradient to one position (the first maximum), as ``AdaptiveMaxPool`` does.

    >>> GlobalPool("avg")(torch.ones(2, 3, 4, 5, 6)).shape
    torch.Size([2, 3])
    """

    def __init__(self, mode: str = "max") -> None:
        super().__init__()
        if mode not in ("max", "avg"):
            raise ConfigError(f"GlobalPool mode must be 'max' or 'avg', received {mode!r}")
        self.mode = mode

    def extra_repr(self) -> str:
        return repr(self.mode)

    def forward(self, features: Tensor) -> Tensor:
        flat = _spatial(features, "GlobalPool")
        return flat.max(-1).values if self.mode == "max" else flat.mean(-1)

    def partial(self, core: Tensor) -> Partial:
        flat = _spatial(core, "GlobalPool")
        if self.mode == "max":
            return (flat.max(-1).values,)
        acc = _merge_dtype(core.dtype)
        if core.device.type == "mps":  # no float64 there
            acc = torch.float32
        out_dtype = core.dtype if core.dtype in (torch.float32, torch.float64) else torch.float32
        count = torch.full((core.shape[0], 1), flat.shape[-1], dtype=out_dtype, device=core.device)
        return (flat.sum(-1, dtype=acc), count)

    def merge(self, partials: Sequence[Partial]) -> Partial:
        _check_partials(partials, 1 if self.mode == "max" else 2, f'GlobalPool("{self.mode}")')
        if len(partials) == 1:
            return partials[0]
        if self.mode == "max":
            # torch.max over a dim returns the first maximum: the gradient goes to the first tile holding it.
            return (torch.stack([p[0] for p in partials]).max(0).values,)
        acc = _merge_dtype(partials[0][1].dtype)
        if partials[0][0].device.type == "mps":
            acc = torch.float32
        total = torch.stack([p[0].to(acc) for p in partials]).sum(0)
        count = torch.stack([p[1].to(acc) for p in partials]).sum(0).to(partials[0][1].dtype)
        return (total, count)

    def finish(self, merged: Partial) -> Tensor:
        if self.mode == "max":
            return merged[0]
        total, count = merged
        return (total / count.to(total.dtype)).to(count.dtype)


class AttentionMIL(StreamedHead):
    """Gated attention multiple-instance pooling (Ilse et al. 2018; CLAM, StreamingCLAM) and a linear classifier.

    For each position ``h_i`` (C channels) of one image, ``a_i = w^T (tanh(V h_i) * sigmoid(U h_i))`` (ungated:
    ``w^T tanh(V h_i)``), attention ``softmax_i(a_i)`` over all positions, ``pooled = sum_i softmax_i h_i``, output
    ``classifier(pooled)``: (N, C, *spatial) -> (N, classes). Dropout, when given, acts on the tanh and sigmoid
    branches as in CLAM.

    The per-position layers run as matrix products on a channels-last *view* of the contiguous channels-first map
    (no copy, no 1x1 convolution: faster on CPU, and exactly the same arithmetic).

    >>> head = AttentionMIL(16, hidden=8, classes=3)
    >>> head(torch.randn(2, 16, 5, 7)).shape
    torch.Size([2, 3])
    >>> round(head.attention(torch.randn(1, 16, 5, 7)).sum().item(), 5)
    1.0
    """

    def __init__(
        self, in_features: int, hidden: int = 128, classes: int = 2, gated: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("hidden", hidden), ("classes", classes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"AttentionMIL {name} must be a positive int, received {value!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"AttentionMIL dropout must be in [0, 1), received {dropout!r}")
        self.in_features = in_features
        self.gated = bool(gated)
        self.attention_v = nn.Linear(in_features, hidden)
        self.attention_u = nn.Linear(in_features, hidden) if gated else None
        # No bias: a constant added to every logit cancels in the softmax (and would get no gradient).
        self.attention_w = nn.Linear(hidden, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_features, classes)

    def _logits_flat(self, flat: Tensor) -> Tensor:
        """(N, C, P) -> attention logits (N, P, 1)."""
        if flat.shape[1] != self.in_features:
            raise ShapeError(
                f"AttentionMIL({self.in_features}, ...) expects {self.in_features} channels, received a map of "
                f"shape {tuple(flat.shape)}; build the head with in_features = the trunk's output channels"
            )
        rows = flat.transpose(1, 2)  # (N, P, C): a view; F.linear multiplies it without copying
        hidden = self.dropout(torch.tanh(F.linear(rows, self.attention_v.weight, self.attention_v.bias)))
        if self.attention_u is not None:
            gate = torch.sigmoid(F.linear(rows, self.attention_u.weight, self.attention_u.bias))
            hidden = hidden * self.dropout(gate)
        return F.linear(hidden, self.attention_w.weight)

    def logits(self, core: Tensor) -> Tensor:
        """Attention logits of a map or a tile's core: (N, C, *box) -> (N, 1, *box)."""
        flat = _spatial(core, "AttentionMIL")
        return self._logits_flat(flat).transpose(1, 2).reshape(core.shape[0], 1, *core.shape[2:])

    def attention(self, features: Tensor) -> Tensor:
        """The attention map of a whole map: softmax of the logits over all positions, (N, 1, *spatial)."""
        a = self.logits(features)
        return torch.softmax(a.flatten(2), dim=-1).reshape(a.shape)

    def forward(self, features: Tensor) -> Tensor:
        flat = _spatial(features, "AttentionMIL").contiguous()
        weights = torch.softmax(self._logits_flat(flat), dim=1)  # (N, P, 1)
        pooled = torch.bmm(flat, weights).squeeze(-1)  # (N, C)
        return self.classifier(pooled)

    def partial(self, core: Tensor) -> Partial:
        flat = _spatial(core, "AttentionMIL").contiguous()
        a = self._logits_flat(flat)  # (N, P, 1)
        m = a.detach().amax(1)  # (N, 1): a shift, no gradient (NOTE [ Streamed heads ])
        e = torch.exp(a - m.unsqueeze(1))
        return (m, e.sum(1), torch.bmm(flat, e).squeeze(-1))

    def merge(self, partials: Sequence[Partial]) -> Partial:
        return _merge_attention(partials)

    def finish(self, merged: Partial) -> Tensor:
        _, s, v = merged
        return self.classifier(v / s)


def _merge_attention(partials: Sequence[Partial]) -> Partial:
    """The running log-sum-exp of attention partials (NOTE [ Streamed heads ])."""
    _check_partials(partials, 3, "AttentionMIL")
    if len(partials) == 1:
        return partials[0]
    dtype = partials[0][2].dtype
    acc = torch.float32 if partials[0][2].device.type == "mps" else _merge_dtype(dtype)
    ms = torch.stack([p[0].detach().to(acc) for p in partials])  # (T, N, 1)
    big_m = ms.amax(0)
    scale = torch.exp(ms - big_m)  # (T, N, 1), <= 1
    s = (torch.stack([p[1].to(acc) for p in partials]) * scale).sum(0)
    v = (torch.stack([p[2].to(acc) for p in partials]) * scale).sum(0)
    return (big_m.to(dtype), s.to(dtype), v.to(dtype))


def normalise_attention(logits: Tensor, partials: Sequence[Partial] | Partial) -> Tensor:
    """Attention weights of a tile from its logits: ``exp(logits - M) / S`` (NOTE [ Streamed heads ]).

    ``logits`` are :meth:`AttentionMIL.logits` of a core (N, 1, *box); ``partials`` are the partials of all tiles
    of the map (a list), or one already merged ``(M, S, V)`` (cheaper when many tiles are normalised). The weights
    over all tiles sum to 1 per image and equal ``head.attention(features)`` at those positions.
    """
    merged = partials if isinstance(partials, tuple) else _merge_attention(partials)
    big_m, s = merged[0], merged[1]
    shape = (logits.shape[0],) + (1,) * (logits.dim() - 1)
    return torch.exp(logits - big_m.reshape(shape)) / s.reshape(shape)


def streamed_head(module: nn.Module) -> StreamedHead:
    """``module`` if it reduces a feature map tile by tile (NOTE [ Streamed heads ]); otherwise NotStreamableError.

    >>> streamed_head(GlobalPool("max"))
    GlobalPool('max')
    """
    if isinstance(module, StreamedHead):
        return module
    name = type(module).__name__
    raise NotStreamableError(
        f"the head {name} is not one of the streamed reductions ({', '.join(STREAMED_HEADS)}): a streamed trunk "
        f"never holds its output map whole, so only these heads can reduce it tile by tile. Use one of them "
        f"(tilegrad.heads), or stream the trunk alone and apply {name} to its output"
    )
