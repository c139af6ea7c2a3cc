"""Reader for COCO's caption files (`captions_train2014.json`, ...) with a split file.

COCO's files carry no split: Karpathy's `dataset_coco.json` or a plain split JSON says which
image is in which split (see `caption.data.formats.splits`). An image's id is its COCO image
id, which is what COCO's own tools and result files use.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from caption.data.formats.common import first, image_root, load_json, summary
from caption.data.formats.splits import SplitEntry, first_time, read_splits_json
from caption.data.records import SPLITS, ImageRecord
from caption.data.vocab import tokenize
from caption.errors import CaptionError

log = logging.getLogger(__name__)

COCO_PREFIX = re.compile(r"^COCO_([A-Za-z]+\d{4})_")  # COCO_train2014_000000057870.jpg
_COCO_FILE = re.compile(r"^captions_(\w+)$")  # captions_train2014.json -> train2014


def read_coco(
    caption_files: str | Path,
    images: str | Path | None = None,
    splits_file: str | Path | None = None,
) -> dict[str, list[ImageRecord]]:
    """Read COCO caption files, split as `splits_file` says.

    Images are looked for under `images/<subfolder>/<file_name>`, the subfolder taken from
    the file name (`COCO_val2014_...` -> `val2014`) or else from the caption file's name
    (`captions_train2017.json` -> `train2017`); where `images` has no such subfolder, under
    `images/<file_name>`.

    Args:
        caption_files: `captions_*.json`: one file, a comma-separated list of files, or a
            folder holding them.
        images: the folder holding `train2014/` and `val2014/` (or the images themselves);
            defaults to the first caption file's folder.
        splits_file: Karpathy's `dataset_coco.json` (its `split` per `cocoid` or `filename`)
            or a plain JSON `{"train": [...], "val": [...], "test": [...]}` of file names or
            COCO ids. Images of the caption files that it does not name are ignored.

    Returns:
        `{"train": [...], "val": [...], "test": [...]}`, each in the split file's order, with
        the COCO image id as `imgid`.
    """
    files = _coco_files(caption_files)
    root = image_root(images, files[0])
    if splits_file is None:
        raise CaptionError(
            f"data.splits_file: the coco format needs a split file for {caption_files}; pass "
            "data.splits_file=<dataset_coco.json from Karpathy's caption_datasets.zip, or a "
            'JSON {"train": [...], "val": [...], "test": [...]}>'
        )
    entries = read_splits_json(Path(splits_file))
    # id -> (file_name, caption file) and id -> captions, merged over the files: COCO
    # ids are unique across train2014 and val2014.
    image_files: dict[int, tuple[str, Path]] = {}
    captions: dict[int, list[list[str]]] = {}
    n_dropped = 0
    for file in files:
        n_dropped += _read_coco_file(file, image_files, captions)
    splits, seen, missing = _split_records(
        entries, image_files, captions, root, f"data.splits_file: {splits_file}"
    )
    if missing:
        raise CaptionError(
            f"data.splits_file: {len(missing)} of {len(entries)} images in {splits_file} have "
            f"no captions in {_names(files)} ({first(missing)}); pass every captions_*.json "
            "the split file covers (a folder or a comma-separated list)"
        )
    n_ignored = sum(1 for name, _ in image_files.values() if name not in seen)
    log.info(
        "coco: %s; ignored %d captioned images that %s does not name%s",
        summary(splits),
        n_ignored,
        Path(splits_file).name,
        f"; dropped {n_dropped} captions without words" if n_dropped else "",
    )
    return splits


def _split_records(
    entries: list[SplitEntry],
    image_files: dict[int, tuple[str, Path]],
    captions: dict[int, list[list[str]]],
    root: Path,
    source: str,
) -> tuple[dict[str, list[ImageRecord]], dict[str, str], list[str]]:
    """The records of the split file's images, the split of each name seen, and the entries
    that have no captions."""
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
        name, caption_file = image_files[cocoid]
        if not first_time(seen, name, entry.split, source):
            continue
        if not captions.get(cocoid):
            missing.append(entry.label())
            continue
        record = ImageRecord(
            imgid=cocoid,
            path=_coco_path(root, name, caption_file, subfolders),
            split=entry.split,
            captions=captions[cocoid],
        )
        splits[entry.split].append(record)
    return splits, seen, missing


def _coco_files(caption_files: str | Path) -> list[Path]:
    """The caption files named by one path, a comma-separated list, or a folder."""
    spec = str(caption_files)
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
    doc = load_json(path, "data.annotations")
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


def _coco_path(root: Path, name: str, caption_file: Path, subfolders: dict[str, bool]) -> Path:
    """`root/<subfolder>/<name>` where root has that subfolder, else `root/<name>`."""
    candidates = []
    if m := COCO_PREFIX.match(name):
        candidates.append(m.group(1))
    if m := _COCO_FILE.match(caption_file.stem):
        candidates.append(m.group(1))
    for sub in candidates:
        # One stat per subfolder, not one per image: COCO has 123,287 of them.
        if subfolders.setdefault(sub, (root / sub).is_dir()):
            return root / sub / name
    return root / name


def _names(files: list[Path]) -> str:
    return ", ".join(f.name for f in files)
