"""What :func:`tilegrad.estimate_memory` returns, and its human forms: a table, JSON, a per-layer bar chart.

matplotlib is imported lazily, only by :meth:`MemoryReport.plot`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MissingDependencyError
from ..units import format_bytes, parse_bytes

__all__ = ["LayerMemory", "MemoryReport", "format_count"]


def format_count(n: int) -> str:
    """Format an element or parameter count the way papers do.

    >>> format_count(3_211_264)
    '3.21M'
    >>> format_count(138_357_544)
    '138.36M'
    >>> format_count(512)
    '512'
    """
    for unit, size in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


@dataclass(frozen=True)
class LayerMemory:
    """One row of a memory report: a leaf module, or a container's own functional ops (``leaf=False``).

    ``output_elements`` and ``output_bytes`` add up every call of the module (a ReLU used twice in a block counts
    both outputs); ``output_shape`` is the first call's. ``saved_bytes`` counts the storages that autograd saved
    for backward while this module ran, each storage once over the whole model, never parameters or the model input.
    """

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    output_elements: int
    output_bytes: int
    params: int
    saved_bytes: int
    calls: int = 1
    leaf: bool = True


@dataclass(frozen=True)
class MemoryReport:
    """Predicted memory of one model at one input size. Every figure is in bytes unless named ``*_count``.

    ``peak_bytes`` is the highest total of live tensors during a steady-state training step (forward, backward and
    optimizer step, with optimizer state from the previous step alive) in ``mode="train"``, or during one forward
    pass under ``torch.no_grad()`` in ``mode="infer"``. It includes parameters, buffers, the input batch,
    gradients and optimizer state: all of it must fit on the device. ``peak_at`` says where the peak happens.
    """

    model: str
    input_shape: tuple[int, ...]
    mode: str
    dtype: str
    optimizer: str | None
    layers: tuple[LayerMemory, ...]
    parameter_count: int
    parameter_bytes: int
    buffer_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    input_bytes: int
    activation_bytes: int
    output_bytes: int
    forward_peak_bytes: int
    peak_bytes: int
    peak_at: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def output_elements_total(self) -> int:
        """Sum of the output elements of every leaf module (the "per-layer sum" of back-of-envelope counts)."""
        return sum(row.output_elements for row in self.layers if row.leaf)

    def fits(self, budget: int | float | str) -> bool:
        """Whether ``peak_bytes`` fits a budget such as ``"8GiB"``."""
        return self.peak_bytes <= parse_bytes(budget)

    # ---- forms ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (ints, strings, lists) for JSON."""
        out = asdict(self)
        out["input_shape"] = list(self.input_shape)
        out["layers"] = [
            {**asdict(row), "output_shape": None if row.output_shape is None else list(row.output_shape)}
            for row in self.layers
        ]
        out["notes"] = list(self.notes)
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def totals(self) -> list[tuple[str, int]]:
        rows = [
            ("parameters", self.parameter_bytes),
            ("buffers", self.buffer_bytes),
            ("input", self.input_bytes),
        ]
        if self.mode == "train":
            rows += [
                ("gradients", self.gradient_bytes),
                ("optimizer state", self.optimizer_bytes),
                ("activations saved for backward", self.activation_bytes),
            ]
        rows += [("output", self.output_bytes), ("forward peak", self.forward_peak_bytes)]
        rows.append(("PEAK (train step)" if self.mode == "train" else "PEAK (forward)", self.peak_bytes))
        return rows

    def table(self, max_rows: int | None = None) -> str:
        """The per-layer table and totals in human units."""
        head = ("layer", "type", "output shape", "outputs", "params", "saved for bwd")
        body = []
        rows = self.layers if max_rows is None or len(self.layers) <= max_rows else self.layers[:max_rows]
        for row in rows:
            shape = "-" if row.output_shape is None else "x".join(str(s) for s in row.output_shape)
            name = row.name or "(model)"
            if not row.leaf:
                name += " (own ops)"
            if row.calls > 1:
                shape += f" (x{row.calls})"
            body.append(
                (
                    name,
                    row.type,
                    shape,
                    format_count(row.output_elements) if row.leaf else "-",
                    format_count(row.params) if row.params else "-",
                    format_bytes(row.saved_bytes) if row.saved_bytes else "-",
                )
            )
        widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [
            f"{self.model}: input {'x'.join(map(str, self.input_shape))} {self.dtype}, mode={self.mode}"
            + (f", optimizer={self.optimizer or 'none'}" if self.mode == "train" else ""),
            fmt.format(*head),
            fmt.format(*("-" * w for w in widths)),
        ]
        lines += [fmt.format(*r) for r in body]
        if len(rows) < len(self.layers):
            lines.append(f"... {len(self.layers) - len(rows)} more layers (use --json for all)")
        lines.append("")
        lines.append(
            f"parameters: {self.parameter_count:,}   per-layer outputs: {self.output_elements_total:,} values"
        )
        label_width = max(len(label) for label, _ in self.totals())
        for label, value in self.totals():
            lines.append(f"{label:<{label_width}}  {format_bytes(value):>12}")
        lines.append(f"peak reached at: {self.peak_at}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | Path) -> Path:
        """Write a per-layer bar chart (bytes saved for backward and output bytes per layer) to ``path`` (``.png``
        is added when it has no suffix) and return the path written."""
        try:
            import matplotlib
        except ImportError as err:
            raise MissingDependencyError(
                "MemoryReport.plot needs matplotlib, which is not installed: pip install 'tilegrad[plot]'"
            ) from err

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        rows = [r for r in self.layers if r.leaf or r.saved_bytes]
        names = [r.name or "(model)" for r in rows]
        mib = 1024**2
        saved = [r.saved_bytes / mib for r in rows]
        outputs = [r.output_bytes / mib for r in rows]
        height = max(4.0, 0.18 * len(rows) + 1.5)
        fig, ax = plt.subplots(figsize=(10, height))
        ys = range(len(rows))
        ax.barh([y - 0.2 for y in ys], outputs, height=0.4, label="output (all calls)")
        ax.barh([y + 0.2 for y in ys], saved, height=0.4, label="saved for backward")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(names, fontsize=6 if len(rows) > 40 else 8)
        ax.invert_yaxis()
        ax.set_xlabel("MiB")
        ax.set_title(
            f"{self.model} {'x'.join(map(str, self.input_shape))} {self.mode}: "
            f"peak {format_bytes(self.peak_bytes)}"
        )
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = Path(path)
        if not path.suffix:  # matplotlib would append .png itself; name the file that is really written
            path = path.with_suffix(".png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
