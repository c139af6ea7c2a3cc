"""Users' own photos reach the encoder whole: a photo that is not square is resized to the
model's square as in training (`caption.data.images.image_tensor`: PIL bicubic), never cropped
or padded, by `caption-generate` and by `caption-serve` alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption.models.build import load_captioner
from tests.helpers.cli import run
from tests.helpers.serving import post, serving

skdata = pytest.importorskip("skimage.data", reason="scikit-image gives the test photo")

pytestmark = [pytest.mark.slow, pytest.mark.cli]

# The astronaut photo (512 x 512) cut to a landscape and a portrait frame, (height, width).
FRAMES = {"landscape": (300, 512), "portrait": (512, 300)}


def photos(folder: Path, side: int) -> dict[str, Path]:
    """Per frame: the photo as a user has it, the same pre-resized by PIL bicubic to the
    model's square, and (to show the test can tell) its centre square so resized."""
    folder.mkdir()
    astronaut = skdata.astronaut()
    files = {}
    for frame, (h, w) in FRAMES.items():
        photo = Image.fromarray(np.ascontiguousarray(astronaut[:h, :w]))
        s = min(h, w)
        left, top = (w - s) // 2, (h - s) // 2
        versions = {
            "photo": photo,
            "square": photo.resize((side, side), Image.BICUBIC),
            "cropped": photo.crop((left, top, left + s, top + s)).resize(
                (side, side), Image.BICUBIC
            ),
        }
        for version, im in versions.items():
            files[f"{frame}_{version}"] = folder / f"{frame}_{version}.png"  # lossless
            im.save(files[f"{frame}_{version}"])
    return files


def test_generate_and_serve_resize_a_non_square_photo_whole(trained: Path, tmp_path: Path):
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    side = load_captioner(ckpt)[0].image_size  # the square the model was trained on
    files = photos(tmp_path / "photos", side)
    assert Image.open(files["landscape_photo"]).size == (512, 300)
    # One image per batch: every photo is decoded alone, so equal inputs give equal outputs.
    out = run(
        "caption-generate", f"checkpoint={ckpt}", f"images={tmp_path / 'photos'}", "batch_size=1"
    )
    lines = {Path(x["image"]).stem: x for x in map(json.loads, out.stdout.splitlines())}
    assert lines.keys() == files.keys()
    with serving(ckpt) as url:
        for frame in FRAMES:
            photo, square = lines[f"{frame}_photo"], lines[f"{frame}_square"]
            assert (photo["caption"], photo["log_prob"]) == (square["caption"], square["log_prob"])
            # A crop would be seen: the centre square's caption is scored differently.
            assert lines[f"{frame}_cropped"]["log_prob"] != photo["log_prob"]
            status, body = post(f"{url}/caption", files[f"{frame}_photo"].read_bytes())
            assert status == 200 and (body["width"], body["height"]) == FRAMES[frame][::-1]
            assert (body["caption"], body["log_prob"]) == (photo["caption"], photo["log_prob"])
