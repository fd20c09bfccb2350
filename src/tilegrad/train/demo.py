"""The end-to-end demo: synthetic whole slides whose lesions only exist at full resolution.

Tissue texture comes from a real histology image that ships with scikit-image
(``skimage.data.immunohistochemistry()``, a 512x512 IHC-stained colon section), mirrored and re-oriented to fill
each slide, cut into blob-shaped tissue on a bright background. Positive slides carry 10 to 20 tiny lesions
(``LESIONS_PER_SLIDE``; fewer when the tissue has no room for them): clusters of 2x2-pixel dark "nuclei" on a
4-pixel lattice, about 24-40 pixels across.

NOTE [ Lesions vanish at 8x ]: a lesion is the texture plus a pattern whose mean over every aligned 8x8 block is
exactly zero (dots of -3a/4 on a +a/4 surround, covering whole 8x8 blocks), and the texture is compressed so that no
pixel clips. Averaging 8x8 blocks -- downsampling the slide 8x -- therefore removes the lesion completely, up to the
rounding to 8-bit pixels (< 0.5 grey levels). A model that sees the 8x-downsampled slide cannot do better than
chance; one that sees full resolution can find the lesions.

The demo trains the same small CNN (:func:`tilegrad.models.small_cnn` + global max pooling) twice: streamed
on the full-resolution slides and conventionally on the 8x-downsampled ones, then reports both validation AUCs,
memory, saliency maps and learning curves.

Memory: the peak of one streamed training step is measured on a demo slide, next to the conventional peak that
:func:`tilegrad.estimate_memory` predicts for the same slide. At the demo's small size the difference is modest (the
tile is a quarter of the slide's side); the same two figures are therefore also predicted for a whole slide of
``DemoSettings.whole_slide`` pixels a side (8192: 67 megapixels, the size of the paper's full-resolution runs),
where the conventional step needs gigabytes.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

__all__ = [
    "DemoSettings",
    "GigapixelSettings",
    "gigapixel_quick_settings",
    "make_demo_slides",
    "negative_patches",
    "plot_histories",
    "quick_settings",
    "run_demo",
    "run_gigapixel_demo",
    "synthetic_slide",
    "write_gigapixel_slide",
]


@dataclass
class DemoSettings:
    size: int = 512
    n_train: int = 40
    n_val: int = 24
    epochs: int = 10
    lr: float = 1e-3
    width: int = 16
    # 128 rather than 256: at 256 a 512x512 slide is only 2x2 tiles and the streamed step's measured peak was no
    # lower than the conventional one; at 128 it is about half, for about 1.5x the compute per training step.
    tile: int = 128
    accumulate: int = 2
    seed: int = 0
    factor: int = 8
    whole_slide: int = 8192  # side of the whole slide whose memory is predicted next to the demo's (67 MP)


# Lesion appearance (see NOTE [ Lesions vanish at 8x ]): texture range after compression, dot amplitude per channel,
# lesion radius range in pixels and number of lesions per positive slide.
TEXTURE_RANGE = (75.0, 210.0)
LESION_AMPLITUDE = (90.0, 96.0, 60.0)
LESION_RADIUS = (12, 21)
LESIONS_PER_SLIDE = (10, 21)


def quick_settings() -> DemoSettings:
    """A tiny configuration for smoke tests: small slides, few of them, two epochs."""
    return DemoSettings(size=192, n_train=6, n_val=4, epochs=1, width=4, tile=64, accumulate=2)


_MARKER = ".tilegrad-demo"
_OWNED = ("slides", "run_full", "run_down", "figures", "run_gigapixel")


def _prepare_out(out: Path, factor: int) -> None:
    """Create ``out``; replace what a previous demo wrote there; refuse a non-empty directory the demo did not make."""
    import shutil

    if out.exists() and any(out.iterdir()) and not (out / _MARKER).exists():
        raise ConfigError(f"{out} exists and was not written by tilegrad demo; choose another --out")
    for name in _OWNED:
        if (out / name).exists():
            shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text(
        "written by tilegrad demo; its contents are replaced when the demo runs again\n"
    )


def _texture_source() -> np.ndarray:
    from skimage import data

    ihc = data.immunohistochemistry().astype(np.float64)  # (512, 512, 3), shipped inside scikit-image
    return ihc


def synthetic_slide(
    rng: np.random.Generator, size: int, positive: bool, source: np.ndarray | None = None
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """One (size, size, 3) uint8 slide and its lesions as (row, col, radius) in pixels.

    >>> img, lesions = synthetic_slide(np.random.default_rng(0), 128, positive=True)
    >>> img.shape, img.dtype, len(lesions) >= 1
    ((128, 128, 3), dtype('uint8'), True)
    """
    from scipy import ndimage

    src = _texture_source() if source is None else source
    # Texture: the IHC image mirrored (seamless) to cover the slide, shifted and re-oriented at random.
    extra = (size + src.shape[0], size + src.shape[1])
    tiled = np.pad(
        src, ((0, extra[0] - src.shape[0] + 1), (0, extra[1] - src.shape[1] + 1), (0, 0)), mode="symmetric"
    )
    tiled = np.rot90(tiled, int(rng.integers(4)))
    if rng.integers(2):
        tiled = tiled[:, ::-1]
    oy, ox = rng.integers(0, tiled.shape[0] - size), rng.integers(0, tiled.shape[1] - size)
    texture = tiled[oy : oy + size, ox : ox + size]
    lo, hi = TEXTURE_RANGE
    texture = lo + texture * ((hi - lo) / 255.0)  # NOTE [ Lesions vanish at 8x ]: room for the lesion pattern
    # Tissue: a smooth random field, thresholded into blobs, soft-edged.
    field = ndimage.gaussian_filter(rng.standard_normal((size // 8, size // 8)), sigma=size / 128)
    field = ndimage.zoom(field, 8, order=1)[:size, :size]
    tissue = field > np.quantile(field, 0.35)
    soft = ndimage.gaussian_filter(tissue.astype(np.float64), sigma=2)[..., None]
    background = np.array([236.0, 234.0, 238.0]) + rng.normal(0, 2.0, (size, size, 1))
    slide = soft * texture + (1 - soft) * background
    lesions: list[tuple[int, int, int]] = []
    if positive:
        coarse = tissue[4::8, 4::8].copy()  # one value per 8x8 block
        margin = -(-LESION_RADIUS[1] // 8) + 1  # whole lesions stay inside the slide
        coarse[:margin] = coarse[-margin:] = False
        coarse[:, :margin] = coarse[:, -margin:] = False
        inner = ndimage.binary_erosion(coarse, iterations=3, border_value=0)
        candidates = np.argwhere(inner if inner.any() else coarse) * 8 + 4
        wanted = int(rng.integers(*LESIONS_PER_SLIDE))
        for _ in range(20 * wanted):  # lesions that would overlap another or clip a pixel are redrawn
            if len(lesions) == wanted or len(candidates) == 0:
                break
            cy, cx = (int(v) for v in candidates[rng.integers(len(candidates))])
            radius = int(rng.integers(*LESION_RADIUS))
            if any((cy - y) ** 2 + (cx - x) ** 2 < (radius + r + 16) ** 2 for y, x, r in lesions):
                continue
            if _add_lesion(slide, cy, cx, radius):
                lesions.append((cy, cx, radius))
    return np.clip(np.rint(slide), 0, 255).astype(np.uint8), lesions


def _add_lesion(slide: np.ndarray, cy: int, cx: int, radius: int) -> bool:
    """Add a block-aligned cluster of dark 2x2 dots whose every 8x8 block has zero mean (NOTE above).

    Returns False (and leaves the slide unchanged) if any pixel would leave the 0..255 range, which would break
    the zero mean.
    """
    amplitude = np.array(LESION_AMPLITUDE)  # darker in red/green than blue: purple "nuclei"
    y0, x0 = (cy - radius) // 8 * 8, (cx - radius) // 8 * 8
    y1, x1 = -(-(cy + radius) // 8) * 8, -(-(cx + radius) // 8) * 8
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dots = ((yy % 4 < 2) & (xx % 4 < 2)).astype(np.float64) - 0.25  # zero mean over every aligned 4x4 block
    by, bx = (yy // 8) * 8 + 4, (xx // 8) * 8 + 4  # centres of the 8x8 blocks
    inside = (by - cy) ** 2 + (bx - cx) ** 2 <= radius**2  # whole blocks only
    patched = slide[y0:y1, x0:x1] - (dots * inside)[..., None] * amplitude
    if patched.min() < 0 or patched.max() > 255:
        return False
    slide[y0:y1, x0:x1] = patched
    return True


def _downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Box-average (H, W, C) ``img`` over ``factor x factor`` blocks (what a slide pyramid level holds)."""
    h, w, c = img.shape
    blocks = img[: h // factor * factor, : w // factor * factor].astype(np.float64)
    return blocks.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))


MPP = 0.25
"""Microns per pixel written into the demo slides (level 0, as a 40x scan)."""


def make_demo_slides(out: str | Path, settings: DemoSettings | None = None) -> dict[str, Any]:
    """Write the demo dataset as pyramidal TIFFs (levels 1x, 2x, 4x, 8x, ...) and ``slides.csv``.

    The downsampled run reads pyramid level log2(factor) of the same files.
    """
    from ..io import create_writer

    s = settings or DemoSettings()
    out = Path(out)
    slide_dir = out / "slides"
    slide_dir.mkdir(parents=True, exist_ok=True)
    levels = int(np.log2(s.factor)) + 1
    if 2 ** (levels - 1) != s.factor:
        raise ConfigError(f"the downsampling factor must be a power of 2, received {s.factor}")
    source = _texture_source()
    rng = np.random.default_rng(s.seed)
    rows, lesions = ["image,label,split"], {}
    n = s.n_train + s.n_val
    for i in range(n):
        label = i % 2
        split = "train" if i < s.n_train else "val"
        img, found = synthetic_slide(rng, s.size, bool(label), source)
        path = slide_dir / f"slide_{i:03d}_{'pos' if label else 'neg'}.tif"
        with create_writer(
            path, (3, s.size, s.size), np.uint8, tile=128, levels=levels, mpp=MPP, overwrite=True
        ) as writer:
            writer[...] = np.moveaxis(img, -1, 0)
        rows.append(f"{path.relative_to(out).as_posix()},{label},{split}")
        lesions[path.name] = found
    (out / "slides.csv").write_text("\n".join(rows) + "\n")
    (out / "lesions.json").write_text(json.dumps(lesions, indent=1))
    return {"csv": out / "slides.csv", "level": levels - 1, "lesions": lesions}


def run_demo(
    out: str | Path = "tilegrad-demo", settings: DemoSettings | None = None, progress: bool = True
) -> dict:
    """Generate the data, train streamed (full resolution) and conventional (8x down), report; see module doc."""
    import torch

    from .config import TrainConfig
    from .loop import train

    s = settings or DemoSettings()
    out = Path(out)
    started = time.perf_counter()
    print(
        f"[1/4] writing {s.n_train + s.n_val} synthetic {s.size}x{s.size} slides (texture: scikit-image IHC "
        f"sample) to {out}",
        flush=True,
    )
    _prepare_out(out, s.factor)
    data = make_demo_slides(out, s)
    common: dict[str, Any] = dict(
        model="small_cnn",
        model_kwargs={"width": s.width},
        epochs=s.epochs,
        lr=s.lr,
        accumulate=s.accumulate,
        seed=s.seed,
        device="cpu",
        progress=progress,
        schedule="cosine",
        optimizer="adam",
    )
    runs = {}
    print(f"[2/4] training streamed at full resolution ({s.size}x{s.size}, tile {s.tile})", flush=True)
    runs["full"] = train(
        TrainConfig(csv=str(data["csv"]), out=str(out / "run_full"), tile_size=s.tile, **common),
    )
    low = s.size // s.factor
    print(
        f"[3/4] training conventionally on {s.factor}x-downsampled slides ({low}x{low}, pyramid level "
        f"{data['level']})",
        flush=True,
    )
    runs["down"] = train(
        TrainConfig(
            csv=str(data["csv"]), out=str(out / "run_down"), tile_size=None, level=data["level"], **common
        )
    )
    print("[4/4] measuring memory, writing saliency maps and plots", flush=True)
    torch.set_grad_enabled(True)
    summary = _report(out, s, runs, data)
    summary["seconds"] = time.perf_counter() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _report(out: Path, s: DemoSettings, runs: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    from .saliency import saliency

    memory = _memory(runs["full"].model, data, s)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    curves = plot_histories(
        {
            "streamed, full resolution": runs["full"].history,
            f"conventional, {s.factor}x downsampled": runs["down"].history,
        },
        figures / "learning_curves.png",
    )
    val_pos = [
        line.split(",")[0] for line in data["csv"].read_text().splitlines()[1:] if line.endswith(",1,val")
    ][:3]
    pngs = []
    for rel in val_pos:
        png = figures / f"saliency_{Path(rel).stem}.png"
        saliency(runs["full"].checkpoint, out / rel, png, target=1, max_side=512, device="cpu")
        pngs.append(png)
    auc_full, auc_down = runs["full"].history[-1]["val_auc"], runs["down"].history[-1]["val_auc"]
    print()
    print(f"validation AUC, streamed at full resolution ({s.size}x{s.size}):      {auc_full:.3f}")
    print(
        f"validation AUC, conventional on {s.factor}x-downsampled ({s.size // s.factor}x{s.size // s.factor}):   "
        f"{auc_down:.3f}"
    )
    for line in _memory_lines(memory, s):
        print(line)
    print(
        f"outputs: {out}/  (learning curves {curves.relative_to(out)}, saliency {figures.relative_to(out)}/"
        f"saliency_*.png, logs run_full/log.csv and run_down/log.csv, checkpoints run_*/checkpoint.pt)"
    )
    return {
        "auc_full": auc_full,
        "auc_down": auc_down,
        **memory,
        "figures": [str(p) for p in [curves, *pngs]],
    }


def _memory(model: Any, data: dict[str, Any], s: DemoSettings) -> dict[str, Any]:
    """Peak memory of one training step on one slide (forward and backward), streamed and conventional.

    At the demo size the streamed peak is measured (a real step on the first slide) and the conventional one
    predicted by :func:`tilegrad.estimate_memory`; at ``s.whole_slide`` both are predicted: conventional by
    estimate_memory, streamed by the streaming planner for the same tile (what ``tilegrad train --tile`` would run).
    """
    import torch

    from ..memory import estimate_memory, measure_peak_memory
    from .dataset import SlideInput, open_slide
    from .model import SlideClassifier

    first = data["csv"].parent / data["csv"].read_text().splitlines()[1].split(",")[0]
    x = SlideInput(open_slide(first))

    def step(m: SlideClassifier, inp: Any) -> None:
        m.zero_grad(set_to_none=True)
        m(inp).sum().backward()

    model.train()
    step(model, x)  # warm-up: the first step also pays for kernel and thread-pool memory
    streamed_peak = measure_peak_memory(step, model, x)
    model.zero_grad(set_to_none=True)
    plain = torch.nn.Sequential(model.trunk, model.head)
    big = (1, x.shape[1], s.whole_slide, s.whole_slide)
    return {
        "streamed_peak": int(streamed_peak),
        "conventional_peak": int(estimate_memory(plain, tuple(x.shape), mode="train").peak_bytes),
        "whole_slide_size": s.whole_slide,
        "whole_slide_streamed_peak": int(model.streamed.plan(big, lazy=True).peak_bytes),
        "whole_slide_conventional_peak": int(estimate_memory(plain, big, mode="train").peak_bytes),
    }


def _memory_lines(memory: dict[str, Any], s: DemoSettings) -> list[str]:
    """The memory report: a heading per slide size, then one row per method, labelled measured or predicted."""
    from ..units import format_bytes

    big = memory["whole_slide_size"]
    sections = {
        f"demo slide {s.size}x{s.size} ({s.size**2 / 1e6:.2g} MP)": [
            (f"streamed, tile {s.tile}, measured", memory["streamed_peak"]),
            ("conventional, predicted by tilegrad.estimate_memory", memory["conventional_peak"]),
        ],
        f"whole slide {big}x{big} ({big**2 / 1e6:.0f} MP, the paper's full-resolution size)": [
            (
                f"streamed, tile {s.tile}, predicted by the streaming planner",
                memory["whole_slide_streamed_peak"],
            ),
            ("conventional, predicted by tilegrad.estimate_memory", memory["whole_slide_conventional_peak"]),
        ],
    }
    lines = ["peak memory of one training step (forward and backward of one slide):"]
    for heading, rows in sections.items():
        lines.append(f"  {heading}:")
        lines.extend(f"    {label:<58} {format_bytes(value):>10}" for label, value in rows)
    return lines


def plot_histories(histories: dict[str, list[dict[str, float]]], path: Path) -> Path:
    """Training/validation loss and validation AUC per epoch for each run, in one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for (name, history), color in zip(histories.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        epochs = [h["epoch"] for h in history]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], "--", color=color, label=f"{name} (train)")
        ax_loss.plot(epochs, [h["val_loss"] for h in history], "-", color=color, label=f"{name} (val)")
        ax_auc.plot(epochs, [h["val_auc"] for h in history], "-o", color=color, label=name)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend(fontsize=8)
    ax_auc.set_xlabel("epoch")
    ax_auc.set_ylabel("validation AUC")
    ax_auc.set_ylim(0.0, 1.02)
    ax_auc.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax_auc.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- tilegrad demo --gigapixel ----------------------------------------------------------------------------------


@dataclass
class GigapixelSettings:
    """The same task at slide scale: a few ``size`` x ``size`` slides, each a mosaic of ``patch``-sized synthetic
    tissue patches, where a positive slide hides its lesions in ``positive_patches`` of them (a few hundred pixels
    of signal in hundreds of megapixels), trained with the attention head, streamed, reading the slides lazily."""

    size: int = 16384
    patch: int = 1024
    positive_patches: int = 2
    n_train: int = 4
    n_val: int = 2
    epochs: int = 2
    lr: float = 1e-3
    width: int = 8
    hidden: int = 32
    tile: int = 2048
    seed: int = 0


def write_gigapixel_slide(
    path: str | Path,
    rng: np.random.Generator,
    size: int,
    positive: bool,
    *,
    patch: int = 1024,
    positive_patches: int = 2,
    source: np.ndarray | None = None,
    pool: list[np.ndarray] | None = None,
) -> list[tuple[int, int, int]]:
    """Write a ``size`` x ``size`` pyramidal TIFF slide patch by patch (memory: one patch, never the slide) and
    return its lesions as (row, col, radius) in slide pixels.

    The slide is a mosaic of :func:`synthetic_slide` patches; on a positive slide ``positive_patches`` of them carry
    lesions (NOTE [ Lesions vanish at 8x ]), drawn afresh. The lesion-free patches are taken from ``pool``
    (:func:`negative_patches`; made here when not given), each in one of its 8 flips / rotations: drawing a new
    patch costs about a second, and a 16384^2 slide has 256 of them.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "s.tif"
    >>> found = write_gigapixel_slide(path, np.random.default_rng(0), 256, True, patch=128, positive_patches=1)
    >>> from tilegrad.io import open_image
    >>> open_image(path).shape, len(found) >= 1, all(0 <= r < 256 and 0 <= c < 256 for r, c, _ in found)
    ((3, 256, 256), True, True)
    """
    from ..io import create_writer

    if size % patch or patch % 8:
        raise ConfigError(
            f"the slide size must be a multiple of the patch and the patch of 8, received size {size}, "
            f"patch {patch}"
        )
    source = _texture_source() if source is None else source
    pool = negative_patches(rng, patch, source=source) if pool is None else pool
    grid = size // patch
    chosen = set()
    if positive:
        picks = rng.choice(grid * grid, size=min(positive_patches, grid * grid), replace=False)
        chosen = {int(p) for p in picks}
    lesions: list[tuple[int, int, int]] = []
    levels = max(1, int(np.log2(max(size // 512, 1))) + 1)  # down to about 512 px: thumbnails read the top
    with create_writer(
        path, (3, size, size), np.uint8, tile=256, levels=levels, mpp=MPP, overwrite=True
    ) as writer:
        for k in range(grid * grid):
            r, c = divmod(k, grid)
            if k in chosen:
                img, found = synthetic_slide(rng, patch, True, source)
            else:
                img, found = pool[int(rng.integers(len(pool)))], []
                img = np.rot90(img, int(rng.integers(4)))
                img = img[:, ::-1] if rng.integers(2) else img
            writer[:, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = np.moveaxis(img, -1, 0)
            lesions += [(r * patch + y, c * patch + x, radius) for y, x, radius in found]
    return lesions


def negative_patches(
    rng: np.random.Generator, patch: int, n: int = 8, source: np.ndarray | None = None
) -> list[np.ndarray]:
    """``n`` lesion-free (patch, patch, 3) tissue patches for :func:`write_gigapixel_slide`."""
    source = _texture_source() if source is None else source
    return [synthetic_slide(rng, patch, False, source)[0] for _ in range(n)]


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While inside: SIGTERM raises SystemExit, so ``with`` blocks and ``finally`` clauses run (the default action
    ends the process on the spot). Only in the main thread, where Python delivers signals."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def gigapixel_quick_settings() -> GigapixelSettings:
    """A tiny ``--gigapixel --quick`` run (a smoke test of the same code path, not a result)."""
    return GigapixelSettings(size=2048, patch=512, positive_patches=1, n_train=2, n_val=2, epochs=1, tile=512)


def run_gigapixel_demo(
    out: str | Path = "tilegrad-demo-gigapixel",
    settings: GigapixelSettings | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``tilegrad demo --gigapixel``: the demo's task on a few ``settings.size``-pixel slides (16384^2: 268
    megapixels each) written as pyramidal TIFFs into a temporary directory (removed at the end) and read lazily,
    trained streamed with the attention head; prints the streaming plan, seconds per megapixel of a training step,
    the validation AUC, and writes the attention maps of the positive validation slides over their thumbnails.

    Slow by design (about an hour on two CPU cores at 16384^2); not part of ``make demo``.
    """
    import tempfile

    import torch

    from ..units import format_bytes
    from .config import TrainConfig
    from .loop import StepInfo, train
    from .model import build_model
    from .saliency import attention_saliency

    s = settings or GigapixelSettings()
    out = Path(out)
    started = time.perf_counter()
    _prepare_out(out, 1)
    n = s.n_train + s.n_val
    megapixels = s.size * s.size / 1e6
    # SIGTERM unwinds like Ctrl-C, so the temporary directory (gigabytes of slides) is removed either way
    with _sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="tilegrad-gigapixel-") as scratch:
        slides = Path(scratch)
        print(
            f"[1/4] writing {n} synthetic {s.size}x{s.size} slides ({megapixels:.0f} MP each; lesions in "
            f"{s.positive_patches} of {(s.size // s.patch) ** 2} patches of a positive slide) as pyramidal TIFFs "
            f"to {slides}",
            flush=True,
        )
        rng = np.random.default_rng(s.seed)
        source = _texture_source()
        pool = negative_patches(rng, s.patch, source=source)
        rows, lesions = ["image,label,split"], {}
        for i in range(n):
            label = i % 2
            path = slides / f"slide_{i:03d}_{'pos' if label else 'neg'}.tif"
            lesions[path.name] = write_gigapixel_slide(
                path, rng, s.size, bool(label), patch=s.patch, positive_patches=s.positive_patches,
                source=source, pool=pool,
            )  # fmt: skip
            rows.append(f"{path.name},{label},{'train' if i < s.n_train else 'val'}")
        csv = slides / "slides.csv"
        csv.write_text("\n".join(rows) + "\n")
        (out / "lesions.json").write_text(json.dumps(lesions, indent=1))

        model_kwargs, head_kwargs = {"width": s.width}, {"hidden": s.hidden}
        model = build_model("small_cnn", 2, model_kwargs=model_kwargs, head="attention", head_kwargs=head_kwargs,
                            tile_size=s.tile)  # fmt: skip
        plan = model.streamed.plan((1, 3, s.size, s.size), lazy=True)
        print(f"[2/4] the streaming plan of one slide (what `tilegrad plan` prints):\n{plan}", flush=True)

        print(
            f"[3/4] training streamed with the attention head, {s.epochs} epoch(s), slides read lazily",
            flush=True,
        )
        step_seconds: list[float] = []
        last = [time.perf_counter()]

        def on_step(info: StepInfo) -> None:
            now = time.perf_counter()
            step_seconds.append(now - last[0])
            last[0] = now
            print(f"  step {info.global_step}: {step_seconds[-1]:.1f} s, {step_seconds[-1] / megapixels:.3f} s/MP, "
                  f"loss {info.loss:.4f}", flush=True)  # fmt: skip

        result = train(
            TrainConfig(
                csv=str(csv), out=str(out / "run_gigapixel"), model="small_cnn", model_kwargs=model_kwargs,
                head="attention", head_kwargs=head_kwargs, tile_size=s.tile, epochs=s.epochs, lr=s.lr,
                seed=s.seed, device="cpu", progress=progress, optimizer="adam", augment=False,
            ),
            on_step=on_step,
        )  # fmt: skip
        # The first step of each epoch also waits for the previous epoch's validation: the median is one step.
        per_step = float(np.median(step_seconds)) if step_seconds else float("nan")

        print("[4/4] attention maps of the positive validation slides", flush=True)
        figures = out / "figures"
        figures.mkdir(exist_ok=True)
        maps = {}
        for row in rows[1:]:
            name, label, split = row.split(",")
            if split != "val" or label != "1":
                continue
            png = figures / f"attention_{Path(name).stem}.png"
            found = attention_saliency(result.checkpoint, slides / name, png, max_side=1024, device="cpu",
                                       overwrite=True)  # fmt: skip
            maps[name] = _attention_on_lesion_patches(found.map, found.stride, lesions[name], s)
    torch.set_grad_enabled(True)
    auc = result.history[-1]["val_auc"]
    summary = {
        "size": s.size,
        "slides": n,
        "plan_peak_bytes": int(plan.peak_bytes),
        "plan_time_ratio": float(plan.time_ratio),
        "seconds_per_step": per_step,
        "seconds_per_megapixel": per_step / megapixels,
        "val_auc": auc,
        "attention_on_lesion_patches": maps,
        "seconds": time.perf_counter() - started,
    }
    print()
    print(f"slides {s.size}x{s.size} ({megapixels:.0f} MP), read lazily from pyramidal TIFFs")
    print(f"predicted peak of a training step (streaming planner): {format_bytes(plan.peak_bytes)}")
    print(
        f"training step (forward + backward of one slide): {per_step:.1f} s, {per_step / megapixels:.3f} s/MP"
    )
    print(f"validation AUC after {s.epochs} epoch(s) on {s.n_train} slides: {auc:.3f} ({s.n_val} slides: a smoke "
          f"test of scale, not a result)")  # fmt: skip
    for name, share in maps.items():
        print(f"{name}: {share['attention']:.1%} of the attention on the {share['patches']} lesion patch(es), "
              f"which cover {share['area']:.2%} of the slide")  # fmt: skip
    print(f"outputs: {out}/ (attention maps figures/attention_*.png, .npy, .tiff; run run_gigapixel/)")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _attention_on_lesion_patches(
    weights: np.ndarray,
    stride: tuple[float, float],
    lesions: list[tuple[int, int, int]],
    s: GigapixelSettings,
) -> dict[str, Any]:
    """The share of the attention (weights summing to 1) that falls on the patches holding lesions."""
    patches = {(y // s.patch, x // s.patch) for y, x, _ in lesions}
    mask = np.zeros(weights.shape, dtype=bool)
    for r, c in patches:
        rows = slice(int(r * s.patch / stride[0]), int((r + 1) * s.patch / stride[0]))
        cols = slice(int(c * s.patch / stride[1]), int((c + 1) * s.patch / stride[1]))
        mask[rows, cols] = True
    return {
        "attention": float(weights[mask].sum()),
        "patches": len(patches),
        "area": len(patches) * s.patch**2 / s.size**2,
    }
