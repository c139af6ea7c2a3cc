"""A training run's data: the records and vocabulary, the train and val banks, the loader.

The banks hold the images (read on demand or preloaded) or, with `data.feature_cache=true`,
a frozen encoder's annotation vectors computed once, so that epochs run the decoder only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from caption.data.dataset import ImageBank, collate_captions
from caption.data.features import FeatureBank
from caption.data.formats import absolute_spec, check_images, read_dataset
from caption.data.records import ImageRecord
from caption.data.sampler import EpochSampler
from caption.data.vocab import Vocabulary
from caption.errors import CaptionError
from caption.training.dist import Dist
from caption.training.resume import ignore_stop_signals

if TYPE_CHECKING:  # importing the encoder pulls in torchvision: ~3 s at every command's start
    from caption.models.encoder import Encoder

Bank = ImageBank | FeatureBank


def absolute_data_paths(d: DictConfig) -> None:
    """Store data paths absolutely, so that a checkpoint evaluates from any working dir."""
    for key in ("annotations", "images", "splits_file"):
        if d.get(key):
            d[key] = absolute_spec(d[key])


def read_records(d: DictConfig) -> tuple[dict[str, list[ImageRecord]], Vocabulary]:
    """The dataset's splits (every image file checked) and the train captions' vocabulary.

    Raises:
        CaptionError: the dataset is missing, has missing images, or has no train images.
    """
    splits = read_dataset(d.annotations, d.images, d.format, d.splits_file)
    check_images(splits)
    if not splits["train"]:
        raise CaptionError(f"data.annotations: {d.annotations} has no train images")
    vocab = Vocabulary.build(
        (c for r in splits["train"] for c in r.captions),
        min_count=d.min_count,
        max_size=d.vocab_size,
    )
    return splits, vocab


def build_banks(
    d: DictConfig,
    splits: dict[str, list[ImageRecord]],
    encoder: Encoder,
    dist: Dist,
    val_max_images: int | None,
) -> tuple[Bank, Bank]:
    """The train bank and the val bank (empty on ranks other than 0, which validates alone).

    With the feature cache, rank 0 builds each entry while the others wait, then read it.
    """
    preload = d.preload and not d.feature_cache  # the cache replaces images in memory
    images = {"max_pixels": d.max_image_pixels, "strict": d.strict_images}
    train_bank: Bank = ImageBank(splits["train"], d.image_size, preload, **images)
    # Rank 0 validates; the others wait for its result.
    val_records = splits["val"][:val_max_images] if dist.is_main else []
    val_bank: Bank = ImageBank(val_records, d.image_size, preload, **images)
    if not d.feature_cache:
        return train_bank, val_bank
    cache = {
        "root": d.feature_cache_dir,
        "dtype": d.feature_cache_dtype,
        "batch_size": d.batch_size,
        "num_workers": d.num_workers,
        "device": dist.device,
    }
    if dist.is_main:
        train_bank = FeatureBank.build(encoder, train_bank, **cache)
    dist.barrier()
    if not dist.is_main:
        train_bank = FeatureBank.build(encoder, train_bank, **cache)
    if len(val_bank):
        val_bank = FeatureBank.build(encoder, val_bank, **cache)
    return train_bank, val_bank


def build_loader(
    train_set: Dataset,
    d: DictConfig,
    seed: int,
    dist: Dist,
    collate: Callable[[Any], Any] = collate_captions,
) -> tuple[EpochSampler, DataLoader[Any]]:
    """This rank's share of each epoch's shuffled items (the objective's: caption-image pairs,
    or images), in batches made by `collate`.

    The order is rebuilt from the seed and the epoch (`EpochSampler`), so a resumed run reads
    the same batches from the same position.
    """
    sampler = EpochSampler(len(train_set), seed, dist.rank, dist.world_size)
    loader = DataLoader(
        train_set,
        batch_size=d.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0,  # workers live across epochs
        pin_memory=dist.device.type == "cuda",  # page-locked batches copy to the GPU async
        # Its own generator: creating an epoch's iterator must not draw from the global one.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=ignore_stop_signals,
    )
    return sampler, loader
