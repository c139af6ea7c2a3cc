"""Headless Debian Chromium through Playwright, for the browser tests and `bench/web.py`.

Playwright's own browser download cannot be used here, so it drives the system's
`chromium` (`CAPTION_CHROMIUM`, default /usr/bin/chromium) with a fresh profile and with
everything that would reach the network on its own (updates, sync, QUIC) switched off.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CHROMIUM = os.environ.get("CAPTION_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # runs as root in CI
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]


def launch_chromium(playwright: Any, profile: str | Path, executable: str = CHROMIUM) -> Any:
    """A headless Chromium context with its own profile folder.

    Args:
        playwright: what `playwright.sync_api.sync_playwright()` entered.
        profile: an empty folder for the user data.
        executable: the Chromium binary.

    Returns:
        Playwright's `BrowserContext`; close it when done.
    """
    return playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=executable,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1200, "height": 900},
    )


def canvas_pixels(card: Any) -> np.ndarray:
    """The pixels of a page element's canvas as drawn, (H, W, 3) ints.

    Args:
        card: a Playwright `Locator` of an element that holds one `<canvas>`.
    """
    url = card.locator("canvas").evaluate("c => c.toDataURL('image/png')")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        return np.asarray(im.convert("RGB")).astype(int)
