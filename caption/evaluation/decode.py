"""Decoding whole datasets and scoring the result: shared by validation and `caption-evaluate`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from caption.data.dataset import ImageBank, ImageDataset
from caption.data.images import MAX_PIXELS
from caption.data.records import ImageRecord
from caption.data.vocab import PAD_ID, Vocabulary
from caption.errors import CaptionError
from caption.evaluation.grounding import (
    GroundingTally,
    cell_boxes,
    find_mentions,
    grounded_mentions,
    object_vocabulary,
    score_caption,
)
from caption.metrics import bleu, cider_d
from caption.models.captioner import Captioner
from caption.models.decoding import Generated


def caption_line(image: str | Path, words: Sequence[str], log_prob: float) -> str:
    """One JSON Lines record of a caption, as `caption-generate` writes and `results=` reads."""
    return (
        json.dumps(
            {"image": str(image), "caption": " ".join(words), "log_prob": round(log_prob, 4)}
        )
        + "\n"
    )


def caption_files(
    model: Captioner,
    files: Sequence[Path],
    failed: list[str],
    *,
    batch_size: int,
    device: torch.device | str,
    max_pixels: int | None = MAX_PIXELS,
    **decode: Any,
) -> Iterator[tuple[list[Path], Generated]]:
    """Caption image files in batches, for the tools that take `images=`.

    Each image is made the model's input by `model.prepare`, as in training. A file that
    cannot be read is reported on stderr as `error: ...; skipped`, appended to `failed`, and
    costs nothing else: the rest of its batch is still captioned. Images larger than
    `max_pixels` are refused from their header (see `caption.data.images.read_rgb`).

    Yields:
        The paths of a batch that loaded, and their `Generated`.
    """
    for start in range(0, len(files), batch_size):
        images, good = [], []
        for path in files[start : start + batch_size]:
            try:
                images.append(model.prepare(path, max_pixels))
                good.append(path)
            except CaptionError as e:
                print(f"error: {e}; skipped", file=sys.stderr, flush=True)
                failed.append(str(path))
        if images:
            yield good, model.generate(torch.stack(images).to(device), **decode)


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
    allow_unk: bool = False,
    length_penalty: float = 0.0,
    block_trigrams: bool = False,
) -> list[dict[str, Any]]:
    """Caption every image of `bank` once (`<unk>` only if `allow_unk`, see `generate`).

    Returns:
        Per image, in `bank.records` order: `{"tokens": [...], "log_prob": float,
        "alphas": Tensor, "grid": (H', W')}`, where `alphas` (len(tokens), L) on the CPU is
        the attention of each word (row t for word t), for grounding and visualizing.
    """
    was_training = model.training
    model.eval()
    out: list[dict[str, Any]] = []
    for images, _ in DataLoader(ImageDataset(bank), batch_size=batch_size):
        gen = model.generate(
            images.to(device),
            strategy=strategy,
            beam_size=beam_size,
            max_len=max_len,
            allow_unk=allow_unk,
            length_penalty=length_penalty,
            block_trigrams=block_trigrams,
        )
        alphas = gen.alphas.cpu()  # (B, T, L): one copy per batch; rows below are views of it
        for i, (tokens, log_prob) in enumerate(
            zip(gen.tokens.tolist(), gen.log_probs.tolist(), strict=True)
        ):
            words = vocab.decode(tokens)
            out.append(
                {
                    "tokens": words,
                    "log_prob": log_prob,
                    "alphas": alphas[i, : len(words)],
                    "grid": gen.grid,
                }
            )
    model.train(was_training)
    return out


def score_bank(
    model: Captioner, bank: ImageBank, vocab: Vocabulary, **decode: Any
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Decode each image once and score it against all its references with BLEU-1..4 and
    CIDEr-D (`caption.metrics.cider_d`: document frequencies of these references, on the
    dataset's tokens; `caption-evaluate` reports the COCO toolkit's, on PTB tokens)."""
    captions = decode_bank(model, bank, vocab, **decode)
    references = [r.captions for r in bank.records]
    hypotheses = [c["tokens"] for c in captions]
    metrics = bleu(references, hypotheses)
    metrics["cider"] = cider_d(hypotheses, references)[0] if hypotheses else 0.0
    return metrics, captions


@torch.no_grad()
def reference_alphas(
    model: Captioner,
    bank: ImageBank,
    vocab: Vocabulary,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    grounded_only: bool = True,
) -> tuple[list[list[Tensor | None]], tuple[int, int]]:
    """The attention of every reference caption under teacher forcing.

    Caption `<start> w_0 w_1 .. <end>` is fed to the decoder; word w_i is predicted at step i
    from α_i (computed from h_{i-1}), so row i of a caption's map belongs to its token i,
    the same indexing as generated captions. Each image is encoded once for all its captions.

    Args:
        model: the captioner (run in eval mode, restored after).
        bank: the images and their references.
        vocab: maps reference words to ids (unknown words become `<unk>`).
        batch_size: images per forward pass; each brings all its captions.
        device: where the model is.
        grounded_only: skip captions without `groundings` (their entry is None).

    Returns:
        Per record, per reference caption: alphas (len(tokens), L) on the CPU or None; and
        the grid (H', W').
    """
    was_training = model.training
    model.eval()
    out: list[list[Tensor | None]] = [[None] * len(r.captions) for r in bank.records]
    grid: tuple[int, int] = (0, 0)
    for start in range(0, len(bank), batch_size):
        chunk = range(start, min(start + batch_size, len(bank)))
        pairs = [
            (i, j)
            for i in chunk
            for j, tokens in enumerate(bank.records[i].captions)
            if tokens
            and (
                not grounded_only
                or (j < len(bank.records[i].groundings) and bank.records[i].groundings[j])
            )
        ]
        images = torch.stack([bank[i] for i in chunk]).to(device)
        grid = model.grid(images)
        if not pairs:
            continue
        annotations = model.encode(images)  # (B, L, D) once per image
        rows = torch.tensor([i - start for i, _ in pairs], device=annotations.device)
        captions = pad_sequence(
            [torch.tensor(vocab.encode(bank.records[i].captions[j])) for i, j in pairs],
            batch_first=True,
            padding_value=PAD_ID,
        ).to(annotations.device)  # (P, T) <start> w_0 .. <end> <pad>..
        alphas = model.decoder(annotations[rows], captions).alphas.cpu()  # (P, T-1, L)
        for p, (i, j) in enumerate(pairs):
            out[i][j] = alphas[p, : len(bank.records[i].captions[j])]
    model.train(was_training)
    return out, grid


def original_size(record: ImageRecord) -> tuple[int, int]:
    """The (width, height) of the record's image file, which its boxes are in.

    The Karpathy file's `width`/`height` when present, else the file's header (no decoding).
    """
    if record.width and record.height:
        return record.width, record.height
    with Image.open(record.path) as im:
        return im.size


def grounding_metrics(
    model: Captioner,
    bank: ImageBank,
    vocab: Vocabulary,
    captions: list[dict[str, Any]],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> dict[str, float | int | None]:
    """Grounding scores of generated captions, a uniform baseline and the references.

    Args:
        model: the captioner that generated `captions` (it is run again on the references).
        bank: the images; records with `objects` are scored, the others skipped.
        vocab: the model's vocabulary.
        captions: what `decode_bank` returned for `bank`.
        batch_size: images per forward pass for the references.
        device: where the model is.

    Returns:
        `pointing_acc`, `attention_in_box`, `pointing_acc_uniform`,
        `attention_in_box_uniform`, `n_mentions`, and `pointing_acc_reference`,
        `attention_in_box_reference`, `n_mentions_reference` (means are None without mentions).
    """
    S = bank.image_size
    vocabulary = object_vocabulary(o for r in bank.records for o in r.objects)
    generated, reference = GroundingTally(), GroundingTally()
    sizes = [original_size(r) if r.objects else None for r in bank.records]
    for record, size, caption in zip(bank.records, sizes, captions, strict=True):
        if not record.objects:
            continue
        mentions = find_mentions(caption["tokens"], record.objects, vocabulary)
        cells = cell_boxes(caption["grid"], S)
        score_caption(generated, caption["alphas"], mentions, record.objects, cells, size, S)
    ref_alphas, grid = reference_alphas(model, bank, vocab, batch_size=batch_size, device=device)
    cells = cell_boxes(grid, S)
    for record, size, per_caption in zip(bank.records, sizes, ref_alphas, strict=True):
        if not record.objects:
            continue
        for groundings, alphas in zip(record.groundings, per_caption, strict=False):
            if alphas is None:
                continue
            mentions = grounded_mentions(groundings)
            score_caption(reference, alphas, mentions, record.objects, cells, size, S)
    return {**generated.metrics(), **reference.metrics("_reference", uniform=False)}
