"""Loading images from disk, with one clear error per bad file."""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from caption.errors import CaptionError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """Read an image as a uint8 tensor (3, S, S), resized to a square of side `image_size`.

    Args:
        path: the image file.
        image_size: the side S the model was trained at.

    Raises:
        CaptionError: the file is missing, is not an image, or is corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            return image_tensor(im, image_size)
    except UnidentifiedImageError:
        raise CaptionError(f"{path}: not an image file (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise CaptionError(f"{path}: corrupt or truncated image ({e})") from None


def image_tensor(im: Image.Image, image_size: int) -> torch.Tensor:
    """An open image as the model's input: uint8 (3, S, S), RGB, resized bicubically.

    Raises:
        OSError, SyntaxError, ValueError: PIL's errors for a corrupt or truncated image.
    """
    im = im.convert("RGB")
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
