"""The captioner: an encoder, an attending decoder, the training loss and inference."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caption.data.vocab import END_ID, PAD_ID, START_ID
from caption.models.attention import HardAttention
from caption.models.decoder import Decoder, DecoderOutput, DecoderStep, PackedOutput
from caption.models.self_attention import AnnotationSelfAttention

STRATEGIES = ("greedy", "beam", "sample")


class Generated(NamedTuple):
    tokens: Tensor  # (B, T) word ids, `<end>` included, then `<pad>`
    alphas: Tensor  # (B, T, L) attention weights of each generated word
    log_probs: Tensor  # (B,) log p(caption | image), `<end>` included
    betas: Tensor  # (B, T) the gate of each generated word
    locations: Tensor  # (B, T) the cell each word looked at (hard) or attended most (soft)
    grid: tuple[int, int]  # (H', W'): reshape an alpha row to this to see it over the image
    # (B, T, 2) local attention's window centre p_t per word, (row, col) in cell units, NaN
    # after `<end>`; None for attentions without a window.
    positions: Tensor | None = None


class Losses(NamedTuple):
    loss: Tensor  # what is minimised
    nll: Tensor  # mean negative log-likelihood per word
    # Σ_i (1 − Σ_t α_ti)², the doubly stochastic penalty before λ, averaged over captions (for
    # logging); the loss adds λ × its sum over captions / words, the NLL's normalisation.
    attention_reg: Tensor


class Captioner(nn.Module):
    """Show, Attend and Tell: image -> annotation vectors -> attending LSTM -> words.

    Args:
        encoder: images (B, 3, S, S) in [0, 1] -> annotations (B, L, D); has `out_dim`.
        attention: builds the attention (`model/attention`), see `Decoder`.
        score: builds the score function (`model/score`).
        vocab_size: V.
        doubly_stochastic: λ of the penalty λ Σ_i (1 - Σ_t α_ti)² (0 switches it off): the
            authors' alpha_c, see `loss` for the normalisation.
        encoder_self_attention: options of `AnnotationSelfAttention` (`layers`, `heads`,
            `ff_dim`, `dropout`): self-attention over the annotation vectors before decoding.
        **decoder_kwargs: the remaining `Decoder` options.
    """

    def __init__(
        self,
        encoder: nn.Module,
        attention: Callable[..., nn.Module],
        score: Callable[..., nn.Module],
        vocab_size: int,
        doubly_stochastic: float = 1.0,
        encoder_self_attention: Mapping[str, Any] | None = None,
        **decoder_kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.self_attention = AnnotationSelfAttention(
            encoder.out_dim, **(encoder_self_attention or {})
        )
        self.decoder = Decoder(vocab_size, encoder.out_dim, attention, score, **decoder_kwargs)
        self.doubly_stochastic = doubly_stochastic

    def encode(self, images: Tensor) -> Tensor:
        """Annotation vectors a (B, L, D) of uint8 or [0, 1] float images (B, 3, S, S).

        3-D inputs are taken to be annotation vectors already, read from a feature cache of
        the frozen encoder; only the trainable self-attention then runs on them.
        """
        if images.dim() == 3:
            annotations = images.float()
        else:
            if images.dtype == torch.uint8:
                images = images.float().div_(255)
            annotations = self.encoder(images)
        if self.self_attention.layers:
            annotations = self.self_attention(annotations, self.grid(images))
        return annotations

    def grid(self, images: Tensor) -> tuple[int, int]:
        """The (H', W') grid of the annotation vectors for these images or cached annotations."""
        if images.dim() == 3:  # cached annotations of square images: L = S * S
            side = math.isqrt(images.shape[1])
            return side, side
        return self.encoder.grid_shape(images.shape[-1])

    def forward(
        self, images: Tensor, captions: Tensor, locations: Tensor | None = None
    ) -> DecoderOutput:
        """Teacher-forced logits (B, T-1, V), alphas (B, T-1, L) and what the attention chose."""
        return self.decoder(self.encode(images), captions, locations)

    def loss(
        self,
        images: Tensor,
        captions: Tensor,
        locations: Tensor | None = None,
        totals: Tensor | None = None,
    ) -> Losses:
        """Masked word NLL, the doubly stochastic penalty and, for hard attention, the
        surrogate whose gradient is the Monte Carlo estimator of ∂L_s/∂W (Xu et al. eq. 12).

        Normalisation: every term is summed over the captions and divided by the number of
        words W, so that the loss scale does not depend on caption lengths. The loss is thus
        the authors' objective (eq. 14 as in arctic-captions: the per-caption summed NLL plus
        alpha_c Σ_i (1 − Σ_t α_ti)², averaged over captions) times captions / W, a positive
        constant: `doubly_stochastic` is exactly the authors' alpha_c, and NLL and penalty keep
        their relative weight. For hard attention the same factor scales the estimator
        1/N Σ_n [..]; with N > 1 samples per image, every sample's words count in W.

        Args:
            images: (B, 3, S, S).
            captions: (B, T) `<start> .. <end> <pad>..`.
            locations: (B, T-1) cells to force, for hard attention (tests use it to enumerate);
                with N > 1 samples, (B·N, T-1) forces each sample's path (image-major).
            totals: (2,) the words and images of the whole data-parallel step, all ranks
                together, each image counted once, to divide by instead of this batch's own:
                then the sum of the ranks' losses (and gradients) is that of their combined
                batch. None: this batch alone.
        """
        annotations = self.encode(images)
        attention = self.decoder.attention
        hard = isinstance(attention, HardAttention) and self.training
        N = attention.samples if hard else 1  # location samples per image
        if N > 1:  # the N samples of an image share one encoding
            annotations = annotations.repeat_interleave(N, dim=0)
            captions = captions.repeat_interleave(N, dim=0)
            if locations is not None and len(locations) != len(captions):
                locations = locations.repeat_interleave(N, dim=0)
        # Packed: only real words are decoded and scored, so padding cannot count.
        out = self.decoder.packed(annotations, captions, locations)
        B, L = annotations.shape[:2]  # B = images × N
        # W and the caption count of the whole step; `totals` counts each image once.
        n_words = len(out.targets) if totals is None else totals[0] * N
        n_captions = B if totals is None else totals[1] * N
        token_nll = F.cross_entropy(out.logits, out.targets, reduction="none")  # (n,)
        nll = token_nll.sum() / n_words

        def per_caption(x: Tensor) -> Tensor:  # (n, ...) -> (B, ...) summed over steps
            return x.new_zeros(B, *x.shape[1:]).index_add(0, out.rows, x)

        # Σ_t α_ti over the real steps: each location should be looked at about once.
        mass = per_caption(out.alphas)  # (B, L)
        penalty = ((1.0 - mass) ** 2).sum(dim=1)  # (B,) Σ_i (1 − Σ_t α_ti)²
        loss = nll + self.doubly_stochastic * penalty.sum() / n_words  # the NLL's normalisation
        if hard:
            loss = loss - self._surrogate(out, token_nll, per_caption).sum() / n_words
        return Losses(loss, nll, penalty.sum() / n_captions)

    def _surrogate(
        self, out: PackedOutput, token_nll: Tensor, per_caption: Callable[[Tensor], Tensor]
    ) -> Tensor:
        """Per caption (B,), the term whose gradient is the score-function and entropy part
        of the estimator: λ_r (R − b) log p(s̃|a) + λ_e Σ_t H[α_t]; then b moves.

        R is detached: it weighs ∂log p(s̃|a) and is not itself differentiated (its gradient is
        the NLL term's). The advantage uses b from before this batch's update: b must not depend
        on this batch's s̃, or the estimator is biased.
        """
        attention = self.decoder.attention
        reward = -per_caption(token_nll).detach()  # (B,) R = log p(y | s̃, a)
        if attention.reward == "word":  # the authors' code: the mean per-word log-likelihood
            reward = reward / per_caption(torch.ones_like(token_nll))
        log_p_s = per_caption(out.location_log_probs)  # (B,) log p(s̃ | a), 0 where expected
        entropy = per_caption(out.entropies)  # (B,) Σ_t H[α_t]
        advantage = reward - attention.baseline  # b from before this batch
        surrogate = attention.reward_weight * advantage * log_p_s
        surrogate = surrogate + attention.entropy_weight * entropy
        # One coin per caption: a caption sampled if its steps did.
        sampled = per_caption(out.sampled.to(reward.dtype)) > 0  # (B,)
        attention.update_baseline(reward, sampled)
        return surrogate

    @torch.no_grad()
    def generate(
        self,
        images: Tensor,
        strategy: str = "beam",
        beam_size: int = 3,
        max_len: int = 20,
        temperature: float = 1.0,
        length_penalty: float = 0.0,
    ) -> Generated:
        """Caption a batch of images; returns the words with their attention.

        Args:
            images: (B, 3, S, S), uint8 or [0, 1] float.
            strategy: `greedy`, `beam` or `sample`.
            beam_size: beams per image, for `beam`.
            max_len: the most words per caption, `<end>` included.
            temperature: softmax temperature, for `sample`.
            length_penalty: for `beam`, rank finished captions by log p / len^this (0 = raw).
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        annotations = self.encode(images)
        if strategy == "beam" and beam_size > 1:
            out = self._beam(annotations, beam_size, max_len, length_penalty)
        else:
            out = self._sequential(
                annotations, max_len, sample=strategy == "sample", temperature=temperature
            )
        *fields, positions = out
        return Generated(*fields, grid=self.grid(images), positions=positions)

    def _sequential(
        self, annotations: Tensor, max_len: int, sample: bool, temperature: float
    ) -> tuple[Tensor, ...]:
        """Greedy decoding, or ancestral sampling at a temperature.

        Returns:
            tokens, alphas, log_prob, betas, locations and positions (None without a window).
        """
        B, L, D = annotations.shape
        dec = self.decoder
        memory = dec.attention.prepare(annotations)
        state = dec.init_state(annotations)
        recurrent = dec.recurrent_weight()  # once per batch, not once per step
        y = annotations.new_full((B,), START_ID, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool, device=annotations.device)
        log_prob = annotations.new_zeros(B)
        tokens, alphas, betas, locations, positions = [], [], [], [], []
        for _ in range(max_len):
            step = dec.step(y, state, annotations, memory, recurrent)
            logits = _no_specials(step.logits)
            logp = logits.log_softmax(-1)  # (B, V)
            if sample:
                y = torch.multinomial((logits / temperature).softmax(-1), 1).squeeze(1)
            else:
                y = logp.argmax(-1)
            log_prob += torch.where(done, 0.0, logp.gather(1, y[:, None]).squeeze(1))
            y = y.masked_fill(done, PAD_ID)  # finished captions only pad
            tokens.append(y)
            alphas.append(step.attention.alpha.masked_fill(done[:, None], 0.0))
            betas.append(step.beta.masked_fill(done, 0.0))
            locations.append(step.attention.location.masked_fill(done, -1))
            if step.attention.position is not None:
                positions.append(step.attention.position.masked_fill(done[:, None], math.nan))
            done = done | (y == END_ID)
            state = step.state
            if done.all():
                break
        stack = [torch.stack(x, 1) for x in (tokens, alphas, betas, locations)]
        position = torch.stack(positions, 1) if positions else None  # (B, T, 2)
        return stack[0], stack[1], log_prob, stack[2], stack[3], position

    def _beam(
        self, annotations: Tensor, K: int, max_len: int, length_penalty: float
    ) -> tuple[Tensor, ...]:
        """Beam search over all images at once: the K hypotheses of every image still being
        searched advance as one batch.

        Finished hypotheses stay in the beam, extended by `<pad>` at no cost, so they compete
        with live ones on their summed log-probability. An image leaves the batch as soon as
        its result is settled: when all its hypotheses have finished, or, without a length
        penalty, when its best finished hypothesis scores above every live one (a live score
        only falls as words are added, so nothing can overtake it). The result is the one a
        search run to the end would return, at the cost of the words decoded. If no hypothesis
        of an image reaches `<end>` within `max_len`, its best unfinished one is returned.
        """
        B, L, D = annotations.shape
        dec = self.decoder
        device = annotations.device
        # Image b's K hypotheses are rows bK..bK+K-1 of the decoder state; they share the
        # image's annotations and attention memory, which are not copied K times.
        a = annotations  # (n, L, D) of the n images still being searched
        memory = dec.attention.prepare(a)
        state = dec.init_state(a)  # (B, H): one hypothesis per image, then K
        recurrent = dec.recurrent_weight()
        # The search starts from one hypothesis per image, `<start>`, whose K best next words
        # seed the K beams: the first step is not run K times over.
        y = torch.full((B,), START_ID, dtype=torch.long, device=device)
        scores = annotations.new_zeros(B, 1)
        done = torch.zeros(B, 1, dtype=torch.bool, device=device)
        lengths = torch.zeros(B, 1, dtype=torch.long, device=device)  # words before <pad>
        images = torch.arange(B, device=device)  # the input index of each image still searched
        trail = _Backpointers()
        settled: list[tuple[Tensor, tuple[Tensor, ...]]] = []  # (images, their results)
        for t in range(max_len):
            n = len(images)
            step = dec.step(y, state, a, memory, recurrent)
            logp = _no_specials(step.logits).log_softmax(-1).view(n, len(y) // n, -1)  # log-probs
            k, V = logp.shape[1:]  # hypotheses per image: 1 at the first step, then K
            # A finished hypothesis has one continuation, <pad>, which costs nothing.
            pad_only = torch.full_like(logp[0, 0], float("-inf"))
            pad_only[PAD_ID] = 0.0
            logp = torch.where(done.unsqueeze(-1), pad_only, logp)
            scores, idx = (scores.unsqueeze(-1) + logp).view(n, k * V).topk(K, dim=-1)  # (n, K)
            parent = torch.div(idx, V, rounding_mode="floor")  # integer division of indices
            word = idx % V
            rows = (parent + k * torch.arange(n, device=device).unsqueeze(1)).view(-1)  # (n*K,)
            trail.record(images, parent, word, step, rows)  # word t and its parent's attention
            done = done.gather(1, parent) | (word == END_ID)
            lengths = lengths.gather(1, parent) + (word != PAD_ID)
            finished = done.all(dim=1)  # (n,)
            if length_penalty == 0:
                best_done = scores.masked_fill(~done, float("-inf")).amax(dim=1)
                finished |= best_done > scores.masked_fill(done, float("-inf")).amax(dim=1)
            if t == max_len - 1:
                finished[:] = True
            if finished.any():
                # Prefer complete captions; fall back to the best unfinished one.
                ranked = scores / lengths.float().clamp(min=1).pow(length_penalty)
                complete = ranked.masked_fill(~done, float("-inf"))
                ranked = torch.where(done.any(1, keepdim=True), complete, ranked)
                best = ranked[finished].argmax(dim=1)  # (m,)
                tokens, alphas, betas, locations, positions = trail.trace(finished, best)
                log_probs = scores[finished, best]
                settled.append(
                    (images[finished], (tokens, alphas, log_probs, betas, locations, positions))
                )
                if finished.all():
                    break
                # Drop the settled images: every later step works on the rest only.
                keep = ~finished
                rows = rows.view(n, K)[keep].view(-1)
                a = a[keep]
                memory = dec.attention.select(memory, keep)
                images, word = images[keep], word[keep]
                scores, done, lengths = scores[keep], done[keep], lengths[keep]
            state = tuple(x[rows] for x in step.state)
            y = word.reshape(-1)
        return _assemble(settled)


class _Backpointers:
    """What each step's hypotheses emitted, and which hypothesis each one extended.

    Every step appends (n, K) tensors for the n images then being searched, and nothing is
    copied afterwards; a finished caption is read back by following its parents, from its
    last step to the first. (Reordering whole histories at every step would copy O(T²).)
    """

    def __init__(self) -> None:
        self.steps: list[tuple[Tensor, ...]] = []

    def record(
        self, images: Tensor, parent: Tensor, word: Tensor, step: DecoderStep, rows: Tensor
    ) -> None:
        """Step t: its images (n,) (ascending), the parent beams (n, K) and words (n, K), and
        the attention of the parent hypotheses (flat rows `rows` of the step) behind them."""
        n, K = parent.shape
        att = step.attention
        position = att.position[rows].view(n, K, 2) if att.position is not None else None
        fields = (
            word,
            att.alpha[rows].view(n, K, -1),
            step.beta[rows].view(n, K),
            att.location[rows].view(n, K),
            position,
        )
        self.steps.append((images, parent, *fields))

    def trace(self, pick: Tensor, beam: Tensor) -> tuple[Tensor | None, ...]:
        """Follow beam `beam` (m,) of the images `pick` (n,) selects in the last step back
        to the first.

        Returns:
            tokens (m, t), alphas (m, t, L), betas, locations, and positions or None, with the
            steps after `<end>` zeroed (NaN positions, -1 locations).
        """
        ids = self.steps[-1][0][pick]  # the input indices of the images traced
        columns: list[tuple[Tensor | None, ...]] = []
        for images, parent, *fields in reversed(self.steps):
            at = torch.searchsorted(images, ids)  # each traced image's row at this step
            columns.append(tuple(f[at, beam] if f is not None else None for f in fields))
            beam = parent[at, beam]
        columns.reverse()
        tokens, alphas, betas, locations, positions = (
            torch.stack(x, dim=1) if x[0] is not None else None for x in zip(*columns, strict=True)
        )
        keep = tokens != PAD_ID  # (m, t) zero out the steps after <end>
        if positions is not None:
            positions = positions.masked_fill(~keep.unsqueeze(-1), math.nan)
        return (
            tokens,
            alphas * keep.unsqueeze(-1),
            betas * keep,
            locations.masked_fill(~keep, -1),
            positions,
        )


def _assemble(settled: list[tuple[Tensor, tuple[Tensor, ...]]]) -> tuple[Tensor, ...]:
    """The results of images settled at different steps, back in input order and padded to
    the longest caption: `<pad>` tokens, zero alphas and betas, -1 locations, NaN positions."""
    T = max(result[0].shape[1] for _, result in settled)
    images = torch.cat([i for i, _ in settled])  # a permutation of the input indices
    fills = (PAD_ID, 0.0, None, 0.0, -1, math.nan)  # None: log-probs, one per image, no steps
    out: list[Tensor | None] = []
    for field, fill in enumerate(fills):
        parts = [result[field] for _, result in settled]
        if parts[0] is None:  # positions, for attentions without a window
            out.append(None)
            continue
        if fill is not None:
            parts = [_pad_steps(x, T, fill) for x in parts]
        x = torch.cat(parts)
        out.append(torch.empty_like(x).index_copy_(0, images, x))
    return tuple(out)


def _pad_steps(x: Tensor, T: int, fill: float) -> Tensor:
    """(m, t, ...) -> (m, T, ...), the new steps filled with `fill`."""
    padded = x.new_full((x.shape[0], T, *x.shape[2:]), fill)
    padded[:, : x.shape[1]] = x
    return padded


def _no_specials(logits: Tensor) -> Tensor:
    """Forbid `<pad>` and `<start>` as generated words: training never asks for them."""
    logits = logits.clone()
    logits[:, [PAD_ID, START_ID]] = float("-inf")
    return logits
