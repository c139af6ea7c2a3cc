"""Images as they come: every mode Pillow reads, EXIF rotation, and a corpus of bad files."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from caption.cli.train import train
from caption.data.images import load_image, read_rgb
from caption.errors import CaptionError
from tests.helpers.cli import run


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A valid PNG header that claims side x side pixels over a few bytes of data: opening it
    naively would allocate 10 GB; it must be refused from the header."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
    return path


def _halves(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    im = Image.new("RGB", size, (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return im


def good_corpus(folder: Path) -> dict[str, Path]:
    """One file per image kind that must load."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        files[name] = folder / name
        im.save(files[name], **kw)

    base = _halves()
    save("rgb.png", base)
    save("palette.png", base.convert("P", palette=Image.ADAPTIVE, colors=4))
    transparent = base.convert("P", palette=Image.ADAPTIVE, colors=4)
    transparent.info["transparency"] = 0
    save("palette_transparent.png", transparent)
    save("grey.png", base.convert("L"))
    save("bilevel.png", base.convert("1"))
    save("la.png", base.convert("LA"))
    save("cmyk.jpg", base.convert("CMYK"), quality=95)
    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (20, 1))
    save("grey16.png", Image.fromarray(ramp))  # mode I;16
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))  # fully transparent: the background shows
    save("rgba.png", rgba)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save("exif_rotated.jpg", base, exif=exif.tobytes(), quality=95)
    save("tiny.png", Image.new("RGB", (1, 1), (0, 255, 0)))
    save("gif.gif", base.convert("P"))
    return files


def bad_corpus(folder: Path) -> dict[str, str]:
    """One file per way an image can be bad, with the words its error must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    png, jpg = io.BytesIO(), io.BytesIO()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    noise.save(png, "PNG")
    noise.save(jpg, "JPEG")
    (folder / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (folder / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    (folder / "header_only.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    bomb_png(folder / "bomb.png")
    return {
        "truncated.png": "corrupt or truncated",
        "truncated.jpg": "corrupt or truncated",
        "empty.jpg": "empty file",
        "text.jpg": "not an image file",
        "header_only.png": "not an image file",
        "bomb.png": "decompression-bomb limit",
    }


def test_every_mode_becomes_8_bit_rgb(tmp_path: Path) -> None:
    files = good_corpus(tmp_path)
    for name, path in files.items():
        im = read_rgb(path)
        assert im.mode == "RGB", name
        x = load_image(path, 16)
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8, name
    # 16-bit samples are scaled, not clipped to white: the ramp spans black to white.
    grey16 = np.asarray(read_rgb(files["grey16.png"]))[..., 0]
    assert grey16[0, 0] == 0 and grey16[0, -1] == 255 and 100 < grey16.mean() < 155
    # Transparency shows the white background, not the colour hidden under alpha 0.
    assert (np.asarray(read_rgb(files["rgba.png"])) == 255).all()
    assert np.asarray(read_rgb(files["la.png"])).shape == (20, 40, 3)
    # CMYK red is still red.
    r, g, b = np.asarray(read_rgb(files["cmyk.jpg"]))[10, 5].astype(int)
    assert r > 200 and g < 60 and b < 60
    assert np.asarray(read_rgb(files["tiny.png"])).tolist() == [[[0, 255, 0]]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    files = good_corpus(tmp_path)
    upright = read_rgb(files["exif_rotated.jpg"])
    # Stored 40x20 with red on the left; shown rotated a quarter turn clockwise: 20x40, red on
    # top. Without the EXIF rotation the top right corner would be blue.
    assert upright.size == (20, 40)
    top_right, bottom_left = np.asarray(upright)[2, -3], np.asarray(upright)[-3, 2]
    assert top_right[0] > 200 and top_right[2] < 60
    assert bottom_left[2] > 200 and bottom_left[0] < 60


def test_each_bad_file_gets_one_line_naming_it_and_why(tmp_path: Path) -> None:
    for name, reason in bad_corpus(tmp_path).items():
        with pytest.raises(CaptionError) as e:
            load_image(tmp_path / name, 16)
        message = str(e.value)
        assert message.startswith(str(tmp_path / name)) and reason in message, message
        assert "\n" not in message


def test_decompression_bomb_limit_is_a_setting_and_is_checked_before_decoding(
    tmp_path: Path,
) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    assert load_image(path, 8, max_pixels=60_000).shape == (3, 8, 8)
    with pytest.raises(CaptionError, match=r"300x200 = 60,000 pixels, above .* 59,999"):
        load_image(path, 8, max_pixels=59_999)
    # A 10-gigapixel header is refused at once, whatever the limit says.
    with pytest.raises(CaptionError, match="decompression-bomb limit"):
        load_image(bomb_png(tmp_path / "bomb.png"), 8, max_pixels=None)


@pytest.mark.slow
@pytest.mark.cli
def test_generate_captions_every_good_image_and_reports_every_bad_one(
    trained: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "corpus"
    good = good_corpus(folder)
    bad = bad_corpus(folder)
    out = tmp_path / "captions.jsonl"
    proc = run(
        "caption-generate",
        f"checkpoint={trained / 'run' / 'checkpoints' / 'best.pt'}",
        f"images={folder}",
        f"output={out}",
        "device=cpu",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    captioned = {Path(json.loads(line)["image"]).name for line in out.read_text().splitlines()}
    assert captioned == set(good)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert {Path(line.split(":")[1].strip()).name for line in errors} == set(bad)
    for line in errors:
        name = Path(line.split(":")[1].strip()).name
        assert bad[name] in line and line.endswith("skipped")


def _with_broken_image(tiny_shapes: Path, folder: Path) -> Path:
    """A copy of the tiny set's annotations whose first train image is a corrupt file."""
    doc = json.loads(tiny_shapes.read_text())
    for img in doc["images"]:
        img["filepath"] = str(tiny_shapes.parent / img.get("filepath", ""))
    first = next(img for img in doc["images"] if img["split"] == "train")
    first["filepath"], first["filename"] = str(folder), "broken.png"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR broken")
    path = folder / "annotations.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("preload", [True, False])
def test_training_skips_an_unreadable_image_with_a_count(
    train_cfg: DictConfig, tiny_shapes: Path, tmp_path: Path, preload: bool, caplog
) -> None:
    train_cfg.data.annotations = str(_with_broken_image(tiny_shapes, tmp_path))
    train_cfg.data.preload = preload
    train_cfg.data.batch_size = 64
    summary = train(train_cfg)
    assert summary["epochs"] == 1  # the epoch ran to its end
    assert "broken.png" in caplog.text and "skipped" in caplog.text
    row = json.loads((Path(train_cfg.run_dir) / "metrics.jsonl").read_text())
    if preload:  # dropped while preloading: its captions never enter the epoch
        assert "skipped 1 unreadable image(s) of 64" in caplog.text
    else:  # read lazily: each of its 6 captions is skipped in its batch, and counted
        assert row["skipped_images"] == 6
        assert "epoch 1: skipped 6 unreadable image(s)" in caplog.text


@pytest.mark.parametrize("preload", [True, False])
def test_strict_images_stops_at_the_first_unreadable_image(
    train_cfg: DictConfig, tiny_shapes: Path, tmp_path: Path, preload: bool
) -> None:
    train_cfg.data.annotations = str(_with_broken_image(tiny_shapes, tmp_path))
    train_cfg.data.preload = preload
    train_cfg.data.strict_images = True
    train_cfg.data.batch_size = 64
    with pytest.raises(CaptionError, match=r"broken\.png: .*data\.strict_images=true") as e:
        train(train_cfg)
    assert "\n" not in str(e.value)
