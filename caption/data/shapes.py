"""The generated "shapes" captioning set: the project's embedded default dataset.

Each image (80 px by default) shows 1 to 3 flat-coloured objects on a dark, slightly noisy
background. An object is one of four shapes (circle, square, triangle, diamond), five colours
(red, green, blue, yellow, white) and two sizes (small, large: 0.15 and 0.27 of the side, 12
and 22 px at 80 px). Objects lie fully inside the image and keep a small gap between boxes.

Every image has 6 captions from fixed templates that name size, colour and shape, and the
spatial relation between objects. The captions follow from the pixels alone, so a captioner
can learn them: lists run left to right (top to bottom for a vertical pair), relations come
from the geometry, and placement rejects layouts whose relation or order would be ambiguous.

The output is a Karpathy split JSON (`dataset_shapes.json`) plus `images/<split>_<i>.png`.
Besides the usual keys, each image has `objects` (`box`, `words`, `shape`, `color`, `size`)
and each sentence `groundings`: token index (a string) -> object index, for every size,
colour and shape word. Boxes are `[x0, y0, x1, y1]` integer pixels with x1 and y1
exclusive, like Python slices: the object's pixels are `image[y0:y1, x0:x1]`.

    python -m caption.data.shapes --output data/shapes --train 4000 --val 500 --test 500
"""

from __future__ import annotations

import argparse
import json
import random
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 100, 255),
    "yellow": (240, 220, 40),
    "white": (235, 235, 235),
}
# Objects are small against the image, so that attention has somewhere wrong to look: on the
# test captions a uniform map points at the named object 12.5% of the time at these sizes
# (19% with sizes 0.19/0.34), while a 12 px object still spans 1.5 cells of the 10×10 grid
# that small_cnn gives at 80 px.
SIZES = {"small": 0.15, "large": 0.27}
BACKGROUND = (20, 20, 28)
NOISE_STD = 4.0
SPLITS = ("train", "val", "test")
MAX_OBJECTS = 3
PUNCTUATION = {",", ":"}

# A caption is a list of (word, object index or None); "," and ":" only shape the raw text.
Part = tuple[str, int | None]


def _phrase(i: int, obj: dict[str, Any], size: bool = True, color: bool = True) -> list[Part]:
    words = [obj["size"]] * size + [obj["color"]] * color + [obj["shape"]]
    return [("a", None), *((w, i) for w in words)]


def _words(text: str) -> list[Part]:
    return [(w, None) for w in text.split()]


def _listing(*phrases: list[Part]) -> list[Part]:
    """Join phrases as "a, b and c"."""
    parts = []
    for k, phrase in enumerate(phrases):
        if k:
            parts.append(("and", None) if k == len(phrases) - 1 else (",", None))
        parts += phrase
    return parts


def _captions(objects: list[dict[str, Any]], vertical: bool) -> list[list[Part]]:
    """The captions of one image; `objects` run left to right, or top to bottom if `vertical`."""

    def p(i: int, **kw: bool) -> list[Part]:
        return _phrase(i, objects[i], **kw)

    if len(objects) == 1:
        return [
            p(0),
            _words("there is") + p(0),
            _words("a picture of") + p(0),
            p(0) + _words("on a dark background"),
            [("one", None), *p(0)[1:]],
            p(0, size=False),
        ]
    if len(objects) == 2:
        before, after = ("above", "below") if vertical else ("to the left of", "to the right of")
        return [
            p(0) + _words(before) + p(1),
            p(1) + _words(after) + p(0),
            _words("there is") + _listing(p(0), p(1)),
            _words("two shapes :") + _listing(p(0), p(1)),
            p(0, size=False) + _words(before) + p(1, size=False),
            p(0, color=False) + _words(before) + p(1, color=False),
        ]
    return [
        p(0) + _words("to the left of") + _listing(p(1), p(2)),
        p(2) + _words("to the right of") + _listing(p(0), p(1)),
        _words("from left to right ,") + _listing(p(0), p(1), p(2)),
        _words("there are three shapes :") + _listing(p(0), p(1), p(2)),
        _listing(*(p(i, size=False) for i in range(3))),
        _listing(*(p(i, color=False) for i in range(3))),
    ]


def _place(rng: random.Random, n: int, image_size: int) -> tuple[list[dict[str, Any]], bool]:
    """Draw `n` objects with non-overlapping boxes whose order and relation are unambiguous.

    Returns:
        the objects sorted left to right (top to bottom for a vertical pair), and whether
        the pair is vertical.
    """
    gap = max(2, round(image_size / 32))
    # Centres must differ by this much along the axis the captions talk about, so that a
    # model sees a clear difference between "left of" and "above", or first and second.
    margin = max(4, round(0.1 * image_size))
    while True:
        kinds = [
            (rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES))
            for _ in range(n)
        ]
        sides = [round(SIZES[size] * image_size) for size, _, _ in kinds]
        for _ in range(200):
            corners = [
                (rng.randint(0, image_size - s), rng.randint(0, image_size - s)) for s in sides
            ]
            boxes = [(x, y, x + s, y + s) for (x, y), s in zip(corners, sides, strict=True)]
            if _valid(boxes, gap, margin):
                break
        else:
            continue  # these sizes hardly fit: draw new objects
        centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
        (ax, ay), (bx, by) = centres[0], centres[-1]
        vertical = n == 2 and abs(ay - by) > abs(ax - bx)
        order = sorted(range(n), key=lambda i: centres[i][::-1] if vertical else centres[i])
        objects = [
            {
                "box": list(boxes[i]),
                "words": list(kinds[i]),
                "shape": kinds[i][2],
                "color": kinds[i][1],
                "size": kinds[i][0],
            }
            for i in order
        ]
        return objects, vertical


def _valid(boxes: list[tuple[int, int, int, int]], gap: int, margin: int) -> bool:
    for i, a in enumerate(boxes):
        for b in boxes[:i]:
            apart = (
                a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
            )
            if not apart:
                return False
    cx = [(b[0] + b[2]) / 2 for b in boxes]
    cy = [(b[1] + b[3]) / 2 for b in boxes]
    if len(boxes) == 2:
        return abs(abs(cx[0] - cx[1]) - abs(cy[0] - cy[1])) >= margin
    # Three objects are described left to right, so their x order must be clear.
    return all(abs(cx[i] - cx[j]) >= margin for i in range(len(boxes)) for j in range(i))


def _draw(objects: list[dict[str, Any]], image_size: int, rng: random.Random) -> Image.Image:
    noise = np.random.default_rng(rng.getrandbits(64)).normal(
        0, NOISE_STD, (image_size, image_size, 3)
    )
    image = Image.fromarray(np.clip(np.add(BACKGROUND, noise), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        x1, y1 = x1 - 1, y1 - 1  # PIL's coordinates are inclusive
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return image


def _sentence(parts: list[Part], sentid: int, imgid: int) -> dict[str, Any]:
    words = [(w, o) for w, o in parts if w not in PUNCTUATION]
    return {
        "tokens": [w for w, _ in words],
        "raw": " ".join(w for w, _ in parts).replace(" ,", ",").replace(" :", ":"),
        "sentid": sentid,
        "imgid": imgid,
        "groundings": {str(t): o for t, (_, o) in enumerate(words) if o is not None},
    }


def generate_shapes(
    output: str | Path,
    n_train: int = 4000,
    n_val: int = 500,
    n_test: int = 500,
    image_size: int = 80,
    seed: int = 0,
    max_objects: int = 3,
) -> Path:
    """Generate the shapes set: PNG images and a Karpathy split JSON.

    Each image is drawn from its own generator seeded by `(seed, split, index)`, so a split's
    images do not change when another split's size does.

    Args:
        output: the folder to write `dataset_shapes.json` and `images/` into.
        n_train: images in the train split.
        n_val: images in the val split.
        n_test: images in the test split.
        image_size: the square side in pixels, at least 32.
        seed: the seed; equal seeds give identical files.
        max_objects: at most this many objects per image, 1 to 3.

    Returns:
        The path of the written JSON.

    Raises:
        ValueError: an argument is out of range.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts.items():
        if not isinstance(n, Integral) or n < 1:
            raise ValueError(f"n_{split} must be a positive integer, got {n!r}")
    if not isinstance(image_size, Integral) or image_size < 32:
        raise ValueError(f"image_size must be an integer of at least 32, got {image_size!r}")
    if not isinstance(max_objects, Integral) or not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be between 1 and {MAX_OBJECTS}, got {max_objects!r}")
    image_size, max_objects = int(image_size), int(max_objects)  # numpy ints are not JSON

    output = Path(output)
    (output / "images").mkdir(parents=True, exist_ok=True)
    images, sentid = [], 0
    for split in SPLITS:
        for index in range(counts[split]):
            rng = random.Random(f"shapes:{seed}:{split}:{index}")
            objects, vertical = _place(rng, rng.randint(1, max_objects), image_size)
            filename = f"{split}_{index:05d}.png"
            _draw(objects, image_size, rng).save(output / "images" / filename)
            imgid = len(images)
            sentences = [
                _sentence(parts, sentid + k, imgid)
                for k, parts in enumerate(_captions(objects, vertical))
            ]
            sentid += len(sentences)
            images.append(
                {
                    "filename": filename,
                    "filepath": "images",
                    "split": split,
                    "imgid": imgid,
                    "sentids": [s["sentid"] for s in sentences],
                    "width": image_size,
                    "height": image_size,
                    "objects": objects,
                    "sentences": sentences,
                }
            )
    path = output / "dataset_shapes.json"
    path.write_text(json.dumps({"dataset": "shapes", "images": images}, separators=(",", ":")))
    return path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: `python -m caption.data.shapes --output data/shapes`."""
    parser = argparse.ArgumentParser(
        prog="python -m caption.data.shapes", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--output", default="data/shapes", help="folder to write into")
    parser.add_argument("--train", type=int, default=4000, help="train images")
    parser.add_argument("--val", type=int, default=500, help="val images")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--image-size", type=int, default=80, help="square side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--max-objects", type=int, default=3, help="objects per image, 1 to 3")
    args = parser.parse_args(argv)
    try:
        path = generate_shapes(
            args.output,
            args.train,
            args.val,
            args.test,
            args.image_size,
            args.seed,
            args.max_objects,
        )
    except ValueError as e:
        parser.error(str(e))
    print(path)


if __name__ == "__main__":
    main()
