"""Telling a caption file's format from the file: `detect_format`, for `data.format=auto`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from caption.data.formats.common import clip, load_json
from caption.errors import CaptionError

FORMATS = ("karpathy", "flickr8k", "coco")
_TOKEN_LINE = re.compile(r"^[^\t#]+#\d+\t")
# Enough of a JSON file's head to hold a Karpathy file's first image, sentences and all,
# so that auto-detection need not parse a 150 MB file twice.
_SNIFF_BYTES = 1 << 16


def detect_format(caption_file: str | Path) -> str:
    """Tell the layout of `caption_file`: `karpathy`, `flickr8k` or `coco`.

    A JSON with `images[].sentences` is Karpathy's, one with an `annotations` list is
    COCO's; a text file of `<image>#<n><TAB><caption>` lines is Flickr8k's; a folder holding
    `captions_*.json`, or a comma-separated list, is COCO's.

    Raises:
        CaptionError: the path is missing or is in none of the formats; the message says what
            the file looks like (`empty`, `a JSON list`, `text whose first line is '...'`).
    """
    spec = str(caption_file)
    path = Path(spec)
    if not path.exists() and "," in spec:
        return "coco"
    if path.is_dir():
        if any(path.glob("captions_*.json")):
            return "coco"
        raise _unknown_format(spec, "a folder without captions_*.json files")
    if not path.is_file():
        raise CaptionError(f"data.annotations: {spec} does not exist; pass data.annotations=<file>")
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES).decode("utf-8", errors="replace")
    if head.lstrip("\ufeff \t\r\n").startswith(("{", "[")):
        if re.search(r'"sentences"\s*:', head):
            return "karpathy"
        if re.search(r'"(annotations|image_id)"\s*:', head):
            return "coco"
        # Nothing telling in the head (a small file, or a first image longer than the head):
        # look at the structure.
        doc = load_json(path, "data.annotations")
        if isinstance(doc, dict) and isinstance(doc.get("images"), list):
            image0 = doc["images"][0] if doc["images"] else None
            if isinstance(image0, dict) and "sentences" in image0:
                return "karpathy"
            if isinstance(doc.get("annotations"), list):
                return "coco"
        raise _unknown_format(spec, _json_shape(doc))
    first = next((line for line in head.splitlines() if line.strip()), "")
    if _TOKEN_LINE.match(first):
        return "flickr8k"
    raise _unknown_format(spec, _text_shape(head, first))


def _unknown_format(spec: str, looks: str) -> CaptionError:
    """The one-line error for a caption file in no known format, saying what it looks like."""
    return CaptionError(
        f"data.annotations: {spec} is {looks}, in no known format; expected a Karpathy split "
        "JSON (images[].sentences), a Flickr8k token file (<image>#<n><TAB><caption> lines) "
        "or COCO captions JSON (images + annotations), or set data.format=" + "|".join(FORMATS)
    )


def _json_shape(doc: Any) -> str:
    """What a parsed JSON object or list is, in a few words: its type and its first keys."""
    if isinstance(doc, dict):
        if not doc:
            return "an empty JSON object"
        keys = [str(k) for k in doc]
        return f"a JSON object with keys {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
    return f"a JSON list of {len(doc)} items"  # nothing else starts with { or [


def _text_shape(head: str, first: str) -> str:
    """What a file that is not JSON is, from its head and first non-blank line."""
    if not head.strip("\ufeff \t\r\n"):
        return "empty"
    if "\x00" in head:  # text has no NUL bytes; images and archives do
        return "binary data, not text"
    line = first.lstrip("\ufeff").strip()
    return f"text whose first line is {clip(line, 60)!r}"
