"""Results files: the captions another run or tool wrote, matched to a split's records.

`caption-evaluate results=<file>` scores them without a model: JSON Lines as
`caption-generate` writes (`image`, `caption`), or COCO's results list (`image_id`, `caption`).
"""

from __future__ import annotations

import json
from pathlib import Path

from caption.data.records import ImageRecord
from caption.data.vocab import tokenize
from caption.errors import CaptionError


def load_results(
    path: str | Path, records: list[ImageRecord], partial: bool = False
) -> tuple[list[ImageRecord], list[list[str]]]:
    """The records a results file captions, and their captions, in `records` order.

    Args:
        path: JSON Lines with `image` (a file name or path) and `caption`, as `caption-generate`
            writes, or the COCO results format `[{"image_id", "caption"}]`.
        records: the images of the split to score.
        partial: keep the records the file captions and drop the others, instead of refusing
            a file that misses some.

    Raises:
        CaptionError: the file is unreadable, or some image of the split has no caption (with
            `partial`: none has).
    """
    captions = _read_results(Path(path))
    covered, ordered, missing = [], [], []
    for r in records:
        caption = captions.get(("name", r.path.name), captions.get(("id", r.imgid)))
        if caption is None:
            missing.append(r.path.name)
        else:
            covered.append(r)
            ordered.append(caption)
    if missing and not partial:  # scoring the rest would hide how many were left out
        raise CaptionError(
            f"results: {path} has no caption for {len(missing)} of "
            f"{len(records)} images ({', '.join(missing[:5])}); caption them all"
        )
    if not covered:
        raise CaptionError(
            f"results: {path} captions none of the split's {len(records)} images "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
            "check split= and the dataset it is scored against"
        )
    return covered, ordered


def _read_results(path: Path) -> dict[tuple[str, object], list[str]]:
    """A results file's tokenised captions by `("name", file name)` or `("id", image id)`."""
    if not path.is_file():
        raise CaptionError(f"results: {path} does not exist")
    text = path.read_text()
    try:
        if text.lstrip().startswith("["):
            entries = json.loads(text)
        else:
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise CaptionError(
            f"results: {path} is neither JSON Lines nor a COCO results list ({e})"
        ) from None
    captions: dict[tuple[str, object], list[str]] = {}
    for n, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or "caption" not in entry:
            raise CaptionError(f"results: {path}: entry {n} has no 'caption'")
        if "image_id" in entry:
            key: tuple[str, object] = ("id", int(entry["image_id"]))
        elif "image" in entry:
            key = ("name", Path(str(entry["image"])).name)
        else:
            raise CaptionError(f"results: {path}: entry {n} has neither 'image' nor 'image_id'")
        captions[key] = tokenize(str(entry["caption"]))
    return captions
