"""Loading images from disk, with one clear error per bad file."""

from __future__ import annotations

import glob
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from caption.errors import CaptionError, first_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# Pillow's own decompression-bomb threshold (~89 M pixels, a 9459 x 9459 image): larger
# images are refused from their header, before any pixel is decoded.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# What transparent pixels show through to: the page colour most images are made for.
ALPHA_BACKGROUND = (255, 255, 255)


def read_rgb(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open any image Pillow reads as an 8-bit RGB image, upright, checked first.

    Handles palette, greyscale, LA, CMYK and 16-bit images, alpha (composited over white,
    since the colour under a transparent pixel is arbitrary) and EXIF orientation (the camera's
    rotation is applied, as every image viewer does).

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this, from the header alone (None: no
            limit).

    Raises:
        CaptionError: the file is missing, empty, not an image, corrupt or truncated, or too
            large; the message names the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise CaptionError(f"{path}: empty file (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its limit and raises above twice it; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise _too_large(path, w, h, max_pixels)
                im.load()  # decode now, inside the guard: truncation shows up here
                return _to_rgb(ImageOps.exif_transpose(im))
    except CaptionError:
        raise
    except UnidentifiedImageError:
        raise CaptionError(f"{path}: not an image file (Pillow cannot identify it)") from None
    except Image.DecompressionBombError:  # Pillow refuses from the header, above 2x its limit
        raise CaptionError(
            f"{path}: image is above Pillow's decompression-bomb limit of "
            f"{2 * MAX_PIXELS:,} pixels; resize it"
        ) from None
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, zlib.error, ...
        raise CaptionError(f"{path}: corrupt or truncated image ({first_line(e, 120)})") from None


def _too_large(path: Path, w: int, h: int, max_pixels: int) -> CaptionError:
    return CaptionError(
        f"{path}: image is {w}x{h} = {w * h:,} pixels, above the decompression-bomb limit of "
        f"{max_pixels:,}; resize it, or raise max_image_pixels"
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: 16-bit scaled down, alpha composited, the rest converted."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit samples span 0..65535; Pillow's convert("L") would clip them to white.
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        im.mode == "P" and "transparency" in im.info
    ):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(
    path: str | Path, image_size: int, max_pixels: int | None = MAX_PIXELS
) -> torch.Tensor:
    """Read an image as a uint8 tensor (3, S, S), resized to a square of side `image_size`.

    Args:
        path: the image file.
        image_size: the side S the model was trained at.
        max_pixels: refuse larger images (see `read_rgb`).

    Raises:
        CaptionError: the file is missing, is not an image, is corrupt, or is too large.
    """
    return _as_tensor(read_rgb(path, max_pixels), image_size)


def image_tensor(im: Image.Image, image_size: int) -> torch.Tensor:
    """An open image as the model's input: uint8 (3, S, S), resized bicubically.

    Any mode becomes 8-bit RGB and EXIF orientation is applied, as in `read_rgb`.

    Raises:
        OSError, SyntaxError, ValueError: PIL's errors for a corrupt or truncated image.
    """
    return _as_tensor(_to_rgb(ImageOps.exif_transpose(im)), image_size)


def _as_tensor(im: Image.Image, image_size: int) -> torch.Tensor:
    """An RGB image resized to the model's square, as uint8 (3, S, S)."""
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.BICUBIC)
    array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


def expand_images(spec: str | Path) -> list[Path]:
    """Resolve `images=` into files: one file, every image in a folder, or a glob pattern.

    Raises:
        CaptionError: nothing exists at the path, or a folder or glob holds no images.
    """
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CaptionError(
                f"images: folder {path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        return files
    if path.exists():
        return [path]
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise CaptionError(f"images: the pattern {spec!r} matches no files")
        return files
    raise CaptionError(f"images: {spec} does not exist; pass an image file, a folder or a glob")
