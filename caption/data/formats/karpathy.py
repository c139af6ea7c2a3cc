"""Reader for Karpathy split JSON files (Flickr8k, Flickr30k, COCO and the shapes set).

The format: `{"images": [{"filename", "filepath"?, "split", "imgid", "sentids",
"sentences": [{"tokens", "raw", "sentid", "imgid", "groundings"?}], "objects"?}]}`.
COCO's `restval` images join the train split, as in every paper since Karpathy & Fei-Fei.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caption.data.formats.common import caption_file_at, image_root
from caption.data.records import SPLITS, ImageRecord
from caption.data.vocab import tokenize
from caption.errors import CaptionError


def read_karpathy(
    caption_file: str | Path, images: str | Path | None = None
) -> dict[str, list[ImageRecord]]:
    """Read a Karpathy split JSON into records per split.

    Args:
        caption_file: the JSON file.
        images: the folder that `filepath/filename` is relative to; defaults to the JSON's folder.

    Returns:
        `{"train": [...], "val": [...], "test": [...]}`.
    """
    caption_file = caption_file_at(caption_file, "the Karpathy split JSON")
    root = image_root(images, caption_file)
    try:
        doc = json.loads(caption_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaptionError(f"data.annotations: {caption_file} is not valid JSON ({e})") from None

    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise CaptionError(
            f"data.annotations: {caption_file} is not a Karpathy split file "
            "(expected an object with an 'images' list)"
        )
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for n, img in enumerate(doc["images"]):
        record = _record(caption_file, root, n, img)
        if record.split not in splits:
            raise CaptionError(
                f"data.annotations: {caption_file}: image #{n} has unknown split "
                f"{img['split']!r}; expected train, val, test or restval"
            )
        splits[record.split].append(record)
    return splits


def _record(caption_file: Path, root: Path, n: int, img: Any) -> ImageRecord:
    """Image #`n` of the file as a record; a malformed entry fails naming the field."""
    name = img.get("filename") if isinstance(img, dict) else None
    field = "the image entry"  # which field is being read, for the error message
    try:
        if not isinstance(img, dict):
            raise TypeError(f"expected an object, got {type(img).__name__}")
        field = "split"
        split = "train" if img["split"] == "restval" else img["split"]
        field = "sentences"
        sentences = img["sentences"]
        if not isinstance(sentences, list):
            raise TypeError(f"expected a list, got {type(sentences).__name__}")
        captions = []
        for k, s in enumerate(sentences):
            field = f"sentences[{k}].tokens/raw"
            captions.append(s["tokens"] if s.get("tokens") else tokenize(s["raw"]))
        field = "filename"
        path = root / img.get("filepath", "") / img["filename"]
        groundings = []
        for k, s in enumerate(sentences):
            field = f"sentences[{k}].groundings"
            groundings.append({int(a): int(b) for a, b in s.get("groundings", {}).items()})
        field = "imgid/width/height"
        return ImageRecord(
            imgid=int(img.get("imgid", n)),
            path=path,
            split=split,
            captions=captions,
            objects=img.get("objects", []),
            groundings=groundings,
            width=int(img["width"]) if img.get("width") else None,
            height=int(img["height"]) if img.get("height") else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = "is missing" if isinstance(e, KeyError) else f"is malformed ({e})"
        raise CaptionError(
            f"data.annotations: {caption_file}: image #{n}"
            + (f" ({name})" if name else "")
            + f": field '{field}' {what}; each image needs 'filename', 'split' "
            "and 'sentences' with 'tokens' or 'raw'"
        ) from None
