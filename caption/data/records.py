"""What every dataset reader gives: one `ImageRecord` per image, grouped by split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    """One image and its reference captions.

    Args:
        imgid: the image's id: a Karpathy JSON's `imgid`, a running index for raw Flickr8k,
            the COCO image id for COCO's caption files.
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
