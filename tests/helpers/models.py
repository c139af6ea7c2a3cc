"""A tiny captioner and random inputs for it, for the tests of the model and its views."""

from __future__ import annotations

import torch

from caption.data.vocab import END_ID, PAD_ID, START_ID
from caption.models.build import build_model
from caption.models.captioner import Captioner
from tests.helpers.config import TINY_MODEL, compose_config

V = 20  # the tiny model's vocabulary size


def tiny_model(*overrides: str, seed: int = 0) -> Captioner:
    """The default model at `TINY_MODEL` size with `overrides`, initialised from `seed`."""
    torch.manual_seed(seed)
    cfg = compose_config("train", [*TINY_MODEL, *overrides])
    return build_model(cfg.model, vocab_size=V)


def images(n: int = 2) -> torch.Tensor:
    """`n` random 64x64 uint8 images, (n, 3, 64, 64), the same on every call."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)


def random_batch(B: int = 4, T: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and padded captions `<start> w... <end> <pad>...`; the first is full."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, 3, 64, 64), dtype=torch.uint8, generator=g)
    captions = torch.randint(4, V, (B, T), generator=g)
    captions[:, 0] = START_ID
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    lengths[0] = T
    for b, n in enumerate(lengths.tolist()):
        captions[b, n - 1] = END_ID
        captions[b, n:] = PAD_ID
    return images, captions
