"""What the readers share: reading JSON and text files, the image folder, message pieces."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from caption.data.records import ImageRecord
from caption.errors import CaptionError


def caption_file_at(path: str | Path, what: str) -> Path:
    """`path` as a `Path`; a missing file fails saying what to pass (`what`) instead."""
    path = Path(path)
    if not path.is_file():
        raise CaptionError(
            f"data.annotations: {path} does not exist; pass {what} with data.annotations=<file>"
        )
    return path


def image_root(images: str | Path | None, caption_file: Path) -> Path:
    """The image folder: `images`, or else the caption file's folder; it must exist."""
    root = Path(images) if images is not None else caption_file.parent
    if not root.is_dir():
        raise CaptionError(
            f"data.images: {root} is not a folder; pass the image folder with data.images=<dir>"
        )
    return root


def load_json(path: Path, key: str) -> Any:
    """Parse a JSON file; `key` (the config key that named it) leads any error message."""
    if not path.is_file():
        raise CaptionError(f"{key}: {path} does not exist; pass {key}=<file>")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaptionError(f"{key}: {path} is not valid JSON ({e})") from None


def text_lines(path: Path, key: str) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark is dropped)."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise CaptionError(f"{key}: {path} is not UTF-8 text ({e})") from None


def summary(splits: dict[str, list[ImageRecord]]) -> str:
    """`6000 train images (30000 captions), ...`: what a reader read, for its log line."""
    return ", ".join(
        f"{len(records)} {split} images ({sum(len(r.captions) for r in records)} captions)"
        for split, records in splits.items()
    )


def first(names: Iterable[str], limit: int = 5) -> str:
    """`first: a, b, c, ...`: the first `limit` names of a list, for an error message."""
    names = list(names)
    return "first: " + ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def clip(line: str, width: int = 60) -> str:
    """`line`, cut to `width` characters with `...` where longer."""
    return line if len(line) <= width else line[: width - 3] + "..."
