"""A disk cache of annotation vectors for a frozen encoder.

With a frozen encoder, the annotation vectors of an image never change, so they are computed
once and memory-mapped from disk afterwards: a training epoch then runs the decoder only.
The cache is keyed by everything that decides the vectors (the encoder's config and weights,
the preprocessing, the image files), so a change to any of them builds a new entry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from caption.data.dataset import ImageBank, ImageDataset
from caption.data.records import ImageRecord
from caption.errors import CaptionError, first_line
from caption.files import atomic_file, remove_quietly, write_failure

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
        if _complete(folder / "features.npy"):
            log.info("feature cache: reading %d images from %s", len(images), folder)
            return cls(folder, images.records)
        was_training = encoder.training
        encoder.eval()
        try:
            with _reported(folder):
                _write_entry(encoder, images, folder, dtype, batch_size, num_workers, device)
        finally:
            encoder.train(was_training)
        log.info("feature cache: encoded %d images into %s", len(images), folder)
        return cls(folder, images.records)


def _write_entry(
    encoder: torch.nn.Module,
    images: ImageBank,
    folder: Path,
    dtype: str,
    batch_size: int,
    num_workers: int,
    device: torch.device | str,
) -> None:
    """Encode `images` into the entry `folder`; its `features.npy` appears only when whole.

    The vectors go into a temporary file, renamed to `features.npy` last: that name is the
    entry's completion marker, so an entry cut short (a kill, a full disk) is never read.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / "meta.json") as f:
        f.write(
            json.dumps(
                {
                    "images": len(images),
                    "dtype": dtype,
                    "files": [str(r.path) for r in images.records],
                }
            )
        )
    loader = DataLoader(ImageDataset(images), batch_size=batch_size, num_workers=num_workers)
    tmp = folder / "features.tmp.npy"
    out = None
    with torch.no_grad(), np.errstate(over="ignore"):
        for pixels, index in loader:
            a = encoder(pixels.to(device).float().div_(255))  # (B, L, D)
            if out is None:  # the grid is known after the first batch
                shape = (len(images), *a.shape[1:])
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=DTYPES[dtype], shape=shape)
                _allocate(tmp)
            chunk = a.cpu().numpy().astype(DTYPES[dtype])
            if not np.isfinite(chunk).all():  # float16 tops out at 65504
                raise CaptionError(
                    f"data.feature_cache: annotation vectors overflow "
                    f"{dtype}; use data.feature_cache_dtype=float32"
                )
            out[index.numpy()] = chunk
    if out is None:
        raise CaptionError(f"data.feature_cache: no images to encode into {folder}")
    out.flush()
    del out
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # on disk before the name says it is complete
    os.replace(tmp, folder / "features.npy")


def _allocate(path: Path) -> None:
    """Reserve the blocks of a sparse file that a memory map will fill.

    Writing a memory map on a full disk does not raise: the process dies of SIGBUS. Reserved
    up front, the space is there, or ENOSPC is raised now, before any encoding.
    """
    if not hasattr(os, "posix_fallocate"):  # not on macOS: the map is written unreserved
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot
            raise
    finally:
        os.close(fd)


def _complete(features: Path) -> bool:
    """Whether `features.npy` is there and holds all the bytes its header promises.

    `_write_entry` renames it into place only when whole, but a file cut short by other means
    (a copy that ran out of room, a disk error) must be rebuilt, not read: NumPy refuses to map
    a file shorter than its header says.
    """
    if not features.is_file():
        return False
    try:
        np.load(features, mmap_mode="r")
    except (OSError, ValueError) as e:
        log.warning("feature cache: %s is incomplete (%s); rebuilding it", features, first_line(e))
        return False
    return True


@contextlib.contextmanager
def _reported(folder: Path) -> Iterator[None]:
    """A failed write while building the entry `folder`: remove what was written and say so
    in one line, with the config keys that move or turn off the cache."""
    try:
        yield
    except BaseException as e:  # a Ctrl-C too leaves no temporary file
        # A CaptionError (float16 overflow, no images) already says what to do.
        bad_write = isinstance(e, Exception) and not isinstance(e, CaptionError)
        failure = write_failure(e, folder) if bad_write else None
        for name in ("features.tmp.npy", "meta.json"):
            remove_quietly(folder / name)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty: never an entry another run completed
        if failure is None:
            raise
        raise CaptionError(
            f"data.feature_cache_dir: {folder}: cannot be written ({failure[0]}); free space, "
            "set data.feature_cache_dir=<a folder with room>, or data.feature_cache=false"
        ) from e
