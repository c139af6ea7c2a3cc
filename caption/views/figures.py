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

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from torch import Tensor

from caption.views.attention import (
    CMAP,
    HARD_COLOR,
    OVERLAY_ALPHA,
    WINDOW_COLOR,
    Window,
    color_max,
    heat_maps,
    window_cells,
)

MIN_DISPLAY = 256  # upsample maps to at least this many pixels per side, for smooth edges


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
    heat = _display_maps(alphas, n, (Hc, Wc), (H, W))
    vmax_shared = color_max(float(heat.max()) if n else 0.0, Hc * Wc)
    cell = (H / Hc, W / Wc)  # (h, w) of a cell in pixels
    extent = (0, W, H, 0)  # pixel coordinates of the image for every layer

    cols = max(1, min(columns, n + 1))
    rows = math.ceil((n + 1) / cols)
    fig = Figure(figsize=(panel_size * cols, panel_size * rows + 0.35), layout="constrained")
    for k_panel in range(n + 1):
        ax = fig.add_subplot(rows, cols, k_panel + 1)
        _show_image(ax, rgb, extent)
        if k_panel == 0:
            ax.set_title("image", fontsize=10)
            continue
        t = k_panel - 1
        vmax = vmax_shared if normalize == "shared" else color_max(float(heat[t].max()), Hc * Wc)
        _overlay(ax, heat[t], vmax, extent)
        label = words[t]
        if betas is not None:
            label += f"  β={float(betas[t]):.2f}"
        ax.set_title(label, fontsize=10)
        if locations is not None and int(locations[t]) >= 0:
            _draw_location(ax, int(locations[t]), Wc, cell)
        for window in windows[t] if windows is not None else ():
            _draw_window(ax, window, (Hc, Wc), cell)
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
    caption = " ".join(words) if title is None else title
    if caption:
        fig.suptitle(caption, fontsize=11)
    return fig


def _display_maps(
    alphas: Tensor, n: int, grid: tuple[int, int], image: tuple[int, int]
) -> np.ndarray:
    """The first `n` maps of `alphas` (T, L), upsampled at least to MIN_DISPLAY pixels per
    side so that small images get smooth maps: (n, H·k, W·k) for an (H, W) image."""
    (Hc, Wc), (H, W) = grid, image
    alphas = torch.as_tensor(alphas).detach().reshape(-1, Hc * Wc)[:n]  # (n, L)
    if alphas.shape[0] < n:
        raise ValueError(f"{n} words but only {alphas.shape[0]} attention maps")
    k = max(1, math.ceil(MIN_DISPLAY / max(H, W)))
    return heat_maps(alphas, grid, (H * k, W * k)).numpy() if n else np.zeros((0, 1, 1))


def _show_image(ax: Any, rgb: np.ndarray, extent: tuple[int, int, int, int]) -> None:
    """Draw the image over the whole panel, without ticks or frame."""
    ax.imshow(rgb, extent=extent, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _overlay(ax: Any, heat: np.ndarray, vmax: float, extent: tuple[int, int, int, int]) -> None:
    """Blend one word's heat map over the image, its colour scale 0 to `vmax`."""
    ax.imshow(
        heat,
        cmap=CMAP,
        alpha=OVERLAY_ALPHA,
        vmin=0.0,
        vmax=vmax,
        extent=extent,
        interpolation="bilinear",
    )


def _draw_location(ax: Any, location: int, columns: int, cell: tuple[float, float]) -> None:
    """Outline hard attention's sampled cell (row-major `location` on a grid of `columns`)."""
    i, j = divmod(location, columns)
    cell_h, cell_w = cell
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
