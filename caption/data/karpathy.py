"""Reader for Karpathy split JSON files (Flickr8k, Flickr30k, COCO and the shapes set).

The format: `{"images": [{"filename", "filepath"?, "split", "imgid", "sentids",
"sentences": [{"tokens", "raw", "sentid", "imgid", "groundings"?}], "objects"?}]}`.
COCO's `restval` images join the train split, as in every paper since Karpathy & Fei-Fei.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caption.data.vocab import tokenize
from caption.errors import CaptionError

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    """One image and its reference captions.

    Args:
        imgid: the file's `imgid`.
        path: where the image file is.
        split: train, val or test.
        captions: the reference captions, tokenised.
        objects: ground-truth objects (`box`, `words`), where the dataset has them.
        groundings: per caption, token index -> object index, where the dataset has them.
        width: the original image's width in pixels, where the file says (boxes are in these
            pixels).
        height: the original image's height in pixels, where the file says.
    """

    imgid: int
    path: Path
    split: str
    captions: list[list[str]]
    objects: list[dict[str, Any]] = field(default_factory=list)
    groundings: list[dict[int, int]] = field(default_factory=list)
    width: int | None = None
    height: int | None = None


def read_karpathy(
    annotations: str | Path, images: str | Path | None = None
) -> dict[str, list[ImageRecord]]:
    """Read a Karpathy split JSON into records per split.

    Args:
        annotations: the JSON file.
        images: the folder that `filepath/filename` is relative to; defaults to the JSON's folder.

    Returns:
        `{"train": [...], "val": [...], "test": [...]}`.
    """
    annotations = Path(annotations)
    root = Path(images) if images is not None else annotations.parent
    if not annotations.is_file():
        raise CaptionError(
            f"data.annotations: {annotations} does not exist; pass the Karpathy "
            "split JSON with data.annotations=<file>"
        )
    if not root.is_dir():
        raise CaptionError(
            f"data.images: {root} is not a folder; pass the image folder with data.images=<dir>"
        )
    try:
        doc = json.loads(annotations.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaptionError(f"data.annotations: {annotations} is not valid JSON ({e})") from None

    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise CaptionError(
            f"data.annotations: {annotations} is not a Karpathy split file "
            "(expected an object with an 'images' list)"
        )
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    for n, img in enumerate(doc["images"]):
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
            record = ImageRecord(
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
                f"data.annotations: {annotations}: image #{n}"
                + (f" ({name})" if name else "")
                + f": field '{field}' {what}; each image needs 'filename', 'split' "
                "and 'sentences' with 'tokens' or 'raw'"
            ) from None
        if split not in splits:
            raise CaptionError(
                f"data.annotations: {annotations}: image #{n} has unknown split "
                f"{img['split']!r}; expected train, val, test or restval"
            )
        splits[split].append(record)
    return splits
