"""Decoding whole datasets and scoring the result: shared by validation and `caption-evaluate`."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from caption.data.dataset import ImageBank, ImageDataset
from caption.data.vocab import Vocabulary
from caption.metrics import bleu
from caption.models.captioner import Captioner


def decode_bank(
    model: Captioner,
    bank: ImageBank,
    vocab: Vocabulary,
    *,
    strategy: str = "beam",
    beam_size: int = 3,
    max_len: int = 30,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Caption every image of `bank` once.

    Returns:
        Per image, in `bank.records` order: `{"tokens": [...], "log_prob": float}`.
    """
    was_training = model.training
    model.eval()
    out: list[dict[str, Any]] = []
    for images, _ in DataLoader(ImageDataset(bank), batch_size=batch_size):
        gen = model.generate(
            images.to(device), strategy=strategy, beam_size=beam_size, max_len=max_len
        )
        for tokens, log_prob in zip(gen.tokens.tolist(), gen.log_probs.tolist(), strict=True):
            out.append({"tokens": vocab.decode(tokens), "log_prob": log_prob})
    model.train(was_training)
    return out


def score_bank(
    model: Captioner, bank: ImageBank, vocab: Vocabulary, **decode: Any
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Decode each image once and score it against all its references with BLEU-1..4."""
    captions = decode_bank(model, bank, vocab, **decode)
    metrics = bleu([r.captions for r in bank.records], [c["tokens"] for c in captions])
    return metrics, captions
