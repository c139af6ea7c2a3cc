"""A disk cache of annotation vectors for a frozen encoder.

With a frozen encoder, the annotation vectors of an image never change, so they are computed
once and memory-mapped from disk afterwards: a training epoch then runs the decoder only.
The cache is keyed by everything that decides the vectors (the encoder's config and weights,
the preprocessing, the image files), so a change to any of them builds a new entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from caption.data.dataset import ImageBank, ImageDataset
from caption.data.karpathy import ImageRecord
from caption.errors import CaptionError

log = logging.getLogger(__name__)
DTYPES = {"float16": np.float16, "float32": np.float32}


def cache_key(encoder: torch.nn.Module, images: ImageBank, dtype: str) -> str:
    """A digest of the encoder's weights and settings, the preprocessing and the image files."""
    h = hashlib.sha256()
    files = []
    for r in images.records:
        stat = r.path.stat()
        files.append([str(r.path), stat.st_size, stat.st_mtime_ns])  # an edited file is new
    settings = {
        "encoder": repr(encoder),
        "image_size": images.image_size,
        "dtype": dtype,
        "files": files,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in encoder.state_dict().items():  # weights and BatchNorm statistics
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for buffer in (encoder.mean, encoder.std):  # normalisation, not in the state dict
        h.update(buffer.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


class FeatureBank:
    """Cached annotation vectors (L, D) per record, read from a memory-mapped `.npy` file.

    It serves the same interface as `ImageBank` (`records`, `len`, indexing), so datasets and
    loaders take either; `Captioner.encode` passes 3-D inputs through as annotations.

    Args:
        folder: a complete cache entry written by `FeatureBank.build`.
        records: the records, in the order the entry was built.
    """

    def __init__(self, folder: Path, records: list[ImageRecord]) -> None:
        self.folder = folder
        self.records = records
        self.features = np.load(folder / "features.npy", mmap_mode="r")  # (N, L, D)
        if len(self.features) != len(records):
            raise CaptionError(
                f"data.feature_cache: {folder} holds {len(self.features)} "
                f"images, expected {len(records)}; delete it to rebuild"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.features[i], dtype=np.float32))  # copy out of the map

    def batch(self, ids: torch.Tensor) -> torch.Tensor:
        """Annotation vectors of images `ids`, (B, L, D) float32, in one read of the map."""
        return torch.from_numpy(np.array(self.features[ids.numpy()], dtype=np.float32))

    @classmethod
    def build(
        cls,
        encoder: torch.nn.Module,
        images: ImageBank,
        root: str | Path,
        dtype: str = "float16",
        batch_size: int = 32,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
    ) -> FeatureBank:
        """Open the cache entry for these images and this encoder, computing it if needed.

        Args:
            encoder: a frozen encoder (its parameters must not require grad).
            images: the images to encode.
            root: the cache folder; entries are sub-folders named by `cache_key`.
            dtype: `float16` halves the disk and memory footprint; `float32` is exact.
            batch_size: images per encoder pass while building.
            num_workers: DataLoader workers that decode images while building.
            device: where to run the encoder.
        """
        if dtype not in DTYPES:
            raise CaptionError(
                f"config: data.feature_cache_dtype must be one of "
                f"{', '.join(DTYPES)}, got {dtype!r}"
            )
        if any(p.requires_grad for p in encoder.parameters()) or getattr(
            encoder, "fine_tune_top", 0
        ):  # an encoder that unfreezes later would never train on cached vectors
            raise CaptionError(
                "data.feature_cache needs a frozen encoder: set "
                "model.encoder.fine_tune=false, or data.feature_cache=false"
            )
        folder = Path(root) / cache_key(encoder, images, dtype)
        if (folder / "features.npy").is_file():
            log.info("feature cache: reading %d images from %s", len(images), folder)
            return cls(folder, images.records)
        folder.mkdir(parents=True, exist_ok=True)
        was_training = encoder.training
        encoder.eval()
        loader = DataLoader(ImageDataset(images), batch_size=batch_size, num_workers=num_workers)
        tmp = folder / "features.tmp.npy"
        out = None
        with torch.no_grad(), np.errstate(over="ignore"):
            for pixels, index in loader:
                a = encoder(pixels.to(device).float().div_(255))  # (B, L, D)
                if out is None:  # the grid is known after the first batch
                    shape = (len(images), *a.shape[1:])
                    out = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=DTYPES[dtype], shape=shape
                    )
                chunk = a.cpu().numpy().astype(DTYPES[dtype])
                if not np.isfinite(chunk).all():  # float16 tops out at 65504
                    raise CaptionError(
                        f"data.feature_cache: annotation vectors overflow "
                        f"{dtype}; use data.feature_cache_dtype=float32"
                    )
                out[index.numpy()] = chunk
        encoder.train(was_training)
        if out is None:
            raise CaptionError(f"data.feature_cache: no images to encode into {folder}")
        out.flush()
        del out
        os.replace(tmp, folder / "features.npy")  # a half-built entry never looks complete
        (folder / "meta.json").write_text(
            json.dumps(
                {
                    "images": len(images),
                    "dtype": dtype,
                    "files": [str(r.path) for r in images.records],
                }
            )
        )
        log.info("feature cache: encoded %d images into %s", len(images), folder)
        return cls(folder, images.records)
