"""Split files, for the formats whose caption files carry no split (`flickr8k`, `coco`).

A split file is a Karpathy split JSON (each image's `split`, by `filename` or `cocoid`) or a
plain JSON `{"train": [...], "val": [...], "test": [...]}` of file names or image ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caption.data.formats.common import load_json
from caption.errors import CaptionError

# Split names a split file may use, and the split each one joins: COCO's restval is
# training data in every paper since Karpathy & Fei-Fei; Flickr8k calls val "dev".
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test"}


@dataclass(frozen=True)
class SplitEntry:
    """One image named by a split file: by file name, by COCO id, or both."""

    split: str
    name: str | None
    id: int | None

    def label(self) -> str:
        return self.name if self.name is not None else str(self.id)


def read_splits_json(path: Path) -> list[SplitEntry]:
    """A Karpathy JSON or a plain `{"train": [...], ...}` JSON -> entries in file order."""
    doc = load_json(path, "data.splits_file")
    if isinstance(doc, dict) and isinstance(doc.get("images"), list):
        return list(_karpathy_entries(path, doc["images"]))
    if not isinstance(doc, dict) or not doc:
        raise CaptionError(
            f"data.splits_file: {path} is neither a Karpathy split JSON (an 'images' list) "
            'nor a JSON {"train": [...], "val": [...], "test": [...]}'
        )
    entries = []
    for key, items in doc.items():
        if key not in SPLIT_ALIASES:
            raise CaptionError(
                f"data.splits_file: {path} has unknown split {key!r}; use train, val, test "
                "(restval and dev are taken as train and val)"
            )
        if not isinstance(items, list):
            raise CaptionError(f"data.splits_file: {path}: {key!r} must be a list of images")
        for item in items:
            entries.append(_plain_entry(path, SPLIT_ALIASES[key], key, item))
    return entries


def first_time(seen: dict[str, str], name: str, split: str, source: str) -> bool:
    """Whether `name` is new; an image in two splits would leak test data: refuse it."""
    if name not in seen:
        seen[name] = split
        return True
    if seen[name] != split:
        raise CaptionError(
            f"{source} puts {name} in both {seen[name]} and {split}; "
            "each image belongs to one split"
        )
    return False  # listed twice in one split: keep it once


def _karpathy_entries(path: Path, images: list[Any]) -> Iterator[SplitEntry]:
    for n, img in enumerate(images):
        try:
            split = SPLIT_ALIASES[img["split"]]
            cocoid = img.get("cocoid")
            entry = SplitEntry(
                split,
                Path(img["filename"]).name if img.get("filename") else None,
                int(cocoid) if cocoid is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CaptionError(
                f"data.splits_file: {path}: images[{n}] is malformed ({type(e).__name__}: "
                f"{e}); each needs a 'split' (train, val, test, restval) and 'filename'"
            ) from None
        if entry.name is None and entry.id is None:
            raise CaptionError(
                f"data.splits_file: {path}: images[{n}] has neither 'filename' nor 'cocoid'"
            )
        yield entry


def _plain_entry(path: Path, split: str, key: str, item: Any) -> SplitEntry:
    if isinstance(item, int) and not isinstance(item, bool):
        return SplitEntry(split, None, item)
    if isinstance(item, str) and item.strip():
        item = item.strip()
        # All digits: an id written as text; anything else is a file name, maybe with
        # its subfolder (val2014/COCO_val2014_...jpg).
        return (
            SplitEntry(split, None, int(item))
            if item.isdigit()
            else SplitEntry(split, Path(item).name, None)
        )
    raise CaptionError(
        f"data.splits_file: {path}: {key!r} holds {item!r}; entries must be file names or "
        "integer image ids"
    )
