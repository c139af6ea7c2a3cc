"""Self-critical sequence training (Rennie et al., CVPR 2017): REINFORCE on CIDEr-D.

Per image the policy samples N captions w^1..w^N (multinomial, temperature 1). Each gets the
reward r(w^n), its CIDEr-D against the image's training references (document frequencies of
the training references, computed once: `caption.metrics.CiderD`). The baseline b is the
reward of the greedy decode of the same image (`baseline=greedy`, the paper's "self-critical"
test-time baseline), or the mean reward of the image's other N − 1 samples (`baseline=mean`,
the "new self-critical" variant). The loss is

    L = Σ_n −(r(w^n) − b) log p(w^n | I)  /  W,

W the words sampled in the step (the normalisation of cross-entropy training). The captions
are sampled with gradients on, in the model's training mode, so log p is that of the very
policy that drew them, dropout masks and all. A stochastic attention's location samples
s^n ride along: its `surrogate`, given the same reward and baseline, adds λ_r (r − b) log p(s^n)
(and its entropy term), so the locations are trained on CIDEr-D too. The doubly stochastic
penalty stays on, so that fine-tuning keeps the attention spread over the image.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from caption.config import SCST_BASELINES
from caption.data.vocab import END_ID, PAD_ID, START_ID, Vocabulary
from caption.errors import CaptionError
from caption.metrics import CiderD
from caption.models.attention import CaptionSteps
from caption.models.captioner import Captioner
from caption.models.decoder import Decoder
from caption.models.decoding import forbidden_words, sequential
from caption.speed import images_to_device
from caption.training.dist import Dist
from caption.training.objectives import StepLosses


class ImageBatch(NamedTuple):
    images: Tensor  # (B, 3, S, S) uint8, or cached annotations (B, L, D)
    ids: Tensor  # (B,) each image's index into the bank's records
    skipped: tuple[str, ...] = ()  # why each unreadable image of the batch was left out


class ImageIndexDataset(Dataset):
    """One item per training image: the image and its index (whose references score it)."""

    def __init__(self, bank: Any) -> None:
        self.bank = bank

    def __len__(self) -> int:
        return len(self.bank)

    def __getitems__(self, keys: list[int]) -> ImageBatch:
        """A batch of images; a lazily read bank skips (and names) the unreadable ones."""
        ids = torch.as_tensor(keys, dtype=torch.long)
        if getattr(self.bank, "pixels", True) is not None:  # preloaded, or a feature cache
            return ImageBatch(self.bank.batch(ids), ids)
        images, good, skipped = [], [], []
        for k in keys:
            try:
                images.append(self.bank[k])
                good.append(k)
            except CaptionError as e:  # the loop decides: skip and count, or stop (strict)
                skipped.append(str(e))
        stacked = torch.stack(images) if images else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
        return ImageBatch(stacked, torch.as_tensor(good, dtype=torch.long), tuple(skipped))


def pass_batch(batch: ImageBatch) -> ImageBatch:
    """The DataLoader's collate: `__getitems__` made the batch already."""
    return batch


class Rollout(NamedTuple):
    """Captions sampled from the policy, with what the loss needs of each step."""

    tokens: Tensor  # (B, T) word ids, `<end>` included, then `<pad>`
    steps: CaptionSteps  # the real steps: −log p(w_t) with gradients, the attention's terms
    alphas: Tensor  # (n, L) α of each real step


def rollout(dec: Decoder, annotations: Tensor, max_len: int, forbidden: list[int]) -> Rollout:
    """Sample one caption per row of `annotations` (B, L, D), keeping the graph of log p.

    Rows that have ended keep stepping (the batch does not shrink) but record nothing.
    """
    B, L, D = annotations.shape
    memory = dec.attention.prepare(annotations)
    state = dec.init_state(annotations)
    recurrent = dec.recurrent_weight()
    y = annotations.new_full((B,), START_ID, dtype=torch.long)
    live = torch.ones(B, dtype=torch.bool, device=annotations.device)
    banned = torch.tensor(forbidden, device=annotations.device)
    tokens, rows, nll, alphas, terms = (
        [],
        [],
        [],
        [],
        {"log_prob": [], "entropy": [], "sampled": []},
    )
    for _ in range(max_len):
        step = dec.step(y, state, annotations, memory, recurrent)
        logp = step.logits.index_fill(1, banned, -math.inf).log_softmax(-1)  # (B, V)
        y = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
        index = live.nonzero().squeeze(1)  # the rows still going
        rows.append(index)
        nll.append(-logp[index, y[index]])
        alphas.append(step.attention.alpha[index])
        for key, values in terms.items():
            value = getattr(step.attention, key)
            values.append(None if value is None else value[index])
        tokens.append(y.masked_fill(~live, PAD_ID))
        live = live & (y != END_ID)
        state = step.state
        if not live.any():
            break

    def joined(values: list[Tensor | None]) -> Tensor | None:
        return None if values[0] is None else torch.cat(values)

    steps = CaptionSteps(
        B,
        torch.cat(rows),
        torch.cat(nll),
        joined(terms["log_prob"]),
        joined(terms["entropy"]),
        joined(terms["sampled"]),
    )
    return Rollout(torch.stack(tokens, 1), steps, torch.cat(alphas))


class SelfCritical:
    """The SCST objective on a train bank: N samples per image, CIDEr-D reward, a baseline.

    Args:
        bank: the train images; their records' captions are the references.
        vocab: the model's vocabulary.
        samples: N captions sampled per image.
        baseline: `greedy` (the greedy decode's reward) or `mean` (the others' mean reward).
        max_len: the most words per sampled caption, `<end>` included.
    """

    terms = ("loss", "nll", "attention_reg", "reward", "baseline")
    collate = staticmethod(pass_batch)

    def __init__(
        self,
        bank: Any,
        vocab: Vocabulary,
        samples: int = 5,
        baseline: str = "greedy",
        max_len: int = 16,
    ) -> None:
        if baseline not in SCST_BASELINES:
            raise ValueError(f"baseline must be one of {SCST_BASELINES}, got {baseline!r}")
        if baseline == "mean" and samples < 2:
            raise ValueError("baseline=mean needs samples >= 2: it averages the other samples")
        self.vocab, self.samples, self.baseline, self.max_len = vocab, samples, baseline, max_len
        self.references = [r.captions for r in bank.records]
        self.cider = CiderD(self.references)  # the training references' document frequencies

    def dataset(self, bank: Any, vocab: Vocabulary, max_len: int | None) -> Dataset:
        return ImageIndexDataset(bank)

    def losses(
        self, model: Captioner, batch: ImageBatch, dist: Dist, channels_last: bool
    ) -> StepLosses:
        device, N = dist.device, self.samples
        images = images_to_device(batch.images, device, channels_last)
        n_images = len(images)
        images_in_step = float(n_images)
        if dist.enabled:  # the job's images; then its words (every rank joins both)
            images_in_step = dist.all_reduce_sum(torch.tensor([images_in_step])).item()
        if not n_images:
            if dist.enabled and images_in_step:
                dist.all_reduce_sum(torch.zeros(1))  # the words of the others
            return StepLosses(None, torch.zeros(len(self.terms), device=device), 0, images_in_step)
        forbidden = forbidden_words()
        annotations = model.encode(images)  # (B, L, D), with gradients if the encoder trains
        ids = batch.ids.repeat_interleave(N).tolist()  # image-major: N samples per image
        out = rollout(
            model.decoder, annotations.repeat_interleave(N, dim=0), self.max_len, forbidden
        )
        reward = self._reward(out.tokens, ids, out.steps.nll)  # (B·N,)
        baseline = self._baseline(model, annotations, reward, batch.ids.tolist())
        steps, words = out.steps, len(out.steps.nll)
        n_words = words
        if dist.enabled:  # the job's sampled words, so that the ranks' gradients sum to its own
            n_words = dist.all_reduce_sum(torch.tensor([float(words)])).item()
        advantage = reward - baseline
        policy = (advantage * steps.per_caption(steps.nll)).sum() / n_words
        mass = steps.per_caption(out.alphas)  # (B·N, L) Σ_t α_ti
        penalty = ((1.0 - mass) ** 2).sum(dim=1)
        loss = policy + model.doubly_stochastic * penalty.sum() / n_words
        surrogate = model.decoder.attention.surrogate(steps, reward=reward, baseline=baseline)
        if surrogate is not None:  # a stochastic attention's locations learn from r − b too
            loss = loss - surrogate.sum() / n_words
        values = torch.stack(
            [
                loss.detach(),
                steps.nll.detach().sum() / n_words,
                penalty.detach().mean(),
                reward.mean(),
                baseline.mean(),
            ]
        ).float()
        return StepLosses(loss, values, words, images_in_step)

    def _reward(self, tokens: Tensor, ids: list[int], like: Tensor) -> Tensor:
        """CIDEr-D of each caption against its image's training references, as `like`'s dtype."""
        scores = self.cider.score([self.vocab.decode(row) for row in tokens.tolist()], ids)
        return torch.as_tensor(np.asarray(scores), dtype=like.dtype, device=like.device)

    def _baseline(
        self, model: Captioner, annotations: Tensor, reward: Tensor, ids: list[int]
    ) -> Tensor:
        """b per sample (B·N,): the greedy decode's reward, or the mean of the other samples'."""
        N = self.samples
        if self.baseline == "mean":
            per_image = reward.view(-1, N)
            others = (per_image.sum(dim=1, keepdim=True) - per_image) / (N - 1)
            return others.reshape(-1)
        was_training = model.training
        model.eval()  # the test-time decode is the baseline the policy must beat
        with torch.no_grad():
            greedy = sequential(
                model.decoder,
                annotations.detach(),
                model.grid(annotations),
                self.max_len,
                sample=False,
                temperature=1.0,
                forbidden=forbidden_words(),
            )
        model.train(was_training)
        b = self._reward(greedy.tokens, ids, reward)  # (B,)
        return b.repeat_interleave(N)
