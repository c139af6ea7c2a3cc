"""Attention views: what each generated word looked at, as data that every view draws.

`attention_views(model, vocab, gen)` splits a batch of `Captioner.generate` output into one
`AttentionView` per image: the words, each word's map α_t over the H'×W' grid, the gate β,
and what the attention declares worth marking (hard attention's sampled cells, local
attention's windows). The matplotlib figures (`caption.views.figures`), the HTML report and
the web app (`caption.views.report`) all draw these views with the helpers here: the heat
maps (`heat_maps`), the window cells (`window_cells`), one colour scale (`color_max`) and
the shared colours, so a map looks the same in a PNG and in the browser.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from caption.data.images import MAX_PIXELS, read_rgb
from caption.data.vocab import Vocabulary
from caption.models.captioner import Captioner
from caption.models.decoding import Generated

CMAP = "inferno"
OVERLAY_ALPHA = 0.6  # the heat map's opacity over the image
BLUR_CELLS = 0.25  # Gaussian σ of the smoothing, in cells
# The colour scale tops out at no less than this many times the uniform weight 1/L, so that a
# nearly uniform map stays dim instead of being stretched to full brightness.
MIN_VMAX_UNIFORM = 4.0
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


def local_windows(positions: Tensor, window: float) -> list[list[Window]]:
    """Window centres p_t (T, 2) (row, col), or (T, h, 2) for h heads, and the radius, as
    each word's figure windows, one per head."""
    heads = positions.unsqueeze(1) if positions.dim() == 2 else positions  # (T, h, 2)
    return [[(float(r), float(c), float(window)) for r, c in word] for word in heads.tolist()]


def shown_image(
    path: str | Path, max_side: int, max_pixels: int | None = MAX_PIXELS
) -> Image.Image:
    """The image to draw the attention over, as the model saw it: upright (EXIF orientation
    applied), 8-bit RGB, shrunk to at most `max_side` pixels a side."""
    im = read_rgb(path, max_pixels)
    im.thumbnail((max_side, max_side))
    return im
