"""Torch datasets over Karpathy records: caption pairs for training, images for decoding."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from caption.data.images import MAX_PIXELS, load_image
from caption.data.records import ImageRecord
from caption.data.vocab import PAD_ID, Vocabulary
from caption.errors import CaptionError

log = logging.getLogger(__name__)


def strict_stop(reason: str) -> CaptionError:
    """The error that stops a run at an unreadable image when `data.strict_images=true`."""
    return CaptionError(
        f"{reason}; data.strict_images=true stops at the first unreadable image (false skips them)"
    )


class ImageBank:
    """Images of a list of records as uint8 (3, S, S) tensors, preloaded or read lazily.

    Preloading reads every file once, reports each bad one and drops it, so that a corrupt file
    costs one warning, not the run. The shapes set (64 px) fits in memory many times over.
    Read lazily, a bad file raises `CaptionError` when it is indexed (`CaptionDataset` turns
    that into a skipped item).

    Args:
        records: the images to serve.
        image_size: the square side the model sees.
        preload: read every image into memory now.
        workers: threads for preloading; PIL decoding releases the GIL.
        max_pixels: refuse images larger than this (see `caption.data.images.read_rgb`).
        strict: stop at the first unreadable image instead of skipping it.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int,
        preload: bool = True,
        workers: int = 4,
        max_pixels: int | None = MAX_PIXELS,
        strict: bool = False,
    ) -> None:
        self.image_size, self.max_pixels, self.strict = image_size, max_pixels, strict
        self.pixels: torch.Tensor | None = None
        if preload:
            with ThreadPoolExecutor(workers) as pool:
                loaded = list(pool.map(self._try_load, records))
            bad = [r for r, x in zip(records, loaded, strict=True) if x is None]
            if bad:
                log.warning("skipped %d unreadable image(s) of %d", len(bad), len(records))
            self.records = [r for r, x in zip(records, loaded, strict=True) if x is not None]
            good = [x for x in loaded if x is not None]
            self.pixels = (
                torch.stack(good)
                if good
                else torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
            )
        else:
            missing = [r for r in records if not r.path.is_file()]
            if missing and strict:
                raise strict_stop(f"{missing[0].path}: no such image file")
            for r in missing:
                log.warning("%s: no such image file; skipped", r.path)
            if missing:
                log.warning("skipped %d missing image(s) of %d", len(missing), len(records))
            self.records = [r for r in records if r.path.is_file()]

    def _try_load(self, record: ImageRecord) -> torch.Tensor | None:
        try:
            return load_image(record.path, self.image_size, self.max_pixels)
        except CaptionError as e:
            if self.strict:
                raise strict_stop(str(e)) from None
            log.warning("%s; skipped", e)
            return None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.pixels is not None:
            return self.pixels[i]
        return load_image(self.records[i].path, self.image_size, self.max_pixels)

    def batch(self, ids: torch.Tensor) -> torch.Tensor:
        """Images `ids` of a preloaded bank as one (B, 3, S, S) tensor, in a single gather.

        A lazily read bank has no such path: its images are loaded (and may fail) one by one,
        see `CaptionDataset.__getitems__`.
        """
        assert self.pixels is not None, "ImageBank.batch needs a preloaded bank"
        return self.pixels[ids]


class CaptionBatch(NamedTuple):
    images: torch.Tensor  # (B, 3, S, S) uint8
    captions: torch.Tensor  # (B, T) <start> w_1 .. w_n <end> <pad>...
    lengths: torch.Tensor  # (B,) tokens including <start> and <end>
    skipped: tuple[str, ...] = ()  # why each unreadable item of the batch was left out


class CaptionDataset(Dataset):
    """One item per (image, reference caption) pair, for teacher-forced training.

    Args:
        bank: the images.
        vocab: maps tokens to ids.
        max_len: truncate captions to this many words (None keeps all).
    """

    def __init__(self, bank: ImageBank, vocab: Vocabulary, max_len: int | None = None) -> None:
        self.bank = bank
        self.pairs = [
            (i, torch.tensor(vocab.encode(c[:max_len]), dtype=torch.long))
            for i, r in enumerate(bank.records)
            for c in r.captions
        ]
        # The same pairs as tensors, so that a batch is a few gathers, not a Python loop.
        self.image_ids = torch.tensor([i for i, _ in self.pairs], dtype=torch.long)
        self.lengths = torch.tensor([len(ids) for _, ids in self.pairs], dtype=torch.long)
        self.captions = pad_sequence(
            [ids for _, ids in self.pairs] or [torch.zeros(0, dtype=torch.long)],
            batch_first=True,
            padding_value=PAD_ID,
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor] | CaptionError:
        i, ids = self.pairs[k]
        try:
            return self.bank[i], ids
        except CaptionError as e:
            # Returned, not raised: a DataLoader worker would wrap it in a traceback, and the
            # training loop decides (skip and count, or stop in strict mode).
            return e

    def __getitems__(self, keys: list[int]) -> CaptionBatch:
        """A whole batch at once (the DataLoader calls this when it exists): what
        `collate_captions` would make of the items, without per-item Python work.

        Read lazily, images are loaded one by one, so that an unreadable one is skipped and
        counted (see `__getitem__`) rather than failing the batch.
        """
        if isinstance(self.bank, ImageBank) and self.bank.pixels is None:
            return collate_captions([self[k] for k in keys])
        k = torch.as_tensor(keys, dtype=torch.long)
        k = k[self.lengths[k].argsort(descending=True, stable=True)]  # longest caption first
        lengths = self.lengths[k]
        captions = self.captions[k, : int(lengths.max())]  # right-padded to the longest
        return CaptionBatch(self.bank.batch(self.image_ids[k]), captions, lengths)


def collate_captions(
    batch: list[tuple[torch.Tensor, torch.Tensor] | CaptionError] | CaptionBatch,
) -> CaptionBatch:
    """Stack images and right-pad captions with `<pad>` to the longest in the batch, sorted
    longest caption first (a stable sort: equal lengths keep their order).

    A `CaptionBatch` (from `CaptionDataset.__getitems__`) is already collated: it passes
    through. Items that failed to load are left out and their errors listed in `skipped`; a
    batch may therefore be empty.
    """
    if isinstance(batch, CaptionBatch):
        return batch
    skipped = tuple(str(x) for x in batch if isinstance(x, CaptionError))
    good = [x for x in batch if not isinstance(x, CaptionError)]
    if not good:
        return CaptionBatch(
            torch.empty(0, 3, 0, 0, dtype=torch.uint8),
            torch.empty(0, 0, dtype=torch.long),
            torch.empty(0, dtype=torch.long),
            skipped,
        )
    # Longest caption first, the order packed teacher forcing decodes in: it need not re-sort.
    good.sort(key=lambda item: -len(item[1]))
    images, captions = zip(*good, strict=True)
    lengths = torch.tensor([len(c) for c in captions])
    return CaptionBatch(
        torch.stack(images),
        pad_sequence(captions, batch_first=True, padding_value=PAD_ID),
        lengths,
        skipped,
    )


class ImageDataset(Dataset):
    """One item per image, for decoding: (image, index into `bank.records`)."""

    def __init__(self, bank: ImageBank) -> None:
        self.bank = bank

    def __len__(self) -> int:
        return len(self.bank)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.bank[i], i
