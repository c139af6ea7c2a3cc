"""What a training step minimises: `trainer.objective`, one class per objective.

An objective owns its data (what one item of an epoch is: a caption-image pair, or an image
with all its references) and its loss on a batch of that data. The trainer steps, counts and
resumes without knowing which one it runs.

- `xe`, `CrossEntropy`: teacher forcing on the references, the paper's objective.
- `scst`, `caption.training.scst.SelfCritical`: self-critical sequence training on CIDEr-D
  (Rennie et al., 2017), to fine-tune a cross-entropy model (`init_from`).

`caption.training.step.build_objective` picks one by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

from caption.data.dataset import CaptionBatch, CaptionDataset, collate_captions
from caption.data.vocab import PAD_ID, Vocabulary
from caption.models.captioner import Captioner
from caption.speed import images_to_device
from caption.training.dist import Dist

XE_TERMS = ("loss", "nll", "attention_reg")


class StepLosses(NamedTuple):
    """One rank's share of a step."""

    loss: Tensor | None  # what is minimised; None: this rank read no image but joins the step
    values: Tensor  # (len(terms),) the logged terms, detached, summed over the ranks later
    words: int  # the words this rank's loss scored (references, or sampled captions)
    images: Tensor | float  # the images of the whole step, all ranks (0: nothing to step)


class Objective(Protocol):
    terms: tuple[str, ...]  # the logged terms, `loss` first: train_<term> in metrics.jsonl

    def dataset(self, bank: Any, vocab: Vocabulary, max_len: int | None) -> Dataset: ...

    collate: Callable[[Any], Any]

    def losses(
        self, model: Captioner, batch: Any, dist: Dist, channels_last: bool
    ) -> StepLosses: ...


class CrossEntropy:
    """Teacher-forced word NLL on (image, reference) pairs, with the model's own penalties
    (`Captioner.loss`): Xu et al.'s objective."""

    terms = XE_TERMS
    collate = staticmethod(collate_captions)

    def dataset(self, bank: Any, vocab: Vocabulary, max_len: int | None) -> Dataset:
        return CaptionDataset(bank, vocab, max_len)

    def losses(
        self, model: Captioner, batch: CaptionBatch, dist: Dist, channels_last: bool
    ) -> StepLosses:
        device = dist.device
        images = images_to_device(batch.images, device, channels_last)
        captions = batch.captions.to(device, non_blocking=True)
        words = int((captions[:, 1:] != PAD_ID).sum()) if len(captions) else 0
        totals = None
        if dist.enabled:  # divide by the job's words and images, so that grads sum to the total
            totals = dist.all_reduce_sum(torch.tensor([float(words), float(len(images))]))
            totals = totals.to(device)
        images_in_step = len(images) if totals is None else totals[1]  # all ranks together
        if images_in_step == 0 or not len(images):
            return StepLosses(None, torch.zeros(len(self.terms), device=device), 0, images_in_step)
        losses = model.loss(images, captions, totals=totals)
        values = torch.stack([losses.loss, losses.nll, losses.attention_reg]).detach().float()
        return StepLosses(losses.loss, values, words, images_in_step)
