"""The captioner: an encoder, an attending decoder, the training loss and inference."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from caption.data.images import MAX_PIXELS
from caption.data.vocab import END_ID, PAD_ID, START_ID, UNK_ID
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
        encoder_self_attention: self-attention over the annotation vectors before decoding:
            an `AnnotationSelfAttention`, or its options (`layers`, `heads`, `ff_dim`,
            `dropout`) to build one.
        **decoder_kwargs: the remaining `Decoder` options.
    """

    def __init__(
        self,
        encoder: nn.Module,
        attention: Callable[..., nn.Module],
        score: Callable[..., nn.Module],
        vocab_size: int,
        doubly_stochastic: float = 1.0,
        encoder_self_attention: Mapping[str, Any] | AnnotationSelfAttention | None = None,
        **decoder_kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        if not isinstance(encoder_self_attention, AnnotationSelfAttention):
            options = encoder_self_attention or {}
            encoder_self_attention = AnnotationSelfAttention(encoder.out_dim, **options)
        self.self_attention = encoder_self_attention
        self.decoder = Decoder(vocab_size, encoder.out_dim, attention, score, **decoder_kwargs)
        self.doubly_stochastic = doubly_stochastic

    @property
    def image_size(self) -> int:
        """The side S of the square images this model takes (its encoder's, saved with it)."""
        return self.encoder.image_size

    def prepare(
        self, image: Image.Image | str | Path, max_pixels: int | None = MAX_PIXELS
    ) -> Tensor:
        """An image (PIL, or a file's path) as this model's input, uint8 (3, S, S): resized
        whole to its square as in training (see `Encoder.prepare`)."""
        return self.encoder.prepare(image, max_pixels)

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
        allow_unk: bool = False,
    ) -> Generated:
        """Caption a batch of images; returns the words with their attention.

        Args:
            images: (B, 3, S, S), uint8 or [0, 1] float.
            strategy: `greedy`, `beam` or `sample`.
            beam_size: live hypotheses per image, for `beam`; any size works, and 1 is greedy
                decoding (see `_beam` for what the search keeps and returns).
            max_len: the most words per caption, `<end>` included.
            temperature: softmax temperature, for `sample`.
            length_penalty: for `beam`, rank finished captions by log p / len^this, len counting
                `<end>` (0 = raw log p).
            allow_unk: let `<unk>` be generated; by default it is forbidden like `<pad>` and
                `<start>`, since a caption reading "a <unk> on a <unk>" tells a user nothing.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        annotations = self.encode(images)
        forbidden = forbidden_words(allow_unk)
        if strategy == "beam" and beam_size > 1:
            out = self._beam(annotations, beam_size, max_len, length_penalty, forbidden)
        else:
            out = self._sequential(
                annotations,
                max_len,
                sample=strategy == "sample",
                temperature=temperature,
                forbidden=forbidden,
            )
        *fields, positions = out
        return Generated(*fields, grid=self.grid(images), positions=positions)

    def _sequential(
        self,
        annotations: Tensor,
        max_len: int,
        sample: bool,
        temperature: float,
        forbidden: list[int],
    ) -> tuple[Tensor, ...]:
        """Greedy decoding, or ancestral sampling at a temperature, never of `forbidden` ids.

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
            logits = _no_specials(step.logits, forbidden)
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
        self,
        annotations: Tensor,
        K: int,
        max_len: int,
        length_penalty: float,
        forbidden: list[int],
    ) -> tuple[Tensor, ...]:
        """Beam search over all images at once: the live hypotheses of every image still being
        searched advance as one batch.

        Each image keeps K live hypotheses. At every step each live hypothesis is extended by
        every word; the `<end>` extensions are set aside as finished candidates, and the K most
        likely other extensions stay live (all k·V of them while k·V < K; when K exceeds the
        possible captions, hypotheses of log p = -inf, ending in a `forbidden` word, fill the
        rest and never win). Of the finished candidates only the best so far is kept per image,
        ranked by log p / len^length_penalty, len counting `<end>`: a finished caption is never
        pushed out by live ones, and a -inf one never counts as finished.

        An image's search ends at `max_len` or, with length_penalty == 0, as soon as its best
        finished score is at least every live score: live scores only fall as words are added,
        so nothing can overtake it, and the result is the one a search run to `max_len` would
        return. Settled images leave the batch. The result is the best finished candidate; if
        none could end within `max_len`, the best live hypothesis (all have `max_len` words, so
        the ranking is that of log p), without `<end>`.

        Returns:
            tokens, alphas, log_prob, betas, locations and positions (None without a window).
        """
        B = len(annotations)
        dec = self.decoder
        device = annotations.device
        # Image b's hypotheses are consecutive rows of the decoder state; they share the
        # image's annotations and attention memory, which are not copied K times.
        a = annotations  # (n, L, D) of the n images still being searched
        memory = dec.attention.prepare(a)
        state = dec.init_state(a)
        recurrent = dec.recurrent_weight()
        # The search starts from one hypothesis per image, `<start>`, whose best next words seed
        # the beams: the first step is not run K times over.
        y = torch.full((B,), START_ID, dtype=torch.long, device=device)  # (n*k,) last words
        scores = a.new_zeros(B, 1)  # (n, k) log p of the live hypotheses
        images = torch.arange(B, device=device)  # the input index of each image still searched
        best = _Finished.none(B, a)
        trail = _Backpointers()
        settled: list[_Result] = []
        for t in range(max_len):
            n, k = scores.shape  # k: live hypotheses per image, 1 at the first step
            step = dec.step(y, state, a, memory, recurrent)
            logits = _no_specials(step.logits, forbidden)
            logp = logits.log_softmax(-1)  # (n*k, V) log-probs, not logits
            V = logp.shape[-1]
            total = scores.unsqueeze(-1) + logp.view(n, k, V)  # (n, k, V) every extension
            best = best.update(total[..., END_ID], t, length_penalty)
            total[..., END_ID] = float("-inf")  # set aside: finished captions are not extended
            # Only k*V extensions exist, fewer than K at first when K > V.
            scores, idx = total.view(n, k * V).topk(min(K, k * V), dim=-1)  # (n, w)
            parent = torch.div(idx, V, rounding_mode="floor")  # integer division of indices
            word = idx % V
            trail.record(images, parent, word, step)
            rows = parent + k * torch.arange(n, device=device).unsqueeze(1)  # (n, w) state rows
            done = _settled(best, scores, t, max_len, length_penalty)
            if done is not None:
                settled.append(best.result(images, scores, parent, word, t, done))
                if done.all():
                    break
                # Drop the settled images: every later step works on the rest only.
                keep = ~done
                rows, word, scores = rows[keep], word[keep], scores[keep]
                a, images, best = a[keep], images[keep], best.select(keep)
                memory = dec.attention.select(memory, keep)
            state = tuple(x[rows.view(-1)] for x in step.state)
            y = word.view(-1)
        return _assemble(settled, trail)


def _settled(
    best: _Finished, scores: Tensor, t: int, max_len: int, length_penalty: float
) -> Tensor | None:
    """Which images' results are settled after step t (n,), or None if none is."""
    if t == max_len - 1:
        return torch.ones(len(scores), dtype=torch.bool, device=scores.device)
    if length_penalty != 0:  # dividing by a longer len may still lift a live hypothesis
        return None
    # Live scores only fall, and a candidate replaces the best only if strictly better.
    done = best.rank >= scores.amax(dim=1)
    return done if done.any() else None


class _Result(NamedTuple):
    """Settled images and what reads their captions back from the backpointers."""

    images: Tensor  # (m,) input indices
    log_prob: Tensor  # (m,) log p(caption | image)
    last: Tensor  # (m,) the step of the caption's last word
    row: Tensor  # (m,) the hypothesis of that step that emitted it
    word: Tensor  # (m,) that word: `<end>`, or any word when nothing ended


class _Finished(NamedTuple):
    """Per image still searched, the best `<end>` extension formed so far."""

    rank: Tensor  # (n,) log p / len^length_penalty; -inf: none yet
    log_prob: Tensor  # (n,)
    step: Tensor  # (n,) the step of its `<end>`; -1: none yet
    row: Tensor  # (n,) the hypothesis of that step that `<end>` extended

    @staticmethod
    def none(n: int, like: Tensor) -> _Finished:
        """No finished candidate yet for n images, scores in `like`'s dtype and device."""
        minus_inf = like.new_full((n,), float("-inf"))
        step = torch.full((n,), -1, dtype=torch.long, device=like.device)
        return _Finished(minus_inf, minus_inf.clone(), step, torch.zeros_like(step))

    def update(self, end: Tensor, t: int, length_penalty: float) -> _Finished:
        """Keep the better of the best so far and step t's `<end>` extensions `end` (n, k)."""
        ranked = end / float(t + 1) ** length_penalty  # t + 1 words, `<end>` included
        rank, row = ranked.max(dim=1)  # (n,)
        # Strictly better: a -inf candidate never replaces "none yet", ties keep the earlier.
        better = rank > self.rank
        return _Finished(
            torch.where(better, rank, self.rank),
            torch.where(better, end.gather(1, row.unsqueeze(1)).squeeze(1), self.log_prob),
            torch.where(better, t, self.step),
            torch.where(better, row, self.row),
        )

    def select(self, keep: Tensor) -> _Finished:
        return _Finished(*(x[keep] for x in self))

    def result(
        self, images: Tensor, scores: Tensor, parent: Tensor, word: Tensor, t: int, done: Tensor
    ) -> _Result:
        """The result of the images `done` (n,) selects, after step t's live `scores`,
        `parent` and `word` (n, w): the best finished candidate, else the best live one."""
        found = self.step >= 0
        live = scores.argmax(dim=1, keepdim=True)  # (n, 1) all live have t + 1 words
        fields = (
            torch.where(found, self.log_prob, scores.gather(1, live).squeeze(1)),
            torch.where(found, self.step, t),
            torch.where(found, self.row, parent.gather(1, live).squeeze(1)),
            torch.where(found, END_ID, word.gather(1, live).squeeze(1)),
        )
        return _Result(images[done], *(x[done] for x in fields))


class _Backpointers:
    """What each step's hypotheses emitted and where they looked, and what each extended.

    Step t appends, for the n images then searched, the live words (n, w) and their parent
    hypotheses (n, w), and the attention of the (n, k) hypotheses that stepped; nothing is
    copied afterwards. Captions are read back once, at the end, by following parents from the
    step of each one's last word to the first. (Reordering whole histories at every step would
    copy O(T²).)
    """

    def __init__(self) -> None:
        self.steps: list[tuple[Tensor, Tensor, Tensor, tuple[Tensor | None, ...]]] = []

    def record(self, images: Tensor, parent: Tensor, word: Tensor, step: DecoderStep) -> None:
        """Step t: its images (n,) (ascending), the live words (n, w) and the hypotheses of
        this step (n, k) they extend, and what those hypotheses attended to."""
        n = len(images)
        att = step.attention
        fields = (att.alpha, step.beta, att.location, att.position)
        fields = tuple(f.unflatten(0, (n, -1)) if f is not None else None for f in fields)
        self.steps.append((images, parent, word, fields))

    def trace(
        self, ids: Tensor, last: Tensor, row: Tensor, word: Tensor
    ) -> tuple[Tensor | None, ...]:
        """Read back the captions of images `ids` (m,) whose last word `word` (m,) was emitted
        at step `last` (m,) by hypothesis `row` (m,) of that step.

        Returns:
            tokens (m, T), alphas (m, T, L), betas, locations, and positions or None, for
            T = max(last) + 1, with `<pad>`, 0, -1 and NaN after each caption's last word.
        """
        columns = []
        col = torch.zeros_like(row)  # the live hypothesis of step s that step s + 1 extended
        for s in range(int(last.max()), -1, -1):
            images, parent, words, fields = self.steps[s]
            # Each image's row at step s; clamped for those settled before, which are masked.
            at = torch.searchsorted(images, ids).clamp(max=len(images) - 1)
            on = last >= s  # (m,) captions with a word at step s
            col = torch.where(last > s, col, 0)
            w = torch.where(last == s, word, words[at, col])
            r = torch.where(last == s, row, parent[at, col]).masked_fill(~on, 0)
            columns.append((on, w, *(f[at, r] if f is not None else None for f in fields)))
            col = r
        columns.reverse()
        on, tokens, alphas, betas, locations, positions = (
            torch.stack(x, dim=1) if x[0] is not None else None for x in zip(*columns, strict=True)
        )
        if positions is not None:
            positions = positions.masked_fill(~on.unsqueeze(-1), math.nan)
        return (
            tokens.masked_fill(~on, PAD_ID),
            alphas * on.unsqueeze(-1),
            betas * on,
            locations.masked_fill(~on, -1),
            positions,
        )


def _assemble(settled: list[_Result], trail: _Backpointers) -> tuple[Tensor, ...]:
    """The captions of images settled at different steps, traced back in one pass and in
    input order, padded to the longest: `<pad>`, zero alphas and betas, -1 locations, NaN
    positions."""
    result = _Result(*(torch.cat(x) for x in zip(*settled, strict=True)))
    order = result.images.argsort()  # a permutation of the input indices: back to input order
    images, log_prob, last, row, word = (x[order] for x in result)
    tokens, alphas, betas, locations, positions = trail.trace(images, last, row, word)
    return tokens, alphas, log_prob, betas, locations, positions


def forbidden_words(allow_unk: bool = False) -> list[int]:
    """The ids decoding never emits: `<pad>` and `<start>` (training never asks for them) and,
    unless `allow_unk`, `<unk>` (it stands for rare words, and names none of them)."""
    return [PAD_ID, START_ID] if allow_unk else [PAD_ID, START_ID, UNK_ID]


def _no_specials(logits: Tensor, forbidden: list[int]) -> Tensor:
    """The logits with the `forbidden` ids made impossible (-inf): their mass goes to the rest."""
    logits = logits.clone()
    logits[:, forbidden] = float("-inf")
    return logits
