"""Attention weightings φ over annotation vectors.

Every attention takes a query h (B, H) and annotations a (B, L, D) and returns weights
α (B, L) and a context ẑ (B, D). The query may also hold K consecutive rows per image, (B·K, H),
as beam search's K hypotheses do: they share the image's annotations and `prepare`d memory,
and α and ẑ then have B·K rows. The score function f_att is a separate module
(`caption.models.scores`), so that each variant is a Hydra config-group swap
(`model/score=...`, `model/attention=...`).

Every attention declares what the rest of the model may rely on, so that nothing outside the
attention modules asks for its type: `stochastic` (it samples where it looks, so it has a
training signal of its own), `window` (the radius of the window it looks in, None for the whole
grid) and `samples` (location samples per image in training). Its `surrogate` is that training
signal: the term the loss subtracts so that the loss's gradient is the attention's estimator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn


class AttentionOutput(NamedTuple):
    context: Tensor  # (B, D) ẑ_t, before the β gate
    alpha: Tensor  # (B, L) attention weights, non-negative, summing to 1
    location: Tensor  # (B,) the cell a hard model chose, else the most attended cell
    log_prob: Tensor | None = None  # (B,) log p(s_t | a) of a sampled cell; 0 where not sampled
    entropy: Tensor | None = None  # (B,) H[α_t], for the hard estimator's entropy term
    # (B, 2) p_t = (row, col) in cell units, attentions with a `window` only ((B, h, 2) for
    # h windowed heads): with the radius that is enough to outline the window a word could use.
    position: Tensor | None = None
    # (B,) bool, hard attention only: the context is the one cell a_{s_t}, not the expectation
    # Σ_i α_i a_i. In training these are the sequences whose coin said "sample": only their
    # rewards say anything about log p(y | s̃, a), so only they move the baseline.
    sampled: Tensor | None = None


class CaptionSteps(NamedTuple):
    """The real steps of a teacher-forced batch of B captions, one row per (caption, step).

    What an attention's `surrogate` reads: the word each step scored, and the terms a
    stochastic attention recorded there (None for a deterministic one).
    """

    captions: int  # B
    rows: Tensor  # (n,) the caption (0 .. B-1) of each step
    nll: Tensor  # (n,) −log p(y_t | ..) of each step's target word
    location_log_probs: Tensor | None  # (n,) log p(s_t | a) of a sampled cell, 0 where expected
    entropies: Tensor | None  # (n,) H[α_t]
    sampled: Tensor | None  # (n,) bool: the step looked at one sampled cell

    def per_caption(self, x: Tensor) -> Tensor:
        """(n, ...) step values -> (B, ...) summed over each caption's steps."""
        return x.new_zeros(self.captions, *x.shape[1:]).index_add(0, self.rows, x)


def expectation(alpha: Tensor, annotations: Tensor) -> Tensor:
    """Σ_i α_i a_i (B·K, D) for weights α (B·K, L), each image's K rows over its a (B, L, D)."""
    B, L, D = annotations.shape
    return torch.bmm(alpha.view(B, -1, L), annotations).view(-1, D)  # (B, K, L) @ (B, L, D)


class SoftAttention(nn.Module):
    """Deterministic soft attention: ẑ = Σ_i α_i a_i, the expectation of the context.

    It is smooth, so plain backpropagation trains it (Xu et al. §4.2).

    Args:
        score: builds the score function given `query_dim` and `key_dim`.
        query_dim: H, the decoder state size.
        key_dim: D, the annotation vector size.
    """

    stochastic: bool = False  # it samples where it looks: its training signal is its own
    window: int | None = None  # the radius of the window it may look in; None: the whole grid
    samples: int = 1  # location samples per image in training

    def __init__(self, score: Callable[..., nn.Module], query_dim: int, key_dim: int) -> None:
        super().__init__()
        self.score = score(query_dim=query_dim, key_dim=key_dim)

    def prepare(self, annotations: Tensor) -> Tensor:
        """Per-sequence memory, computed once per image: the step-independent part of the score."""
        return self.score.keys(annotations)

    def select(self, memory: Tensor, index: slice | Tensor) -> Tensor:
        """The memory of the sequences `index` picks, when the rest have ended.

        A slice (the packed prefix of captions still going) gives a view, no copy.
        """
        return memory[index]

    def forward(
        self, query: Tensor, annotations: Tensor, memory: Tensor, location: Tensor | None = None
    ) -> AttentionOutput:
        """Attend with query h (B, H) over annotations a (B, L, D).

        Args:
            query: h_{t-1}, (B, H).
            annotations: a, (B, L, D).
            memory: what `prepare` returned for these annotations.
            location: only hard attention can be told where to look.
        """
        if location is not None:
            raise ValueError("soft attention has no location to force")
        alpha = self.score(query, memory).softmax(dim=-1)  # (B, L)
        context = expectation(alpha, annotations)  # (B, D)
        return AttentionOutput(context, alpha, alpha.argmax(dim=-1))

    def surrogate(
        self, steps: CaptionSteps, reward: Tensor | None = None, baseline: Tensor | None = None
    ) -> Tensor | None:
        """The attention's own training term per caption (B,), which the loss subtracts.

        A deterministic attention has none: backpropagation through the NLL trains it.
        `HardAttention.surrogate` says what the arguments mean.
        """
        return None


class HardMemory(NamedTuple):
    keys: Tensor  # (B, L, A) the score's precomputed keys
    expect: Tensor | None  # (B,) bool: this sequence uses the expected context, not a sample


class HardAttention(SoftAttention):
    """Stochastic hard attention (Xu et al. §4.1): look at one sampled cell s_t ~ Multinoulli(α_t).

    Training maximises the lower bound L_s = Σ_s p(s|a) log p(y|s,a) with the Monte Carlo
    gradient 1/N Σ_n [∂log p(y|s̃ⁿ,a) + λ_r (log p(y|s̃ⁿ,a) − b) ∂log p(s̃ⁿ|a) + λ_e ∂H[s̃ⁿ]].
    The decoder records log p(s̃|a) and H per step; `surrogate` turns them into the term whose
    gradient is the estimator's score-function and entropy part (the NLL gives the first), and
    this module keeps the baseline b.

    Args:
        score: builds the score function given `query_dim` and `key_dim`.
        query_dim: H, the decoder state size.
        key_dim: D, the annotation vector size.
        samples: N, Monte Carlo samples of the location sequence per image.
        expectation_prob: the chance that a sequence uses the expectation Σ α_i a_i instead of
            a sample (the paper: 0.5).
        coin: flip that coin per `image` (the paper) or once per `batch` (the authors' code).
        reward_weight: λ_r (the authors' code hard-codes 0.1).
        entropy_weight: λ_e (the authors' code uses 0.002).
        baseline_decay: b_k = decay · b_{k−1} + (1 − decay) · R_k, R_k the mean reward of
            batch k's sampled sequences, those not on the expectation (paper: 0.9).
        reward: the reward R(s̃) that the baseline tracks: `caption`, the caption's
            log-likelihood log p(y|s̃,a) (the paper), or `word`, its mean per word
            log p(y|s̃,a) / T (the authors' code, whose baseline averages the per-word NLL).
        decode: at inference, use the `expectation` (the authors' default), the `argmax` cell or
            a `sample`.
    """

    COINS = ("image", "batch")
    DECODES = ("expectation", "argmax", "sample")
    REWARDS = ("caption", "word")
    stochastic = True

    def __init__(
        self,
        score: Callable[..., nn.Module],
        query_dim: int,
        key_dim: int,
        samples: int = 1,
        expectation_prob: float = 0.5,
        coin: str = "image",
        reward_weight: float = 0.1,
        entropy_weight: float = 0.002,
        baseline_decay: float = 0.9,
        decode: str = "expectation",
        reward: str = "caption",
    ) -> None:
        super().__init__(score, query_dim, key_dim)
        checks = [
            (samples >= 1, "samples", samples, "an integer >= 1"),
            (0 <= expectation_prob <= 1, "expectation_prob", expectation_prob, "in [0, 1]"),
            (coin in self.COINS, "coin", coin, f"one of {self.COINS}"),
            (0 <= baseline_decay < 1, "baseline_decay", baseline_decay, "in [0, 1)"),
            (decode in self.DECODES, "decode", decode, f"one of {self.DECODES}"),
            (reward in self.REWARDS, "reward", reward, f"one of {self.REWARDS}"),
        ]
        for ok, key, value, expected in checks:
            if not ok:
                raise ValueError(f"{key} must be {expected}, got {value!r}")
        self.samples = int(samples)
        self.expectation_prob = expectation_prob
        self.coin = coin
        self.reward_weight = reward_weight
        self.entropy_weight = entropy_weight
        self.baseline_decay = baseline_decay
        self.decode = decode
        self.reward = reward
        # Buffers, so that checkpoints carry the baseline and a resumed run continues it.
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_updates", torch.zeros((), dtype=torch.long))

    def prepare(self, annotations: Tensor) -> HardMemory:
        """The keys, and in training the expected-α coin for each sequence."""
        keys = super().prepare(annotations)
        if not self.training:
            return HardMemory(keys, None)
        B = annotations.shape[0]
        flips = 1 if self.coin == "batch" else B
        expect = torch.rand(flips, device=annotations.device) < self.expectation_prob
        return HardMemory(keys, expect.expand(B))

    def select(self, memory: HardMemory, index: slice | Tensor) -> HardMemory:
        """The memory of the sequences `index` picks: their keys and their coins."""
        expect = memory.expect[index] if memory.expect is not None else None
        return HardMemory(memory.keys[index], expect)

    def forward(
        self, query: Tensor, annotations: Tensor, memory: HardMemory, location: Tensor | None = None
    ) -> AttentionOutput:
        """Attend to one cell: sampled in training, per `decode` at inference, or as given.

        Args:
            query: h_{t-1}, (B, H).
            annotations: a, (B, L, D).
            memory: what `prepare` returned.
            location: (B,) force these cells (for exact enumeration of L_s in tests).
        """
        B, L, D = annotations.shape
        K = len(query) // B  # queries per image
        logits = self.score(query, memory.keys)  # (B·K, L)
        alpha = logits.softmax(dim=-1)
        log_alpha = logits.log_softmax(dim=-1)
        mode = "sample" if self.training else self.decode
        expect = (
            memory.expect if memory.expect is not None else alpha.new_zeros(B * K, dtype=torch.bool)
        )
        if mode == "expectation":
            expect = torch.ones_like(expect)
        if location is None:
            if mode == "sample":
                location = torch.multinomial(alpha.detach(), 1).squeeze(1)  # s_t ~ Multinoulli(α_t)
            else:
                location = alpha.argmax(dim=-1)
        expected = expectation(alpha, annotations)  # (B·K, D) Σ_i α_i a_i
        image = torch.arange(B * K, device=annotations.device) // K  # each query's image
        cell = annotations[image, location]  # (B·K, D) a_s
        context = torch.where(expect.unsqueeze(1), expected, cell)
        # Only sampled cells take part in the REINFORCE term.
        log_prob = log_alpha.gather(1, location.unsqueeze(1)).squeeze(1).masked_fill(expect, 0.0)
        entropy = -(alpha * log_alpha).sum(dim=-1)  # (B,) H[α_t]
        return AttentionOutput(context, alpha, location, log_prob, entropy, sampled=~expect)

    def surrogate(
        self, steps: CaptionSteps, reward: Tensor | None = None, baseline: Tensor | None = None
    ) -> Tensor:
        """Per caption (B,), the term whose gradient is the score-function and entropy part
        of the estimator: λ_r (R − b) log p(s̃|a) + λ_e Σ_t H[α_t]; then b moves.

        R is detached: it weighs ∂log p(s̃|a) and is not itself differentiated (its gradient is
        the NLL term's). The advantage uses b from before this batch's update: b must not depend
        on this batch's s̃, or the estimator is biased.

        Args:
            steps: the batch's steps, with the terms this attention recorded on them.
            reward: (B,) R per caption from outside, e.g. a sequence-level CIDEr-D reward
                (taken as is, detached); None: log p(y | s̃, a), or per word (`reward`).
            baseline: (B,) or () b to subtract instead of the moving average, which then
                stays where it is; None: the moving average, which moves towards this R.
        """
        per_caption = steps.per_caption
        if reward is None:
            reward = -per_caption(steps.nll).detach()  # (B,) R = log p(y | s̃, a)
            if self.reward == "word":  # the authors' code: the mean per-word log-likelihood
                reward = reward / per_caption(torch.ones_like(steps.nll))
        else:
            reward = reward.detach()
        b = self.baseline if baseline is None else baseline
        log_p_s = per_caption(steps.location_log_probs)  # (B,) log p(s̃ | a), 0 where expected
        entropy = per_caption(steps.entropies)  # (B,) Σ_t H[α_t]
        advantage = reward - b  # b from before this batch
        surrogate = self.reward_weight * advantage * log_p_s
        surrogate = surrogate + self.entropy_weight * entropy
        # One coin per caption: a caption sampled if its steps did.
        sampled = per_caption(steps.sampled.to(reward.dtype)) > 0  # (B,)
        if baseline is None:  # an outside baseline leaves the moving average alone
            self.update_baseline(reward, sampled)
        return surrogate

    @torch.no_grad()
    def update_baseline(self, reward: Tensor, sampled: Tensor) -> None:
        """b_k = decay · b_{k−1} + (1 − decay) · R_k, R_k the mean reward of the sampled sequences.

        Sequences that used the expected context did not draw s̃, so their log-likelihood is
        not a sample of the reward the baseline estimates; without a sampled sequence b stays.
        The first update starts b at R_k rather than decaying from 0. No host sync: the
        update is a `where`, not a branch on `sampled.any()`.

        Args:
            reward: (B,) R = log p(y | s̃, a) (or per word), detached.
            sampled: (B,) bool, the sequences that drew their locations.
        """
        count = sampled.sum()
        R = torch.where(sampled, reward, 0.0).sum() / count.clamp(min=1)  # mean over sampled
        moved = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * R
        moved = torch.where(self.baseline_updates == 0, R, moved)
        self.baseline.copy_(torch.where(count > 0, moved, self.baseline))
        self.baseline_updates += (count > 0).long()
