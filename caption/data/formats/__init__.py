"""Readers for the caption datasets as they are distributed, all giving `ImageRecord`s.

`read_dataset` (and `read_split`, for a `data` config) reads any of three layouts, each to
the same records as `read_karpathy`, one module per layout:

- `karpathy`: a Karpathy split JSON (`dataset_flickr8k.json`, `dataset_flickr30k.json`,
  `dataset_coco.json` from `caption_datasets.zip`).
- `flickr8k`: the raw Flickr8k text files: `Flickr8k.token.txt` (`<image>#<n><TAB><caption>`)
  with `Flickr_8k.{train,dev,test}Images.txt` beside it. Flickr30k's
  `results_20130124.token` has the same lines and reads with `splits_file=` its Karpathy JSON.
- `coco`: COCO caption files (`captions_train2014.json`, `captions_val2014.json`) with a split
  file: Karpathy's `dataset_coco.json` or a plain `{"train": [...], "val": [...], "test": [...]}`.

Image ids: a Karpathy JSON's `imgid`; for `flickr8k` a running index over the split files
(train, val, test, in file order); for `coco` the COCO image id, which is what COCO's own
tools and result files use.

Beside them: `detect` tells a caption file's layout (`data.format=auto`), `splits` reads the
split files of the layouts that have none of their own, `common` holds the file reading and
message pieces the readers share, and `check_images` here refuses a dataset with missing
image files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from caption.data.formats.coco import COCO_PREFIX, read_coco
from caption.data.formats.detect import FORMATS, detect_format
from caption.data.formats.flickr8k import read_flickr8k
from caption.data.formats.karpathy import read_karpathy
from caption.data.records import ImageRecord
from caption.errors import CaptionError

__all__ = [
    "FORMATS",
    "absolute_spec",
    "check_images",
    "detect_format",
    "read_coco",
    "read_dataset",
    "read_flickr8k",
    "read_karpathy",
    "read_split",
]

log = logging.getLogger(__name__)


def read_dataset(
    caption_file: str | Path,
    images: str | Path | None = None,
    format: str = "auto",
    splits_file: str | Path | None = None,
) -> dict[str, list[ImageRecord]]:
    """Read a caption dataset in any supported layout into records per split.

    Args:
        caption_file: a Karpathy JSON, a Flickr8k token file, or COCO caption JSON(s): one
            file, a comma-separated list, or a folder holding `captions_*.json`.
        images: the image folder; defaults to the caption file's folder.
        format: `karpathy`, `flickr8k`, `coco`, or `auto` to tell from the file.
        splits_file: the split of each image: required for `coco` (Karpathy's
            `dataset_coco.json` or a plain `{"train": [...], ...}` JSON of file names or
            ids); for `flickr8k` it replaces the `Flickr_8k.*Images.txt` files.

    Returns:
        `{"train": [...], "val": [...], "test": [...]}`.

    Raises:
        CaptionError: a file is missing or malformed, or the format is unknown.
    """
    if format == "auto":
        format = detect_format(caption_file)
    if format == "karpathy":
        if splits_file is not None:
            # A Karpathy file carries its own splits; ignoring the one given would surprise.
            raise CaptionError(
                f"data.splits_file: {splits_file} is given, but a Karpathy JSON has its own "
                "splits; set data.splits_file=null or use data.format=coco|flickr8k"
            )
        return read_karpathy(caption_file, images)
    if format == "flickr8k":
        return read_flickr8k(caption_file, images, splits_file)
    if format == "coco":
        return read_coco(caption_file, images, splits_file)
    raise CaptionError(
        f"data.format: unknown format {format!r}; use one of auto, {', '.join(FORMATS)}"
    )


def read_split(source: Any, split: str, default_format: str = "auto") -> list[ImageRecord]:
    """The records of one split of a dataset config, refusing an empty split in one line.

    Args:
        source: a mapping with `annotations` (the caption file), and optionally `images`,
            `format` and `splits_file`, like the `data` config group.
        split: `train`, `val` or `test`.
        default_format: the format when `source` names none.
    """
    records = read_dataset(
        source["annotations"],
        source.get("images"),
        source.get("format", default_format),
        source.get("splits_file"),
    )[split]
    if not records:
        raise CaptionError(
            f"split: {source['annotations']} has no {split!r} images; pick another split="
        )
    return records


def check_images(records: dict[str, list[ImageRecord]], limit: int = 5) -> None:
    """Fail when image files are missing, so that no run trains on part of a dataset.

    Args:
        records: records per split, as `read_dataset` returns them.
        limit: how many missing names the message lists.

    Raises:
        CaptionError: how many files are missing of how many, and the first `limit` names.
    """
    paths = list(dict.fromkeys(r.path for split in records.values() for r in split))
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        log.info("data: all %d image files are present", len(paths))
        return
    shown = missing[:limit]
    # The folder they share, once, then short names: the message stays one readable line.
    try:
        folder = Path(os.path.commonpath([p.parent for p in shown]))
        names = ", ".join(str(p.relative_to(folder)) for p in shown)
    except ValueError:  # relative and absolute paths mixed: no common folder
        folder, names = shown[0].parent, ", ".join(str(p) for p in shown)
    more = ", ..." if len(missing) > limit else ""
    # COCO images live in subfolders, so "the folder that holds them" is one level up.
    coco = (
        " (COCO: the folder holding train2014/ and val2014/)"
        if COCO_PREFIX.match(shown[0].name)
        else ""
    )
    raise CaptionError(
        f"data.images: {len(missing)} of {len(paths)} image files are missing under "
        f"{folder} ({names}{more}); point data.images=<dir> at the folder that holds "
        f"them{coco}"
    )


def absolute_spec(spec: str) -> str:
    """Make a data path absolute, each part of a comma-separated list of files alike.

    `Path(spec).resolve()` on `a.json,b.json` would make only the first part absolute.
    """
    if not spec:
        return spec
    parts = [spec] if Path(spec).expanduser().exists() else spec.split(",")
    return ",".join(str(Path(p.strip()).expanduser().resolve()) for p in parts)
