"""Tests for the generated shapes dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption.data.formats import read_karpathy
from caption.data.shapes import COLORS, SHAPES, SIZES, generate_shapes
from caption.data.vocab import tokenize

ROOT = Path(__file__).resolve().parents[1]
RELATIONS = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    path = generate_shapes(out, n_train=240, n_val=30, n_test=30, seed=3)
    return path, json.loads(path.read_text())


def _centre(obj: dict) -> tuple[float, float]:
    x0, y0, x1, y1 = obj["box"]
    return (x0 + x1) / 2, (y0 + y1) / 2


def _pixels(path: Path, image: dict) -> np.ndarray:
    with Image.open(path.parent / image["filepath"] / image["filename"]) as im:
        assert im.mode == "RGB"
        return np.asarray(im, dtype=np.int16)


def test_deterministic(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", 8, 2, 2, seed=7)
    b = generate_shapes(tmp_path / "b", 8, 2, 2, seed=7)
    c = generate_shapes(tmp_path / "c", 8, 2, 2, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    for f in sorted((tmp_path / "a" / "images").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / "images" / f.name).read_bytes()
    differ = [
        f.read_bytes() != (tmp_path / "c" / "images" / f.name).read_bytes()
        for f in (tmp_path / "a" / "images").iterdir()
    ]
    assert any(differ)


def test_splits_do_not_depend_on_each_other(tmp_path: Path) -> None:
    a = generate_shapes(tmp_path / "a", 3, 2, 1, seed=1)
    b = generate_shapes(tmp_path / "b", 5, 2, 1, seed=1)
    val_a = [
        i["sentences"][0]["raw"] for i in json.loads(a.read_text())["images"] if i["split"] == "val"
    ]
    val_b = [
        i["sentences"][0]["raw"] for i in json.loads(b.read_text())["images"] if i["split"] == "val"
    ]
    assert val_a == val_b


def test_structure(shapes: tuple[Path, dict]) -> None:
    path, doc = shapes
    assert path.name == "dataset_shapes.json"
    assert doc["dataset"] == "shapes"
    images = doc["images"]
    assert [i["split"] for i in images] == ["train"] * 240 + ["val"] * 30 + ["test"] * 30
    sentid, seen = 0, {"train": 0, "val": 0, "test": 0}
    for imgid, image in enumerate(images):
        assert image["imgid"] == imgid
        assert image["filename"] == f"{image['split']}_{seen[image['split']]:05d}.png"
        seen[image["split"]] += 1
        assert image["width"] == image["height"] == 80
        assert len({tuple(s["tokens"]) for s in image["sentences"]}) >= 5
        assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
        for s in image["sentences"]:
            assert s["sentid"] == sentid and s["imgid"] == imgid
            sentid += 1
            assert s["tokens"] == tokenize(s["raw"])
            assert all(t.isalpha() and t.islower() for t in s["tokens"])
        assert _pixels(path, image).shape == (80, 80, 3)


def test_reader_accepts_it(shapes: tuple[Path, dict]) -> None:
    path, _ = shapes
    records = read_karpathy(path)
    assert [len(records[s]) for s in ("train", "val", "test")] == [240, 30, 30]
    assert records["val"][0].path.is_file()
    assert records["train"][0].groundings and records["train"][0].objects


def test_ground_truth(shapes: tuple[Path, dict]) -> None:
    path, doc = shapes
    for image in doc["images"]:
        pixels = _pixels(path, image)
        objects = image["objects"]
        # Background is dark and noisy; any bright pixel belongs to an object.
        bright = pixels.max(axis=2) > 100
        covered = np.zeros_like(bright)
        for i, obj in enumerate(objects):
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 80
            assert obj["words"] == [obj["size"], obj["color"], obj["shape"]]
            for other in objects[:i]:
                a, b = obj["box"], other["box"]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
            colour = np.abs(pixels - COLORS[obj["color"]]).max(axis=2) < 30
            cx, cy = int(_centre(obj)[0]), int(_centre(obj)[1])
            assert colour[cy, cx]
            # The box tightly holds the object: its colour fills the box edge to edge.
            ys, xs = np.nonzero(colour[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1])
            xs, ys = xs + max(x0 - 1, 0), ys + max(y0 - 1, 0)
            assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
            assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
            assert colour[y0:y1, x0:x1].mean() > 0.4
            covered[y0:y1, x0:x1] = True
        assert not (bright & ~covered).any()


def test_groundings(shapes: tuple[Path, dict]) -> None:
    _, doc = shapes
    for image in doc["images"]:
        objects = image["objects"]
        named = set()
        for s in image["sentences"]:
            for t, o in s["groundings"].items():
                assert s["tokens"][int(t)] in objects[o]["words"]
                named.add(o)
            # Every size, colour or shape word is grounded.
            vocab = {*SHAPES, *COLORS, *SIZES}
            assert {int(t) for t in s["groundings"]} == {
                k for k, w in enumerate(s["tokens"]) if w in vocab
            }
        assert named == set(range(len(objects)))


def test_relations_match_geometry(shapes: tuple[Path, dict]) -> None:
    _, doc = shapes
    checked = 0
    for image in doc["images"]:
        objects = image["objects"]
        for s in image["sentences"]:
            relation = [w for w in s["tokens"] if w in RELATIONS]
            if not relation or s["tokens"][0] == "from":
                continue
            assert len(relation) == 1
            axis, sign = RELATIONS[relation[0]]
            first = objects[s["groundings"][min(s["groundings"], key=int)]]
            for other in objects:
                if other is not first:
                    assert sign * (_centre(first)[axis] - _centre(other)[axis]) > 0, s["raw"]
            if len(objects) == 2:
                dx, dy = np.subtract(_centre(objects[0]), _centre(objects[1]))
                assert (abs(dy) > abs(dx)) == (axis == 1), s["raw"]
            checked += 1
    assert checked > 100


def test_lists_run_left_to_right(shapes: tuple[Path, dict]) -> None:
    _, doc = shapes
    for image in doc["images"]:
        if len(image["objects"]) == 3:
            xs = [_centre(o)[0] for o in image["objects"]]
            assert xs == sorted(xs)
            s = image["sentences"][2]
            assert s["raw"].startswith("from left to right")
            assert list(dict.fromkeys(s["groundings"].values())) == [0, 1, 2]


def test_coverage(shapes: tuple[Path, dict]) -> None:
    _, doc = shapes
    objects = [o for i in doc["images"] for o in i["objects"]]
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["color"] for o in objects} == set(COLORS)
    assert {o["size"] for o in objects} == set(SIZES)
    assert {len(i["objects"]) for i in doc["images"]} == {1, 2, 3}


def test_max_objects(tmp_path: Path) -> None:
    doc = json.loads(generate_shapes(tmp_path, 20, 1, 1, max_objects=1).read_text())
    assert all(len(i["objects"]) == 1 for i in doc["images"])


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": 0}, {"n_val": -1}, {"image_size": 16}, {"max_objects": 0}, {"max_objects": 4}],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        generate_shapes(tmp_path, **{"n_train": 2, "n_val": 1, "n_test": 1, **kwargs})


@pytest.mark.cli
def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = [sys.executable, "-m", "caption.data.shapes", "--output", str(out)]
    done = subprocess.run(
        [*args, "--train", "5", "--val", "2", "--test", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == str(out / "dataset_shapes.json")
    assert len(json.loads((out / "dataset_shapes.json").read_text())["images"]) == 9
    assert len(list((out / "images").glob("*.png"))) == 9
    bad = subprocess.run([*args, "--image-size", "8"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "image_size" in bad.stderr
