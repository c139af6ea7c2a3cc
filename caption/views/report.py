"""Attention in the browser: the records behind the web views, and the self-contained report.

A record (`attention_record`) is one caption as JSON: its words, the gate β and attention map
of every word, the colour scale, and hard attention's sampled cells or local attention's
windows. `caption/views/web/attention.js` draws any record over its image; the HTML report
(`caption-visualize format=html`) and the web app (`caption-serve`) both embed that one
script and the same stylesheet, so a map looks the same in either.

The report is one HTML file with everything inside: the images as JPEG data URIs, the
records as JSON (attention quantised to 8 bits per cell relative to the caption's peak), the
script and the styles. It loads nothing, so it opens offline and can be mailed. Its script
builds one page of cards at a time, so thousands of images open as fast as one page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps

from caption.data.images import MAX_PIXELS
from caption.files import atomic_file
from caption.metrics import bleu
from caption.views.attention import (
    CMAP,
    HARD_COLOR,
    OVERLAY_ALPHA,
    WINDOW_COLOR,
    AttentionView,
    color_max,
    shown_image,
    window_cells,
)

WEB_DIR = Path(__file__).resolve().parent / "web"
JPEG_QUALITY = 90


def attention_record(
    view: AttentionView, *, normalize: str = "shared", compact: bool = False
) -> dict[str, Any]:
    """One caption's attention as JSON for `attention.js`.

    Args:
        view: the caption and what each word looked at (`caption.views.attention.attention_views`).
        normalize: `shared` (one colour scale per caption, `vmax` a number) or `panel` (each
            word to its own maximum, `vmax` a list); neither ends below 4/L.
        compact: store the attention as `attention_u8` (base64 of n×L bytes, row-major, each
            α / `attention_max` · 255 rounded) instead of `attention` (n lists of L floats):
            a quarter of the size, for reports of many images.

    Returns:
        `caption`, `words`, `betas`, `grid` [H', W'], `vmax`, the attention, `locations`
        (hard attention's sampled cell per word, row-major, else None) and `windows` (per word,
        a list with each windowed head's `{"cells": [row0, row1, col0, col1], "centre":
        [p_row, p_col]}`, inclusive and in cell units, or None where p_t is undefined; one
        per word for local attention, h under h heads; None without a window).
    """
    H, W = view.grid
    alphas = view.alphas.detach().to("cpu").float().reshape(len(view.words), H * W).numpy()
    peaks = alphas.max(axis=1) if len(view.words) else np.zeros(0)
    if normalize == "shared":
        vmax: float | list[float] = round(color_max(float(peaks.max(initial=0.0)), H * W), 6)
    elif normalize == "panel":
        vmax = [round(color_max(float(p), H * W), 6) for p in peaks]
    else:
        raise ValueError(f"normalize must be 'shared' or 'panel', got {normalize!r}")
    record: dict[str, Any] = {
        "caption": " ".join(view.words),
        "words": list(view.words),
        "betas": [round(float(b), 4) for b in view.betas],
        "grid": [H, W],
        "vmax": vmax,
    }
    if compact:
        top = float(peaks.max(initial=0.0)) or 1.0
        quantised = np.rint(np.clip(alphas / top, 0, 1) * 255).astype(np.uint8)
        record["attention_u8"] = base64.b64encode(quantised.tobytes()).decode("ascii")
        record["attention_max"] = top
    else:
        record["attention"] = [[round(float(a), 6) for a in row] for row in alphas]
    record["locations"] = None if view.locations is None else [int(i) for i in view.locations]
    record["windows"] = None
    if view.windows is not None:
        record["windows"] = [
            [
                {
                    "cells": list(window_cells(w, view.grid)),
                    "centre": [round(w[0], 4), round(w[1], 4)],
                }
                if math.isfinite(w[0]) and math.isfinite(w[1])
                else None
                for w in heads
            ]
            for heads in view.windows
        ]
    return record


def embed_image(path: str | Path, max_side: int = 256, max_pixels: int | None = MAX_PIXELS) -> str:
    """The image as a JPEG data URI: upright, shrunk to at most `max_side` pixels a side."""
    buffer = io.BytesIO()
    shown_image(path, max_side, max_pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def report_item(
    path: str | Path,
    view: AttentionView,
    references: Sequence[Sequence[str]] | None = None,
    *,
    normalize: str = "shared",
    max_side: int = 256,
    max_pixels: int | None = MAX_PIXELS,
) -> dict[str, Any]:
    """One image of the report: its name, the embedded image, its record, and with references,
    the references and the image's own BLEU-1..4 against them."""
    item = {
        "name": Path(path).name,
        "image": embed_image(path, max_side, max_pixels),
        "log_prob": round(view.log_prob, 4),
        **attention_record(view, normalize=normalize, compact=True),
    }
    if references:
        scores = bleu([references], [view.words])
        item["references"] = [" ".join(r) for r in references]
        item["bleu"] = {k: round(v, 4) for k, v in scores.items()}
    return item


@cache
def _colormap_hex(name: str) -> str:
    rgb = colormaps[name](np.linspace(0, 1, 256))[:, :3]
    return "".join(f"{r:02x}{g:02x}{b:02x}" for r, g, b in np.rint(rgb * 255).astype(int))


def _json(value: Any) -> str:
    # `<` only occurs inside JSON strings, where \u003c means the same and cannot close the
    # <script> element that holds the JSON.
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c")


def render_page(template: str, *, title: str, subtitle: str, data: Any) -> str:
    """Fill `caption/views/web/<template>` with the shared script, styles and colormap, and `data`.

    Args:
        template: `report.html` or `app.html`.
        title: the page title (escaped here).
        subtitle: one line under it (escaped here).
        data: the page's own JSON (the report's items, the app's settings).

    Returns:
        A complete HTML page that references no other file.
    """
    colormap = _colormap_hex(CMAP)
    stops = ", ".join(f"#{colormap[6 * k : 6 * k + 6]}" for k in range(0, 256, 51))
    config = {
        "colormap": colormap,
        "overlay_alpha": OVERLAY_ALPHA,
        "hard_color": HARD_COLOR,
        "window_color": WINDOW_COLOR,
    }
    fields = {
        "title": html.escape(title),
        "subtitle": html.escape(subtitle),
        "legend": f"linear-gradient(to right, {stops})",
        "style": (WEB_DIR / "attention.css").read_text(),
        "script": (WEB_DIR / "attention.js").read_text(),
        "config": _json(config),
        "data": _json(data),
    }
    # One pass: text put in is never scanned again for {{fields}}.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: fields[m.group(1)], (WEB_DIR / template).read_text())


def write_report(
    path: str | Path,
    items: Sequence[dict[str, Any]],
    *,
    title: str = "Attention",
    subtitle: str = "",
    page_size: int = 48,
) -> int:
    """Write the self-contained report of `items` (`report_item`s) to `path` atomically.

    Returns:
        The file's size in bytes.
    """
    page = render_page(
        "report.html",
        title=title,
        subtitle=subtitle,
        data={"page_size": page_size, "items": list(items)},
    )
    with atomic_file(path) as f:  # a file to share: the usual permissions, not 0600
        f.write(page)
    return Path(path).stat().st_size
