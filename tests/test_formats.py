"""The dataset readers for Karpathy, raw Flickr8k and COCO layouts, on real photos."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from caption.data.formats import (
    absolute_spec,
    check_images,
    detect_format,
    read_dataset,
    read_karpathy,
)
from caption.data.images import load_image
from caption.data.records import ImageRecord
from caption.errors import CaptionError
from tests.helpers.cli import run
from tests.helpers.config import TINY_MODEL

skdata = pytest.importorskip("skimage.data", reason="scikit-image gives the test photos")

# Four photographs bundled with scikit-image (no download), standing in for dataset images.
PHOTOS = {
    "coffee": skdata.coffee,
    "chelsea": skdata.chelsea,
    "astronaut": skdata.astronaut,
    "rocket": skdata.rocket,
}
FLICKR_NAMES = {  # Flickr8k-style file name -> photo
    "1000268201_693b08cb0e.jpg": "coffee",
    "1001773457_577c3a7d70.jpg": "chelsea",
    "1002674143_1b742ab4b8.jpg": "astronaut",
    "1003163366_44323f5815.jpg": "rocket",
}
CAPTIONS = {
    "coffee": ["A cup of coffee on a saucer.", "Coffee in a red cup!"],
    "chelsea": ["A ginger cat looks up.", "The cat, Chelsea, sits."],
    "astronaut": ["An astronaut poses with a flag.", "A woman in a space suit."],
    "rocket": ["A rocket on the launch pad.", "The shuttle waits to launch."],
}
COCO_IMAGES = [  # (id, file name, subfolder, photo)
    (57870, "COCO_train2014_000000057870.jpg", "train2014", "coffee"),
    (384029, "COCO_train2014_000000384029.jpg", "train2014", "chelsea"),
    (391895, "COCO_val2014_000000391895.jpg", "val2014", "astronaut"),
    (522418, "COCO_val2014_000000522418.jpg", "val2014", "rocket"),
]
SIZE = 32  # loading at a small size keeps the tests fast


def write_photo(path: Path, photo: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(PHOTOS[photo]()).save(path, quality=85)
    return path


def words(raw: str) -> list[str]:
    return raw.lower().replace(",", "").replace(".", "").replace("!", "").split()


def as_tuples(splits: dict[str, list[ImageRecord]]) -> dict[str, list[tuple[Any, ...]]]:
    return {
        s: [(r.imgid, r.path, r.split, r.captions) for r in records]
        for s, records in splits.items()
    }


def assert_loads(splits: dict[str, list[ImageRecord]]) -> None:
    for records in splits.values():
        for r in records:
            assert load_image(r.path, SIZE).shape == (3, SIZE, SIZE)


def one_line_error(excinfo: pytest.ExceptionInfo[CaptionError], *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


# --- Fixtures: one small dataset in each layout -------------------------------------------


@pytest.fixture
def flickr_images(tmp_path: Path) -> Path:
    folder = tmp_path / "Flicker8k_Dataset"  # sic: the archive's own spelling
    for name, photo in FLICKR_NAMES.items():
        write_photo(folder / name, photo)
    return folder


def karpathy_flickr(folder: Path) -> Path:
    """A Karpathy-style dataset_flickr8k.json: 2 train, 1 val, 1 test."""
    splits = ["train", "train", "val", "test"]
    images, sentid = [], 0
    for imgid, ((name, photo), split) in enumerate(zip(FLICKR_NAMES.items(), splits, strict=True)):
        sentences = []
        for raw in CAPTIONS[photo]:
            sentences.append({"tokens": words(raw), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filename": name,
                "imgid": imgid,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    path = folder / "dataset_flickr8k.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return path


def raw_flickr8k(folder: Path) -> Path:
    """Flickr8k.token.txt and the three split files, matching `karpathy_flickr`."""
    names = list(FLICKR_NAMES)
    lines = []
    for name, photo in reversed(FLICKR_NAMES.items()):  # order in the file must not matter
        for n, raw in reversed(list(enumerate(CAPTIONS[photo]))):
            lines.append(f"{name}#{n}\t{raw}")
    # As in the real file: captions for a file that is in no split are ignored.
    lines += ["2258277193_586949ec62.jpg.1#0\tA dog.", "2258277193_586949ec62.jpg.1#1\tDogs."]
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "Flickr8k.token.txt"
    token.write_text("\n".join(lines) + "\n")
    (folder / "Flickr_8k.trainImages.txt").write_text(f"{names[0]}\n{names[1]}\n")
    (folder / "Flickr_8k.devImages.txt").write_text(f"{names[2]}\n")
    (folder / "Flickr_8k.testImages.txt").write_text(f"{names[3]}\n\n")
    return token


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """images/train2014 and images/val2014, as the COCO zips unpack."""
    root = tmp_path / "coco"
    for _, name, sub, photo in COCO_IMAGES:
        write_photo(root / sub / name, photo)
    return root


def coco_captions(folder: Path) -> list[Path]:
    """captions_train2014.json and captions_val2014.json for COCO_IMAGES."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    ann_id = 0
    for sub in ("train2014", "val2014"):
        images, annotations = [], []
        for cocoid, name, image_sub, photo in COCO_IMAGES:
            if image_sub != sub:
                continue
            images.append({"id": cocoid, "file_name": name, "height": 1, "width": 1})
            for raw in CAPTIONS[photo]:
                annotations.append({"id": ann_id, "image_id": cocoid, "caption": raw})
                ann_id += 1
        doc = {"info": {}, "images": images, "licenses": [], "annotations": annotations}
        files.append(folder / f"captions_{sub}.json")
        files[-1].write_text(json.dumps(doc))
    return files


def karpathy_coco(path: Path) -> Path:
    """A Karpathy-style dataset_coco.json: train, restval, val, test."""
    images = []
    for imgid, ((cocoid, name, sub, photo), split) in enumerate(
        zip(COCO_IMAGES, ["train", "restval", "val", "test"], strict=True)
    ):
        sentences = [{"tokens": words(raw), "raw": raw, "imgid": imgid} for raw in CAPTIONS[photo]]
        images.append(
            {
                "filepath": sub,
                "filename": name,
                "imgid": imgid,
                "cocoid": cocoid,
                "split": split,
                "sentences": sentences,
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


# --- Karpathy ----------------------------------------------------------------------------


def test_karpathy_flickr_matches_read_karpathy(tmp_path: Path, flickr_images: Path) -> None:
    annotations = karpathy_flickr(tmp_path)
    expected = read_karpathy(annotations, flickr_images)
    for fmt in ("auto", "karpathy"):
        assert as_tuples(read_dataset(annotations, flickr_images, fmt)) == as_tuples(expected)
    assert [len(expected[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    assert_loads(expected)
    check_images(expected)


def test_karpathy_coco_uses_filepath_and_restval(tmp_path: Path, coco_root: Path) -> None:
    annotations = karpathy_coco(tmp_path / "dataset_coco.json")
    splits = read_dataset(annotations, coco_root)
    assert [r.path.parent.name for r in splits["train"]] == ["train2014", "train2014"]
    assert [r.path.parent.name for r in splits["val"] + splits["test"]] == ["val2014"] * 2
    assert_loads(splits)


def test_karpathy_refuses_a_splits_file(tmp_path: Path, flickr_images: Path) -> None:
    annotations = karpathy_flickr(tmp_path)
    with pytest.raises(CaptionError) as e:
        read_dataset(annotations, flickr_images, splits_file=annotations)
    one_line_error(e, "data.splits_file", "data.splits_file=null")


# --- Raw Flickr8k ------------------------------------------------------------------------


def test_raw_flickr8k_gives_the_karpathy_records(
    tmp_path: Path, flickr_images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = raw_flickr8k(tmp_path / "Flickr8k_text")
    with caplog.at_level(logging.INFO, logger="caption.data.formats"):
        splits = read_dataset(token, flickr_images)
    # Same ids, paths, splits and captions (in #n order, tokenised) as the Karpathy file.
    assert as_tuples(splits) == as_tuples(read_karpathy(karpathy_flickr(tmp_path), flickr_images))
    assert splits["train"][1].captions == [
        ["a", "ginger", "cat", "looks", "up"],
        words("The cat, Chelsea, sits."),
    ]
    assert "ignored 1 images (2 captions)" in caplog.text
    assert_loads(splits)


def test_raw_flickr8k_with_a_splits_json(tmp_path: Path, flickr_images: Path) -> None:
    token = raw_flickr8k(tmp_path / "text")
    names = list(FLICKR_NAMES)
    plain = tmp_path / "splits.json"
    plain.write_text(json.dumps({"train": names[:3], "dev": [names[3]]}))
    splits = read_dataset(token, flickr_images, "flickr8k", plain)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 1, 0]
    # A Karpathy JSON works as the split file too (how Flickr30k's raw tokens are split).
    karpathy = read_dataset(token, flickr_images, "flickr8k", karpathy_flickr(tmp_path))
    assert [r.path.name for r in karpathy["val"]] == [names[2]]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("1000268201_693b08cb0e.jpg A child.", "line 3: expected '<image>#<n><TAB><caption>'"),
        ("1000268201_693b08cb0e.jpg#x\tA child.", "line 3: expected"),
        ("1000268201_693b08cb0e.jpg#0\tA child.", "line 3: caption 1000268201_693b08cb0e.jpg#0"),
    ],
)
def test_bad_token_lines_name_the_line(
    tmp_path: Path, flickr_images: Path, line: str, expected: str
) -> None:
    token = raw_flickr8k(tmp_path / "text")
    name = next(iter(FLICKR_NAMES))
    token.write_text(f"{name}#0\tA cup.\n\n{line}\n")
    with pytest.raises(CaptionError) as e:
        read_dataset(token, flickr_images, "flickr8k")
    one_line_error(e, str(token), expected)


def test_raw_flickr8k_split_problems(tmp_path: Path, flickr_images: Path) -> None:
    token = raw_flickr8k(tmp_path / "text")
    names = list(FLICKR_NAMES)
    # An image in two splits would leak test data into training.
    (token.parent / "Flickr_8k.testImages.txt").write_text(f"{names[3]}\n{names[0]}\n")
    with pytest.raises(CaptionError) as e:
        read_dataset(token, flickr_images)
    one_line_error(e, names[0], "both train and test")
    # A split image without captions: the token file does not match the split files.
    (token.parent / "Flickr_8k.testImages.txt").write_text(f"{names[3]}\nnope.jpg\n")
    with pytest.raises(CaptionError) as e:
        read_dataset(token, flickr_images)
    one_line_error(e, "no captions for 1 of 5 images", "nope.jpg")
    (token.parent / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(CaptionError) as e:
        read_dataset(token, flickr_images)
    one_line_error(e, "Flickr_8k.devImages.txt does not exist")


# --- COCO --------------------------------------------------------------------------------


def test_coco_with_karpathy_splits(tmp_path: Path, coco_root: Path) -> None:
    files = coco_captions(tmp_path / "annotations")
    split_file = karpathy_coco(tmp_path / "dataset_coco.json")
    splits = read_dataset(files[0].parent, coco_root, splits_file=split_file)
    assert [r.imgid for r in splits["train"]] == [57870, 384029]  # restval joins train
    assert [r.imgid for r in splits["val"]] == [391895]
    assert splits["test"][0].path == coco_root / "val2014" / "COCO_val2014_000000522418.jpg"
    assert splits["test"][0].captions == [words(c) for c in CAPTIONS["rocket"]]
    # The same records as from the Karpathy JSON itself, but for COCO ids as imgid.
    from_karpathy = read_karpathy(split_file, coco_root)
    for s, records in splits.items():
        assert [(r.path, r.captions) for r in records] == [
            (r.path, r.captions) for r in from_karpathy[s]
        ]
    # A comma-separated list, in any order, reads the same.
    listed = ",".join(str(f) for f in reversed(files))
    assert as_tuples(read_dataset(listed, coco_root, "coco", split_file)) == as_tuples(splits)
    assert_loads(splits)


def test_coco_plain_splits(tmp_path: Path) -> None:
    files = coco_captions(tmp_path / "annotations")
    flat = tmp_path / "flat"  # every image in one folder: no train2014/ or val2014/
    for _, name, _, photo in COCO_IMAGES:
        write_photo(flat / name, photo)
    plain = tmp_path / "splits.json"
    plain.write_text(
        json.dumps({"train": [57870, "val2014/COCO_val2014_000000391895.jpg"], "test": ["522418"]})
    )
    splits = read_dataset(",".join(map(str, files)), flat, splits_file=plain)
    assert [r.imgid for r in splits["train"]] == [57870, 391895]
    assert [r.imgid for r in splits["test"]] == [522418]
    assert all(r.path.parent == flat for rs in splits.values() for r in rs)
    assert_loads(splits)
    # Only the val file given: the split file names images it has no captions for.
    with pytest.raises(CaptionError) as e:
        read_dataset(files[1], flat, "coco", plain)
    one_line_error(e, "1 of 3 images", "57870", "captions_val2014.json")


def test_coco_malformed_inputs(tmp_path: Path, coco_root: Path) -> None:
    files = coco_captions(tmp_path / "annotations")
    split_file = karpathy_coco(tmp_path / "dataset_coco.json")
    with pytest.raises(CaptionError) as e:
        read_dataset(files[0].parent, coco_root, "coco")
    one_line_error(e, "data.splits_file=")

    doc = json.loads(files[1].read_text())
    doc["annotations"].append({"id": 99, "image_id": 12345, "caption": "A ghost."})
    files[1].write_text(json.dumps(doc))
    with pytest.raises(CaptionError) as e:
        read_dataset(files[0].parent, coco_root, "coco", split_file)
    one_line_error(e, str(files[1]), "image_id 12345", "not in the file's 'images'")

    doc["annotations"][-1] = {"id": 99, "image_id": 391895, "category_id": 1}  # instances
    files[1].write_text(json.dumps(doc))
    with pytest.raises(CaptionError) as e:
        read_dataset(files[0].parent, coco_root, "coco", split_file)
    one_line_error(e, str(files[1]), "annotations[4]", "captions_*.json")

    files[1].write_text('{"images": [], "annotations": [')
    with pytest.raises(CaptionError) as e:
        read_dataset(files[0].parent, coco_root, "coco", split_file)
    one_line_error(e, str(files[1]), "not valid JSON")

    bad_split = tmp_path / "bad_split.json"
    bad_split.write_text(json.dumps({"train": [57870], "holdout": [384029]}))
    with pytest.raises(CaptionError) as e:
        read_dataset(files[0], coco_root, "coco", bad_split)
    one_line_error(e, str(bad_split), "'holdout'")


# --- Auto-detection, formats and paths -----------------------------------------------------


def test_detect_format(tmp_path: Path) -> None:
    files = coco_captions(tmp_path / "annotations")
    assert detect_format(karpathy_flickr(tmp_path)) == "karpathy"
    assert detect_format(karpathy_coco(tmp_path / "k" / "dataset_coco.json")) == "karpathy"
    assert detect_format(raw_flickr8k(tmp_path / "text")) == "flickr8k"
    assert detect_format(files[0]) == "coco"
    assert detect_format(files[0].parent) == "coco"
    assert detect_format(f"{files[0]},{files[1]}") == "coco"
    # A COCO file whose head tells nothing still reads by its structure.
    quiet = tmp_path / "quiet.json"
    quiet.write_text(json.dumps({"images": [], "annotations": []}))
    assert detect_format(quiet) == "coco"
    for name, text in [("notes.txt", "just some text\n"), ("x.json", '{"a": 1}')]:
        (tmp_path / name).write_text(text)
        with pytest.raises(CaptionError) as e:
            detect_format(tmp_path / name)
        one_line_error(e, name, "Karpathy", "Flickr8k", "COCO", "data.format=")
    with pytest.raises(CaptionError) as e:
        read_dataset(tmp_path / "missing.json")
    one_line_error(e, "missing.json does not exist")
    with pytest.raises(CaptionError) as e:
        read_dataset(files[0], format="csv")
    one_line_error(e, "'csv'", "karpathy, flickr8k, coco")


def test_auto_reads_the_token_file_and_karpathy_json_as_their_formats(
    tmp_path: Path, flickr_images: Path
) -> None:
    token = raw_flickr8k(tmp_path / "text")
    auto = read_dataset(token, flickr_images, format="auto")
    assert as_tuples(auto) == as_tuples(read_dataset(token, flickr_images, format="flickr8k"))
    assert [len(auto[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    karpathy = karpathy_flickr(tmp_path)
    auto = read_dataset(karpathy, flickr_images, format="auto")
    assert as_tuples(auto) == as_tuples(read_dataset(karpathy, flickr_images, format="karpathy"))
    # A first image longer than the sniffed head (a huge field before its sentences): the
    # structure still tells it is Karpathy's.
    doc = json.loads(karpathy.read_text())
    doc["images"] = [{"note": "x" * 100_000, **doc["images"][0]}, *doc["images"][1:]]
    big = tmp_path / "big.json"
    big.write_text(json.dumps(doc))
    assert '"sentences"' not in big.read_text()[:65536]
    assert detect_format(big) == "karpathy"
    assert as_tuples(read_dataset(big, flickr_images)) == as_tuples(auto)


@pytest.mark.parametrize(
    ("name", "text", "looks"),
    [
        (
            "captions.csv",
            "image,caption\n1000268201_693b08cb0e.jpg,A child.\n",
            "text whose first line is 'image,caption'",
        ),
        ("long.txt", "x" * 100 + "\n", f"text whose first line is '{'x' * 57}...'"),
        (
            "instances.json",
            '{"info": {}, "licenses": [], "categories": [], "images": []}',
            "a JSON object with keys info, licenses, categories, images",
        ),
        (
            "keys.json",
            json.dumps({f"k{i}": i for i in range(8)}),
            "a JSON object with keys k0, k1, k2, k3, k4, k5, ...",
        ),
        ("list.json", "[1, 2, 3]", "a JSON list of 3 items"),
        ("empty.txt", "", "empty"),
        ("blank.txt", "\n \n", "empty"),
        ("photo.jpg", None, "binary data, not text"),
    ],
)
def test_unknown_annotations_say_what_they_look_like(
    tmp_path: Path, name: str, text: str | None, looks: str
) -> None:
    path = tmp_path / name
    if text is None:
        write_photo(path, "coffee")
    else:
        path.write_text(text)
    with pytest.raises(CaptionError) as e:
        read_dataset(path, tmp_path, format="auto")
    one_line_error(e, f"data.annotations: {path} is {looks}, in no known format; expected")
    one_line_error(e, "Karpathy", "Flickr8k", "COCO", "data.format=karpathy|flickr8k|coco")


def test_absolute_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_spec("a.json,b.json") == f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}"
    assert absolute_spec("dir") == str(tmp_path / "dir")
    (tmp_path / "odd,name.json").write_text("{}")  # an existing file is never split
    assert absolute_spec("odd,name.json") == str(tmp_path / "odd,name.json")


def fake_flickr8k(root: Path, splits: dict[str, int]) -> tuple[Path, Path]:
    """The two Flickr8k zips as they unpack, with tiny random JPEGs: the token file, its
    split files beside it, and Flicker8k_Dataset/; returns the token file and the folder."""
    rng = np.random.default_rng(0)
    images = root / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    colours, things = ["red", "blue", "green"], ["dog", "cat", "ball"]
    lines, n = [], 0
    for split, count in splits.items():
        names = []
        for _ in range(count):
            name = f"{1000000000 + n}_{n:010x}.jpg"
            pixels = rng.integers(0, 256, (30 + n % 7, 40, 3), dtype=np.uint8)  # not square
            Image.fromarray(pixels).save(images / name, quality=80)
            for k in range(5):
                caption = f"A {colours[(n + k) % 3]} {things[(n * k) % 3]} on the grass."
                lines.append(f"{name}#{k}\t{caption}")
            names.append(name)
            n += 1
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
    token = root / "Flickr8k.token.txt"
    token.write_text("\n".join(lines) + "\n")
    return token, images


@pytest.mark.slow
@pytest.mark.cli
def test_train_data_flickr8k_reads_the_token_file_without_data_format(tmp_path: Path) -> None:
    token, images = fake_flickr8k(tmp_path / "flickr8k", {"train": 10, "dev": 3, "test": 3})
    proc = run(
        "caption-train",
        "data=flickr8k",
        f"data.annotations={token}",
        f"data.images={images}",
        "data.image_size=32",
        "data.num_workers=0",
        "trainer.max_steps=2",
        "trainer.progress=false",
        "trainer.device=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
        *TINY_MODEL,
    )
    assert "data: 10 train images (50 captions), 3 val images" in proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()


# --- Missing images ----------------------------------------------------------------------


def test_check_images_reports_missing_files(tmp_path: Path, flickr_images: Path) -> None:
    splits = read_dataset(karpathy_flickr(tmp_path), flickr_images)
    names = list(FLICKR_NAMES)
    (flickr_images / names[1]).unlink()
    (flickr_images / names[3]).unlink()
    with pytest.raises(CaptionError) as e:
        check_images(splits)
    one_line_error(e, "2 of 4", names[1], names[3], str(flickr_images), "data.images=")
    assert names[0] not in str(e.value)
    with pytest.raises(CaptionError) as e:
        check_images(splits, limit=1)
    one_line_error(e, "2 of 4", names[1], ", ...")
    assert names[3] not in str(e.value)


# --- Configs -----------------------------------------------------------------------------


def test_data_configs_share_keys() -> None:
    from caption.config import check_train_config
    from caption.overrides import group_options
    from tests.helpers import CONF
    from tests.helpers.config import compose_config

    names = group_options(CONF / "data")
    assert {"shapes", "flickr8k", "flickr30k", "coco"} <= set(names)
    keys = {}
    for name in names:
        cfg = compose_config("train", [f"data={name}", "run_dir=unused"])
        check_train_config(cfg)
        assert cfg.data.format in ("auto", "karpathy", "flickr8k", "coco")
        if name != "shapes":  # real datasets come in more than one layout: tell which
            assert cfg.data.format == "auto", name
        keys[name] = set(cfg.data)
    assert all(k == keys["shapes"] for k in keys.values()), keys
