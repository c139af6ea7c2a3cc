"""Attention figures: the image, then one panel per generated word with its attention map.

`attention_figure(image, words, alphas, grid)` returns a matplotlib `Figure` (for notebooks:
make it the cell's last expression); `caption-visualize` writes one PNG per image:

    caption-visualize checkpoint=outputs/demo/checkpoints/best.pt \
        images='data/shapes/images/test_0000?.png' output_dir=outputs/demo/attention

Each word's map α_t (H'×W') is upsampled bicubically to the displayed image, lightly blurred
with a Gaussian (a fraction of a cell), drawn in `inferno` and alpha-blended over the image.
All panels of a figure share one colour scale, 0 to the largest α of the caption, so that a
diffuse map looks dim beside a peaked one (`normalize="panel"` scales each panel to its own
maximum instead); either scale reaches at least 4/L, four times the uniform weight, so that
a nearly uniform map is not stretched to full brightness. Hard attention marks the cell each
word looked at; local attention outlines the square window around p_t that its α was
confined to (each head's, under multi-head attention).

The figure is built on `matplotlib.figure.Figure` without pyplot, so it needs no GUI backend,
is never shown twice in a notebook and is freed when dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from caption.config import check_choice, check_decoding, check_int, resolve_device
from caption.data.formats import read_split
from caption.data.images import MAX_PIXELS, expand_images, read_rgb
from caption.data.records import SPLITS
from caption.data.vocab import Vocabulary
from caption.errors import CaptionError
from caption.files import advice, advised, atomic_file
from caption.inference import caption_files
from caption.models.build import load_captioner
from caption.models.captioner import Captioner
from caption.models.decoding import Generated
from caption.overrides import hydra_command
from caption.runtime import configure_cpu

log = logging.getLogger(__name__)

CMAP = "inferno"
OVERLAY_ALPHA = 0.6  # the heat map's opacity over the image
BLUR_CELLS = 0.25  # Gaussian σ of the smoothing, in cells
# The colour scale tops out at no less than this many times the uniform weight 1/L, so that a
# nearly uniform map stays dim instead of being stretched to full brightness.
MIN_VMAX_UNIFORM = 4.0
MIN_DISPLAY = 256  # upsample maps to at least this many pixels per side, for smooth edges
HARD_COLOR = "#00e5ff"  # cyan reads well on inferno's black-to-yellow
WINDOW_COLOR = "#7CFC00"

Window = tuple[float, float, float]  # (p_row, p_col, radius) in cell units


class AttentionView(NamedTuple):
    """What one generated caption looked at: everything a figure or a web view draws."""

    words: list[str]  # the caption, `<end>` excluded
    alphas: Tensor  # (n, L) on the CPU: word t's attention over the grid
    grid: tuple[int, int]  # (H', W')
    betas: Tensor  # (n,) the gate β of each word
    locations: Tensor | None  # (n,) hard attention's sampled cell per word; None otherwise
    # per word, the window of each windowed head (one for local attention, h under h heads);
    # None for attentions without a window
    windows: list[list[Window]] | None
    log_prob: float  # log p(caption | image)


def attention_views(model: Captioner, vocab: Vocabulary, gen: Generated) -> list[AttentionView]:
    """Split a batch of `Captioner.generate` output into one `AttentionView` per image.

    Sampled locations are kept only for a stochastic attention and windows only for one with
    a `window`, as the attention declares them, so a view marks exactly what its model did.
    """
    attention = model.decoder.attention
    hard = attention.stochastic  # its locations are the cells it sampled, worth marking
    radius = attention.window
    alphas, betas = gen.alphas.cpu(), gen.betas.cpu()
    views = []
    for b, (tokens, log_prob) in enumerate(
        zip(gen.tokens.tolist(), gen.log_probs.tolist(), strict=True)
    ):
        words = vocab.decode(tokens)
        n = len(words)
        windows = None
        if radius is not None and gen.positions is not None:
            windows = local_windows(gen.positions[b, :n].cpu(), radius)
        views.append(
            AttentionView(
                words=words,
                alphas=alphas[b, :n],
                grid=(int(gen.grid[0]), int(gen.grid[1])),
                betas=betas[b, :n],
                locations=gen.locations[b, :n].cpu() if hard else None,
                windows=windows,
                log_prob=float(log_prob),
            )
        )
    return views


def color_max(peak: float, cells: int) -> float:
    """The top of a colour scale whose largest value is `peak`, on a grid of `cells` cells.

    It never ends below 4/L, four times the uniform weight, so that a nearly uniform map is
    not stretched to full brightness. The PNG figures and the web views share it.
    """
    return max(peak, MIN_VMAX_UNIFORM / cells)


def _as_rgb(image: Any) -> np.ndarray:
    """An (H, W, 3) float array in [0, 1] from a tensor (3, H, W), an array or a PIL image."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        image = image.numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    return np.clip(array.astype(np.float32), 0, 1)


def _gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (T, 1, H, W) maps with reflected borders."""
    if sigma <= 0:
        return maps
    radius = min(max(1, math.ceil(3 * sigma)), min(maps.shape[-2:]) - 1)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    maps = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    maps = F.conv2d(maps, kernel.view(1, 1, 1, -1))  # along x
    return F.conv2d(maps, kernel.view(1, 1, -1, 1))  # along y


def heat_maps(alphas: Tensor, grid: Sequence[int], size: tuple[int, int]) -> Tensor:
    """Upsample attention maps to `size` with bicubic interpolation and a light Gaussian blur.

    Args:
        alphas: (T, L) or (T, H', W') attention weights.
        grid: (H', W').
        size: (height, width) of the output in pixels.

    Returns:
        (T, height, width) non-negative maps (bicubic overshoot is clipped at 0).
    """
    Hc, Wc = (int(g) for g in grid)
    maps = alphas.detach().to("cpu", torch.float32).reshape(-1, 1, Hc, Wc)  # (T, 1, H', W')
    maps = F.interpolate(maps, size=size, mode="bicubic", align_corners=False)
    maps = _gaussian_blur(maps, BLUR_CELLS * size[0] / Hc)
    return maps[:, 0].clamp(min=0)


def window_cells(window: Window, grid: Sequence[int]) -> tuple[int, int, int, int]:
    """The cells local attention could use around p_t: (row0, row1, col0, col1), inclusive.

    Those are the cells whose centres lie within `radius` of p_t on each axis, plus the cell
    containing p_t, clipped to the grid (`caption.models.local.LocalAttention`).
    """
    p_row, p_col, radius = window
    Hc, Wc = (int(g) for g in grid)

    def span(p: float, n: int) -> tuple[int, int]:
        here = min(max(math.floor(p), 0), n - 1)
        lo = math.ceil(p - radius - 0.5)  # |i + 0.5 − p| ≤ radius
        hi = math.floor(p + radius - 0.5)
        return max(0, min(lo, here)), min(n - 1, max(hi, here))

    r0, r1 = span(p_row, Hc)
    c0, c1 = span(p_col, Wc)
    return r0, r1, c0, c1


def attention_figure(
    image: Any,
    words: Sequence[str],
    alphas: Tensor,
    grid: Sequence[int],
    betas: Tensor | Sequence[float] | None = None,
    locations: Tensor | Sequence[int] | None = None,
    windows: Tensor | Sequence[Sequence[Window]] | None = None,
    *,
    normalize: str = "shared",
    columns: int = 6,
    panel_size: float = 2.0,
    title: str | None = None,
) -> Figure:
    """Draw an image and, per word, its attention map over the image.

    Args:
        image: the image as a tensor (3, H, W) (uint8 or [0, 1]), an (H, W, 3) array or a PIL
            image; any size: the grid is laid over the whole image.
        words: the caption's words (no `<end>`); one panel each.
        alphas: (T, L) or (T, H', W') attention, row t for word t; T >= len(words).
        grid: (H', W'), e.g. `Generated.grid`.
        betas: (T,) gate values, shown in the titles as β.
        locations: (T,) hard attention's chosen cell per word (row-major index, -1: none);
            outlined in cyan.
        windows: per word, its windows (p_row, p_col, radius) in cell units, one per
            windowed head: local attention's, outlined in green, with p_t marked.
        normalize: `shared` (one colour scale, 0 to the caption's largest α) or `panel`
            (each panel scaled to its own maximum); neither scale ends below 4/L.
        columns: panels per row at most (the image counts as one); longer captions wrap.
        panel_size: inches per panel.
        title: the figure's title; None shows the caption, "" shows none.

    Returns:
        The figure: `len(words) + 1` axes, the image first.
    """
    if normalize not in ("shared", "panel"):
        raise ValueError(f"normalize must be 'shared' or 'panel', got {normalize!r}")
    rgb = _as_rgb(image)
    H, W = rgb.shape[:2]
    Hc, Wc = (int(g) for g in grid)
    n = len(words)
    alphas = torch.as_tensor(alphas).detach().reshape(-1, Hc * Wc)[:n]  # (n, L)
    if alphas.shape[0] < n:
        raise ValueError(f"{n} words but only {alphas.shape[0]} attention maps")
    # Upsample at least to MIN_DISPLAY pixels per side, so small images get smooth maps.
    k = max(1, math.ceil(MIN_DISPLAY / max(H, W)))
    heat = heat_maps(alphas, (Hc, Wc), (H * k, W * k)).numpy() if n else np.zeros((0, 1, 1))
    vmax_shared = color_max(float(heat.max()) if n else 0.0, Hc * Wc)
    cell_w, cell_h = W / Wc, H / Hc
    extent = (0, W, H, 0)  # pixel coordinates of the image for every layer

    cols = max(1, min(columns, n + 1))
    rows = math.ceil((n + 1) / cols)
    fig = Figure(figsize=(panel_size * cols, panel_size * rows + 0.35), layout="constrained")
    for k_panel in range(n + 1):
        ax = fig.add_subplot(rows, cols, k_panel + 1)
        ax.imshow(rgb, extent=extent, interpolation="bilinear")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if k_panel == 0:
            ax.set_title("image", fontsize=10)
            continue
        t = k_panel - 1
        vmax = vmax_shared if normalize == "shared" else color_max(float(heat[t].max()), Hc * Wc)
        ax.imshow(
            heat[t],
            cmap=CMAP,
            alpha=OVERLAY_ALPHA,
            vmin=0.0,
            vmax=vmax,
            extent=extent,
            interpolation="bilinear",
        )
        label = words[t]
        if betas is not None:
            label += f"  β={float(betas[t]):.2f}"
        ax.set_title(label, fontsize=10)
        if locations is not None and int(locations[t]) >= 0:
            i, j = divmod(int(locations[t]), Wc)
            ax.add_patch(
                Rectangle(
                    (j * cell_w, i * cell_h),
                    cell_w,
                    cell_h,
                    fill=False,
                    edgecolor=HARD_COLOR,
                    linewidth=1.8,
                    gid="hard-location",
                )
            )
        for window in windows[t] if windows is not None else ():
            _draw_window(ax, window, (Hc, Wc), (cell_h, cell_w))
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
    caption = " ".join(words) if title is None else title
    if caption:
        fig.suptitle(caption, fontsize=11)
    return fig


def _draw_window(ax: Any, window: Window, grid: tuple[int, int], cell: tuple[float, float]) -> None:
    """Outline a window's cells on `ax` and mark its centre; cells are `cell` (h, w) pixels."""
    p_row, p_col, radius = (float(v) for v in window)
    if not (math.isfinite(p_row) and math.isfinite(p_col)):
        return
    r0, r1, c0, c1 = window_cells((p_row, p_col, radius), grid)
    cell_h, cell_w = cell
    ax.add_patch(
        Rectangle(
            (c0 * cell_w, r0 * cell_h),
            (c1 - c0 + 1) * cell_w,
            (r1 - r0 + 1) * cell_h,
            fill=False,
            edgecolor=WINDOW_COLOR,
            linewidth=1.5,
            linestyle="--",
            gid="local-window",
        )
    )
    ax.plot(
        [p_col * cell_w],
        [p_row * cell_h],
        marker="+",
        markersize=8,
        color=WINDOW_COLOR,
        gid="local-centre",
    )


def local_windows(positions: Tensor, window: float) -> list[list[Window]]:
    """Window centres p_t (T, 2) (row, col), or (T, h, 2) for h heads, and the radius, as
    each word's figure windows, one per head."""
    heads = positions.unsqueeze(1) if positions.dim() == 2 else positions  # (T, h, 2)
    return [[(float(r), float(c), float(window)) for r, c in word] for word in heads.tolist()]


def _output_name(path: Path, taken: set[str]) -> str:
    """`<stem>.png`, or `<stem>_<k>.png` when another input had the same stem."""
    name, k = f"{path.stem}.png", 1
    while name in taken:
        name, k = f"{path.stem}_{k}.png", k + 1
    taken.add(name)
    return name


def _inputs(cfg: DictConfig, train_data: DictConfig) -> tuple[list[Path], dict[Path, Any]]:
    """The image files to caption, and their reference captions where a dataset split names them.

    `images=` is a file, folder or glob (no references); `split=` takes a split of `annotations=`
    or, by default, of the checkpoint's own dataset, with its references.
    """
    if (cfg.images is None) == (cfg.split is None):
        raise CaptionError(
            "caption-visualize: pass either images=<file|folder|glob> or split=<train|val|test>"
        )
    if cfg.images is not None:
        files = expand_images(cfg.images)
        references: dict[Path, Any] = {}
    else:
        check_choice(cfg, "split", SPLITS)
        if cfg.annotations:
            source: Any = {"annotations": cfg.annotations, "images": cfg.image_root}
        else:
            source = train_data
        records = read_split(source, cfg.split, "auto")
        files = [r.path for r in records]
        references = {r.path: r.captions for r in records}
    check_int(cfg, "max_images", 1, optional=True)
    return (files[: cfg.max_images] if cfg.max_images else files), references


def shown_image(
    path: str | Path, max_side: int, max_pixels: int | None = MAX_PIXELS
) -> Image.Image:
    """The image to draw the attention over, as the model saw it: upright (EXIF orientation
    applied), 8-bit RGB, shrunk to at most `max_side` pixels a side."""
    im = read_rgb(path, max_pixels)
    im.thumbnail((max_side, max_side))
    return im


def visualize(cfg: DictConfig) -> dict[str, Any]:
    """Caption images and draw their attention: one PNG each, or one self-contained HTML report.

    The images are `cfg.images` (a file, folder or glob) or a dataset split (`cfg.split`),
    whose reference captions and per-image BLEU then join the report. Bad image files are
    reported on stderr and skipped; the others are still drawn. Each written file's path is
    printed on stdout (the report's with its size).

    Returns:
        `{"written": [paths], "failed": [paths]}`.
    """
    check_decoding(cfg)
    check_choice(cfg, "format", ("png", "html"))
    check_int(cfg, "columns", 1)
    check_int(cfg, "dpi", 10)
    check_int(cfg, "page_size", 1)
    check_int(cfg, "image_max_side", 16)
    check_int(cfg, "max_image_pixels", 1, optional=True)
    check_choice(cfg, "normalize", ("shared", "panel"))
    device = resolve_device(cfg.device)
    configure_cpu()
    model, vocab, train_cfg = load_captioner(cfg.checkpoint, device)
    files, references = _inputs(cfg, train_cfg.data)
    output_dir = Path(cfg.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CaptionError(
            f"output_dir: cannot create {output_dir} ({e.strerror}); pass a writable folder"
        ) from None
    html = cfg.format == "html"
    if html:
        from caption import report  # report builds on this module

    written: list[str] = []
    failed: list[str] = []
    items: list[dict[str, Any]] = []
    taken: set[str] = set()
    batches = caption_files(
        model,
        files,
        failed,
        batch_size=cfg.batch_size,
        device=device,
        strategy=cfg.strategy,
        beam_size=cfg.beam_size,
        max_len=cfg.max_len,
        max_pixels=cfg.max_image_pixels,
        allow_unk=cfg.allow_unk,
        length_penalty=cfg.length_penalty,
    )
    for good, gen in batches:
        for path, view in zip(good, attention_views(model, vocab, gen), strict=True):
            if html:
                items.append(
                    report.report_item(
                        path,
                        view,
                        references.get(path),
                        normalize=cfg.normalize,
                        max_side=cfg.image_max_side,
                        max_pixels=cfg.max_image_pixels,
                    )
                )
                continue
            shown = np.asarray(shown_image(path, 512, cfg.max_image_pixels))  # not full size
            fig = attention_figure(
                shown,
                view.words,
                view.alphas,
                view.grid,
                betas=view.betas,
                locations=view.locations,
                windows=view.windows,
                normalize=cfg.normalize,
                columns=cfg.columns,
            )
            target = output_dir / _output_name(path, taken)
            with _reported(written, output_dir), atomic_file(target, "wb") as f:
                fig.savefig(f, format="png", dpi=cfg.dpi, facecolor="white")
            written.append(str(target))
            print(target, flush=True)
    if html:
        decoding = f"beam {cfg.beam_size}" if cfg.strategy == "beam" else cfg.strategy
        decoding += ", <unk> allowed" if cfg.allow_unk else ""
        source = f"{cfg.split} split" if cfg.split else str(cfg.images)
        target = output_dir / cfg.report_file
        with _reported(written, output_dir):
            size = report.write_report(
                target,
                items,
                title=f"Attention of {Path(cfg.checkpoint).name} on {source}",
                subtitle=f"{cfg.checkpoint} · {decoding} · {len(items)} images"
                + (f" · {len(failed)} unreadable" if failed else ""),
                page_size=cfg.page_size,
            )
        written.append(str(target))
        print(f"{target} ({size / 1e6:.1f} MB, {len(items)} images)", flush=True)
    log.info(
        "wrote %s to %s%s",
        f"a report of {len(items)} images" if html else f"{len(written)} attention figure(s)",
        output_dir,
        f", {len(failed)} image(s) failed" if failed else "",
    )
    return {"written": written, "failed": failed}


def _reported(written: list[str], output_dir: Path) -> contextlib.AbstractContextManager:
    """A failed write of a figure or the report, with what was written before it."""
    done = f"{len(written)} figure(s) before it are in {output_dir}: " if written else ""
    return advised(lambda e: f"{done}{advice(e.errno)}")


@hydra_command("caption-visualize", "visualize")
def main(cfg: DictConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, even where a display exists
    result = visualize(cfg)
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
