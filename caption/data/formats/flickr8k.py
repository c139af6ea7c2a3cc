"""Reader for the raw Flickr8k text files (and Flickr30k's token file, which has their lines).

`Flickr8k.token.txt` holds `<image>#<n><TAB><caption>` lines; `Flickr_8k.{train,dev,test}Images.txt`
beside it name each split's images, one a line ("dev" is the val split). Flickr30k's
`results_20130124.token` has the same lines and no split files: it reads with a split file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from caption.data.formats.common import (
    caption_file_at,
    clip,
    first,
    image_root,
    summary,
    text_lines,
)
from caption.data.formats.splits import SplitEntry, first_time, read_splits_json
from caption.data.records import SPLITS, ImageRecord
from caption.data.vocab import tokenize
from caption.errors import CaptionError

log = logging.getLogger(__name__)

# The raw Flickr8k split files, found beside the token file; "dev" is the val split.
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def read_flickr8k(
    token_file: str | Path,
    images: str | Path | None = None,
    splits_file: str | Path | None = None,
) -> dict[str, list[ImageRecord]]:
    """Read the raw Flickr8k distribution (`Flickr8k.token.txt` and its split files).

    Captions are tokenised with `tokenize`, in `#<n>` order. Lines for images in no split
    are ignored and counted in a log line: the real token file has some (e.g.
    `2258277193_586949ec62.jpg.1`).

    Args:
        token_file: `Flickr8k.token.txt`; `Flickr_8k.{train,dev,test}Images.txt` must be
            beside it unless `splits_file` is given.
        images: the `Flicker8k_Dataset` folder; defaults to the token file's folder.
        splits_file: a plain split JSON of file names or a Karpathy JSON, instead of the
            split text files.

    Returns:
        `{"train": [...], "val": [...], "test": [...]}`; ids run 0.. over train, val, test.
    """
    token_file = caption_file_at(token_file, "Flickr8k.token.txt")
    root = image_root(images, token_file)
    captions, n_dropped = _read_token_file(token_file)
    if splits_file is not None:
        entries = read_splits_json(Path(splits_file))
        if any(e.name is None for e in entries):
            raise CaptionError(
                f"data.splits_file: {splits_file} names images by id; the flickr8k format "
                "needs file names (e.g. 1000268201_693b08cb0e.jpg)"
            )
    else:
        entries = _read_split_files(token_file.parent)
    source = (
        f"data.splits_file: {splits_file}"
        if splits_file is not None
        else f"data.annotations: the Flickr_8k.*Images.txt files in {token_file.parent}"
    )
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    seen: dict[str, str] = {}
    missing: list[str] = []
    n_records = 0
    for entry in entries:
        name = entry.name
        assert name is not None  # checked above; the split text files always give names
        if not first_time(seen, name, entry.split, source):
            continue
        if name not in captions:
            missing.append(name)
            continue
        # A running index in split-file order: the same files give the same ids.
        record = ImageRecord(n_records, root / name, entry.split, captions[name])
        splits[entry.split].append(record)
        n_records += 1
    if missing:
        where = splits_file or "the Flickr_8k.*Images.txt files"
        raise CaptionError(
            f"data.annotations: {token_file} has no captions for {len(missing)} of "
            f"{len(seen)} images in {where} ({first(missing)}); is it the matching token file?"
        )
    ignored = [name for name in captions if name not in seen]
    log.info(
        "flickr8k: %s; ignored %d images (%d captions) of %s that are in no split%s",
        summary(splits),
        len(ignored),
        sum(len(captions[name]) for name in ignored),
        token_file.name,
        f"; dropped {n_dropped} captions without words" if n_dropped else "",
    )
    return splits


def _read_token_file(path: Path) -> tuple[dict[str, list[list[str]]], int]:
    """`<image>#<n><TAB><caption>` lines -> image -> tokenised captions in `n` order."""
    numbered: dict[str, dict[int, list[str]]] = {}
    n_dropped = 0
    for lineno, line in enumerate(text_lines(path, "data.annotations"), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, n = key.strip().rpartition("#")
        if not tab or not hash_ or not name or not n.isdigit():
            raise CaptionError(
                f"data.annotations: {path} line {lineno}: expected "
                f"'<image>#<n><TAB><caption>', got {clip(line)!r}"
            )
        if int(n) in numbered.setdefault(name, {}):
            raise CaptionError(
                f"data.annotations: {path} line {lineno}: caption {name}#{n} appears twice"
            )
        tokens = tokenize(caption)
        if tokens:
            numbered[name][int(n)] = tokens
        else:
            n_dropped += 1  # punctuation only: nothing to learn, and an empty reference
    return {name: [c[k] for k in sorted(c)] for name, c in numbered.items()}, n_dropped


def _read_split_files(folder: Path) -> list[SplitEntry]:
    entries = []
    for split, filename in FLICKR8K_SPLIT_FILES.items():
        path = folder / filename
        if not path.is_file():
            raise CaptionError(
                f"data.annotations: {path} does not exist; the flickr8k format needs "
                f"{', '.join(FLICKR8K_SPLIT_FILES.values())} beside the token file, or "
                "data.splits_file=<json>"
            )
        names = (line.strip() for line in text_lines(path, "data.annotations"))
        entries += [SplitEntry(split, name, None) for name in names if name]
    return entries
