"""Readers for the caption datasets as they are distributed, all giving `ImageRecord`s.

Three layouts are served, each to the same records as `read_karpathy`:

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
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caption.data.karpathy import SPLITS, ImageRecord, read_karpathy
from caption.data.vocab import tokenize
from caption.errors import CaptionError

log = logging.getLogger(__name__)

FORMATS = ("karpathy", "flickr8k", "coco")
# The raw Flickr8k split files, found beside the token file; "dev" is the val split.
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# Split names a split file may use, and the split each one joins: COCO's restval is
# training data in every paper since Karpathy & Fei-Fei; Flickr8k calls val "dev".
_SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test"}
_TOKEN_LINE = re.compile(r"^[^\t#]+#\d+\t")
_COCO_PREFIX = re.compile(r"^COCO_([A-Za-z]+\d{4})_")  # COCO_train2014_000000057870.jpg
_COCO_FILE = re.compile(r"^captions_(\w+)$")  # captions_train2014.json -> train2014
# Enough of a JSON file's head to hold a Karpathy file's first image, sentences and all,
# so that auto-detection need not parse a 150 MB file twice.
_SNIFF_BYTES = 1 << 16


@dataclass(frozen=True)
class _SplitEntry:
    """One image named by a split file: by file name, by COCO id, or both."""

    split: str
    name: str | None
    id: int | None

    def label(self) -> str:
        return self.name if self.name is not None else str(self.id)


def read_dataset(
    annotations: str | Path,
    images: str | Path | None = None,
    format: str = "auto",
    splits_file: str | Path | None = None,
) -> dict[str, list[ImageRecord]]:
    """Read a caption dataset in any supported layout into records per split.

    Args:
        annotations: a Karpathy JSON, a Flickr8k token file, or COCO caption JSON(s): one
            file, a comma-separated list, or a folder holding `captions_*.json`.
        images: the image folder; defaults to the annotation file's folder.
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
        format = detect_format(annotations)
    if format == "karpathy":
        if splits_file is not None:
            # A Karpathy file carries its own splits; ignoring the one given would surprise.
            raise CaptionError(
                f"data.splits_file: {splits_file} is given, but a Karpathy JSON has its own "
                "splits; set data.splits_file=null or use data.format=coco|flickr8k"
            )
        return read_karpathy(annotations, images)
    if format == "flickr8k":
        return read_flickr8k(annotations, images, splits_file)
    if format == "coco":
        return read_coco(annotations, images, splits_file)
    raise CaptionError(
        f"data.format: unknown format {format!r}; use one of auto, {', '.join(FORMATS)}"
    )


def read_split(source: Any, split: str, default_format: str = "auto") -> list[ImageRecord]:
    """The records of one split of a dataset config, refusing an empty split in one line.

    Args:
        source: a mapping with `annotations`, and optionally `images`, `format` and
            `splits_file`, like the `data` config group.
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


def detect_format(annotations: str | Path) -> str:
    """Tell the layout of `annotations`: `karpathy`, `flickr8k` or `coco`.

    A JSON with `images[].sentences` is Karpathy's, one with an `annotations` list is
    COCO's; a text file of `<image>#<n><TAB><caption>` lines is Flickr8k's; a folder holding
    `captions_*.json`, or a comma-separated list, is COCO's.

    Raises:
        CaptionError: the path is missing or is in none of the formats; the message says what
            the file looks like (`empty`, `a JSON list`, `text whose first line is '...'`).
    """
    spec = str(annotations)
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
        doc = _load_json(path, "data.annotations")
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
    """The one-line error for annotations in no known format, saying what they look like."""
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
    return f"text whose first line is {_clip(line, 60)!r}"


def read_flickr8k(
    annotations: str | Path,
    images: str | Path | None = None,
    splits_file: str | Path | None = None,
) -> dict[str, list[ImageRecord]]:
    """Read the raw Flickr8k distribution (`Flickr8k.token.txt` and its split files).

    Captions are tokenised with `tokenize`, in `#<n>` order. Lines for images in no split
    are ignored and counted in a log line: the real token file has some (e.g.
    `2258277193_586949ec62.jpg.1`).

    Args:
        annotations: `Flickr8k.token.txt`; `Flickr_8k.{train,dev,test}Images.txt` must be
            beside it unless `splits_file` is given.
        images: the `Flicker8k_Dataset` folder; defaults to the token file's folder.
        splits_file: a plain split JSON of file names or a Karpathy JSON, instead of the
            split text files.

    Returns:
        `{"train": [...], "val": [...], "test": [...]}`; ids run 0.. over train, val, test.
    """
    token_file = Path(annotations)
    if not token_file.is_file():
        raise CaptionError(
            f"data.annotations: {token_file} does not exist; pass Flickr8k.token.txt with "
            "data.annotations=<file>"
        )
    root = _image_root(images, token_file)
    captions, n_dropped = _read_token_file(token_file)
    if splits_file is not None:
        entries = _read_splits_json(Path(splits_file))
        if any(e.name is None for e in entries):
            raise CaptionError(
                f"data.splits_file: {splits_file} names images by id; the flickr8k format "
                "needs file names (e.g. 1000268201_693b08cb0e.jpg)"
            )
    else:
        entries = _read_flickr8k_split_files(token_file.parent)
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
        if not _first_time(seen, name, entry.split, source):
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
            f"{len(seen)} images in {where} ({_first(missing)}); is it the matching token file?"
        )
    ignored = [name for name in captions if name not in seen]
    log.info(
        "flickr8k: %s; ignored %d images (%d captions) of %s that are in no split%s",
        _summary(splits),
        len(ignored),
        sum(len(captions[name]) for name in ignored),
        token_file.name,
        f"; dropped {n_dropped} captions without words" if n_dropped else "",
    )
    return splits


def read_coco(
    annotations: str | Path,
    images: str | Path | None = None,
    splits_file: str | Path | None = None,
) -> dict[str, list[ImageRecord]]:
    """Read COCO caption files, split as `splits_file` says.

    Images are looked for under `images/<subfolder>/<file_name>`, the subfolder taken from
    the file name (`COCO_val2014_...` -> `val2014`) or else from the annotation file's name
    (`captions_train2017.json` -> `train2017`); where `images` has no such subfolder, under
    `images/<file_name>`.

    Args:
        annotations: `captions_*.json`: one file, a comma-separated list of files, or a
            folder holding them.
        images: the folder holding `train2014/` and `val2014/` (or the images themselves);
            defaults to the first annotation file's folder.
        splits_file: Karpathy's `dataset_coco.json` (its `split` per `cocoid` or `filename`)
            or a plain JSON `{"train": [...], "val": [...], "test": [...]}` of file names or
            COCO ids. Images of the annotations that it does not name are ignored.

    Returns:
        `{"train": [...], "val": [...], "test": [...]}`, each in the split file's order, with
        the COCO image id as `imgid`.
    """
    files = _coco_files(annotations)
    root = _image_root(images, files[0])
    if splits_file is None:
        raise CaptionError(
            f"data.splits_file: the coco format needs a split file for {annotations}; pass "
            "data.splits_file=<dataset_coco.json from Karpathy's caption_datasets.zip, or a "
            'JSON {"train": [...], "val": [...], "test": [...]}>'
        )
    entries = _read_splits_json(Path(splits_file))
    # id -> (file_name, annotation file) and id -> captions, merged over the files: COCO
    # ids are unique across train2014 and val2014.
    image_files: dict[int, tuple[str, Path]] = {}
    captions: dict[int, list[list[str]]] = {}
    n_dropped = 0
    for file in files:
        n_dropped += _read_coco_file(file, image_files, captions)
    by_name = {name: i for i, (name, _) in image_files.items()}
    splits: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    seen: dict[str, str] = {}
    missing: list[str] = []
    subfolders: dict[str, bool] = {}
    for entry in entries:
        if entry.id is not None and entry.id in image_files:
            cocoid = entry.id
        elif entry.name is not None and entry.name in by_name:
            cocoid = by_name[entry.name]
        else:
            missing.append(entry.label())
            continue
        name, source = image_files[cocoid]
        if not _first_time(seen, name, entry.split, f"data.splits_file: {splits_file}"):
            continue
        if not captions.get(cocoid):
            missing.append(entry.label())
            continue
        record = ImageRecord(
            imgid=cocoid,
            path=_coco_path(root, name, source, subfolders),
            split=entry.split,
            captions=captions[cocoid],
        )
        splits[entry.split].append(record)
    if missing:
        raise CaptionError(
            f"data.splits_file: {len(missing)} of {len(entries)} images in {splits_file} have "
            f"no captions in {_names(files)} ({_first(missing)}); pass every captions_*.json "
            "the split file covers (a folder or a comma-separated list)"
        )
    n_ignored = sum(1 for name, _ in image_files.values() if name not in seen)
    log.info(
        "coco: %s; ignored %d captioned images that %s does not name%s",
        _summary(splits),
        n_ignored,
        Path(splits_file).name,
        f"; dropped {n_dropped} captions without words" if n_dropped else "",
    )
    return splits


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
        if _COCO_PREFIX.match(shown[0].name)
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


# --- Flickr8k -------------------------------------------------------------------------


def _read_token_file(path: Path) -> tuple[dict[str, list[list[str]]], int]:
    """`<image>#<n><TAB><caption>` lines -> image -> tokenised captions in `n` order."""
    numbered: dict[str, dict[int, list[str]]] = {}
    n_dropped = 0
    for lineno, line in enumerate(_text_lines(path, "data.annotations"), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_, n = key.strip().rpartition("#")
        if not tab or not hash_ or not name or not n.isdigit():
            raise CaptionError(
                f"data.annotations: {path} line {lineno}: expected "
                f"'<image>#<n><TAB><caption>', got {_clip(line)!r}"
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


def _read_flickr8k_split_files(folder: Path) -> list[_SplitEntry]:
    entries = []
    for split, filename in FLICKR8K_SPLIT_FILES.items():
        path = folder / filename
        if not path.is_file():
            raise CaptionError(
                f"data.annotations: {path} does not exist; the flickr8k format needs "
                f"{', '.join(FLICKR8K_SPLIT_FILES.values())} beside the token file, or "
                "data.splits_file=<json>"
            )
        names = (line.strip() for line in _text_lines(path, "data.annotations"))
        entries += [_SplitEntry(split, name, None) for name in names if name]
    return entries


# --- COCO -----------------------------------------------------------------------------


def _coco_files(annotations: str | Path) -> list[Path]:
    """The caption files named by one path, a comma-separated list, or a folder."""
    spec = str(annotations)
    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("captions_*.json"))
        if not files:
            raise CaptionError(
                f"data.annotations: folder {path} holds no captions_*.json; pass the COCO "
                "caption files' folder (annotations/ of annotations_trainval2014.zip)"
            )
        return files
    files = [path] if path.exists() else [Path(p.strip()) for p in spec.split(",") if p.strip()]
    for file in files:
        if not file.is_file():
            raise CaptionError(
                f"data.annotations: {file} does not exist; pass COCO captions_*.json files "
                "(one, a comma-separated list, or their folder) with data.annotations="
            )
    return files


def _read_coco_file(
    path: Path,
    image_files: dict[int, tuple[str, Path]],
    captions: dict[int, list[list[str]]],
) -> int:
    """Add one COCO captions file's images and captions; return the captions dropped."""
    doc = _load_json(path, "data.annotations")
    if not (
        isinstance(doc, dict)
        and isinstance(doc.get("images"), list)
        and isinstance(doc.get("annotations"), list)
    ):
        raise CaptionError(
            f"data.annotations: {path} is not a COCO captions file (expected an object "
            "with 'images' and 'annotations' lists)"
        )
    own: set[int] = set()
    for n, img in enumerate(doc["images"]):
        try:
            cocoid, name = int(img["id"]), str(img["file_name"])
        except (KeyError, TypeError, ValueError) as e:
            raise CaptionError(
                f"data.annotations: {path}: images[{n}] is malformed ({type(e).__name__}: "
                f"{e}); each image needs 'id' and 'file_name'"
            ) from None
        if image_files.get(cocoid, (name,))[0] != name:
            raise CaptionError(
                f"data.annotations: {path}: image id {cocoid} is {name} here but "
                f"{image_files[cocoid][0]} in {image_files[cocoid][1]}; ids must be unique"
            )
        image_files[cocoid] = (name, path)
        own.add(cocoid)
    n_dropped = 0
    for n, ann in enumerate(doc["annotations"]):
        try:
            cocoid, caption = int(ann["image_id"]), ann["caption"]
            if not isinstance(caption, str):
                raise TypeError(f"caption is {type(caption).__name__}, not text")
        except (KeyError, TypeError, ValueError) as e:
            raise CaptionError(
                f"data.annotations: {path}: annotations[{n}] is malformed ({type(e).__name__}:"
                f" {e}); each needs 'image_id' and 'caption' (is this a captions_*.json file?)"
            ) from None
        if cocoid not in own:
            raise CaptionError(
                f"data.annotations: {path}: annotations[{n}] is for image_id {cocoid}, "
                "which is not in the file's 'images' list"
            )
        tokens = tokenize(caption)
        if tokens:
            captions.setdefault(cocoid, []).append(tokens)
        else:
            n_dropped += 1
    return n_dropped


def _coco_path(root: Path, name: str, source: Path, subfolders: dict[str, bool]) -> Path:
    """`root/<subfolder>/<name>` where root has that subfolder, else `root/<name>`."""
    candidates = []
    if m := _COCO_PREFIX.match(name):
        candidates.append(m.group(1))
    if m := _COCO_FILE.match(source.stem):
        candidates.append(m.group(1))
    for sub in candidates:
        # One stat per subfolder, not one per image: COCO has 123,287 of them.
        if subfolders.setdefault(sub, (root / sub).is_dir()):
            return root / sub / name
    return root / name


# --- Split files ----------------------------------------------------------------------


def _read_splits_json(path: Path) -> list[_SplitEntry]:
    """A Karpathy JSON or a plain `{"train": [...], ...}` JSON -> entries in file order."""
    doc = _load_json(path, "data.splits_file")
    if isinstance(doc, dict) and isinstance(doc.get("images"), list):
        return list(_karpathy_entries(path, doc["images"]))
    if not isinstance(doc, dict) or not doc:
        raise CaptionError(
            f"data.splits_file: {path} is neither a Karpathy split JSON (an 'images' list) "
            'nor a JSON {"train": [...], "val": [...], "test": [...]}'
        )
    entries = []
    for key, items in doc.items():
        if key not in _SPLIT_ALIASES:
            raise CaptionError(
                f"data.splits_file: {path} has unknown split {key!r}; use train, val, test "
                "(restval and dev are taken as train and val)"
            )
        if not isinstance(items, list):
            raise CaptionError(f"data.splits_file: {path}: {key!r} must be a list of images")
        for item in items:
            entries.append(_plain_entry(path, _SPLIT_ALIASES[key], key, item))
    return entries


def _karpathy_entries(path: Path, images: list[Any]) -> Iterator[_SplitEntry]:
    for n, img in enumerate(images):
        try:
            split = _SPLIT_ALIASES[img["split"]]
            cocoid = img.get("cocoid")
            entry = _SplitEntry(
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


def _plain_entry(path: Path, split: str, key: str, item: Any) -> _SplitEntry:
    if isinstance(item, int) and not isinstance(item, bool):
        return _SplitEntry(split, None, item)
    if isinstance(item, str) and item.strip():
        item = item.strip()
        # All digits: an id written as text; anything else is a file name, maybe with
        # its subfolder (val2014/COCO_val2014_...jpg).
        return (
            _SplitEntry(split, None, int(item))
            if item.isdigit()
            else _SplitEntry(split, Path(item).name, None)
        )
    raise CaptionError(
        f"data.splits_file: {path}: {key!r} holds {item!r}; entries must be file names or "
        "integer image ids"
    )


def _first_time(seen: dict[str, str], name: str, split: str, source: str) -> bool:
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


# --- Helpers --------------------------------------------------------------------------


def _image_root(images: str | Path | None, annotations: Path) -> Path:
    root = Path(images) if images is not None else annotations.parent
    if not root.is_dir():
        raise CaptionError(
            f"data.images: {root} is not a folder; pass the image folder with data.images=<dir>"
        )
    return root


def _load_json(path: Path, key: str) -> Any:
    if not path.is_file():
        raise CaptionError(f"{key}: {path} does not exist; pass {key}=<file>")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaptionError(f"{key}: {path} is not valid JSON ({e})") from None


def _text_lines(path: Path, key: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise CaptionError(f"{key}: {path} is not UTF-8 text ({e})") from None


def _summary(splits: dict[str, list[ImageRecord]]) -> str:
    return ", ".join(
        f"{len(records)} {split} images ({sum(len(r.captions) for r in records)} captions)"
        for split, records in splits.items()
    )


def _first(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    return "first: " + ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _names(files: list[Path]) -> str:
    return ", ".join(f.name for f in files)


def _clip(line: str, width: int = 60) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."
