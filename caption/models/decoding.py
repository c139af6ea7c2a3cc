"""Decoding a caption from annotation vectors: greedy, ancestral sampling and beam search.

`Captioner.generate` is the public way in: it encodes the images, picks the search and calls
it. Every search returns a `Generated`, the one decode result the package passes around.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from caption.data.vocab import END_ID, PAD_ID, START_ID, UNK_ID
from caption.models.decoder import Decoder, DecoderStep

STRATEGIES = ("greedy", "beam", "sample")


class Generated(NamedTuple):
    """Captions of a batch of images, with what each word looked at: every search's result."""

    tokens: Tensor  # (B, T) word ids, `<end>` included, then `<pad>`
    alphas: Tensor  # (B, T, L) attention weights of each generated word
    log_probs: Tensor  # (B,) log p(caption | image), `<end>` included
    betas: Tensor  # (B, T) the gate of each generated word
    locations: Tensor  # (B, T) the cell each word looked at (hard) or attended most (soft)
    grid: tuple[int, int]  # (H', W'): reshape an alpha row to this to see it over the image
    # (B, T, 2) the window centre p_t per word of an attention with a `window` (local
    # attention), (row, col) in cell units, NaN after `<end>`; (B, T, h, 2) for h windowed
    # heads; None for attentions without a window.
    positions: Tensor | None = None


def sequential(
    dec: Decoder,
    annotations: Tensor,
    grid: tuple[int, int],
    max_len: int,
    sample: bool,
    temperature: float,
    forbidden: list[int],
    block_trigrams: bool = False,
) -> Generated:
    """Greedy decoding, or ancestral sampling at a temperature, never of `forbidden` ids.

    Args:
        dec: the decoder.
        annotations: a (B, L, D).
        grid: (H', W') of the annotations, passed on to the result.
        max_len: the most words per caption, `<end>` included.
        sample: draw each word from p(y_t) / temperature instead of taking the argmax.
        temperature: the softmax temperature, for `sample`.
        forbidden: word ids never emitted.
        block_trigrams: never emit a word that would repeat a trigram of the caption so far.
    """
    B, L, D = annotations.shape
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
        if block_trigrams and len(tokens) >= 3:
            blocked = repeated_trigram_words(torch.stack(tokens, 1), logits)
            logits = logits.masked_fill(blocked, -math.inf)
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
            position = step.attention.position  # (B, 2), or (B, h, 2) for h heads
            positions.append(position.masked_fill(_rows(done, position), math.nan))
        done = done | (y == END_ID)
        state = step.state
        if done.all():
            break
    return Generated(
        tokens=torch.stack(tokens, 1),
        alphas=torch.stack(alphas, 1),
        log_probs=log_prob,
        betas=torch.stack(betas, 1),
        locations=torch.stack(locations, 1),
        grid=grid,
        positions=torch.stack(positions, 1) if positions else None,  # (B, T, 2) or (B, T, h, 2)
    )


def beam_search(
    dec: Decoder,
    annotations: Tensor,
    grid: tuple[int, int],
    K: int,
    max_len: int,
    length_penalty: float,
    forbidden: list[int],
    block_trigrams: bool = False,
) -> Generated:
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

    With `block_trigrams`, an extension that would repeat a trigram of its hypothesis is
    pruned (log p = -inf), as in self-critical.pytorch. `grid`, (H', W') of the annotations,
    is passed on to the result.
    """
    B = len(annotations)
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
    # (n*k, t) the words of each live hypothesis, kept only to block repeated trigrams.
    history = y.new_zeros(B, 0) if block_trigrams else None
    for t in range(max_len):
        n, k = scores.shape  # k: live hypotheses per image, 1 at the first step
        step = dec.step(y, state, a, memory, recurrent)
        logits = _no_specials(step.logits, forbidden)
        logp = logits.log_softmax(-1)  # (n*k, V) log-probs, not logits
        if history is not None and t >= 3:  # pruned, not renormalised: log p stays the model's
            logp = logp.masked_fill(repeated_trigram_words(history, logp), -math.inf)
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
        if history is not None:
            history = torch.cat([history[rows.view(-1)], y.unsqueeze(1)], dim=1)
    return _assemble(settled, trail, grid)


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
        self,
        ids: Tensor,
        last: Tensor,
        row: Tensor,
        word: Tensor,
        log_prob: Tensor,
        grid: tuple[int, int],
    ) -> Generated:
        """Read back the captions of images `ids` (m,) whose last word `word` (m,) was emitted
        at step `last` (m,) by hypothesis `row` (m,) of that step, and whose log p is
        `log_prob` (m,); `grid` is passed on.

        Returns:
            The m captions, T = max(last) + 1 steps long, with `<pad>`, 0, -1 and NaN after
            each caption's last word.
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
        if positions is not None:  # (m, T, 2), or (m, T, h, 2) for h heads
            positions = positions.masked_fill(_rows(~on, positions), math.nan)
        return Generated(
            tokens=tokens.masked_fill(~on, PAD_ID),
            alphas=alphas * on.unsqueeze(-1),
            log_probs=log_prob,
            betas=betas * on,
            locations=locations.masked_fill(~on, -1),
            grid=grid,
            positions=positions,
        )


def _assemble(settled: list[_Result], trail: _Backpointers, grid: tuple[int, int]) -> Generated:
    """The captions of images settled at different steps, traced back in one pass and in
    input order, padded to the longest: `<pad>`, zero alphas and betas, -1 locations, NaN
    positions."""
    result = _Result(*(torch.cat(x) for x in zip(*settled, strict=True)))
    order = result.images.argsort()  # a permutation of the input indices: back to input order
    images, log_prob, last, row, word = (x[order] for x in result)
    return trail.trace(images, last, row, word, log_prob, grid)


def repeated_trigram_words(history: Tensor, like: Tensor) -> Tensor:
    """The words that would repeat a trigram, (B, V) bool (`like`'s shape and device).

    With the words so far h_0 .. h_{t-1} of each row (`history` (B, t), t >= 3), word c would
    form (h_{t-2}, h_{t-1}, c); it repeats the earlier trigram (h_i, h_{i+1}, h_{i+2}), i <= t-3,
    when that starts with the same bigram and c = h_{i+2}. `<end>` is never blocked: it ends a
    caption, so no earlier trigram holds it.
    """
    first, second, third = history[:, :-2], history[:, 1:-1], history[:, 2:]  # (B, t-2)
    match = (first == history[:, -2:-1]) & (second == history[:, -1:])
    rows, cols = match.nonzero(as_tuple=True)
    blocked = torch.zeros_like(like, dtype=torch.bool)
    blocked[rows, third[rows, cols]] = True
    return blocked


def forbidden_words(allow_unk: bool = False) -> list[int]:
    """The ids decoding never emits: `<pad>` and `<start>` (training never asks for them) and,
    unless `allow_unk`, `<unk>` (it stands for rare words, and names none of them)."""
    return [PAD_ID, START_ID] if allow_unk else [PAD_ID, START_ID, UNK_ID]


def _no_specials(logits: Tensor, forbidden: list[int]) -> Tensor:
    """The logits with the `forbidden` ids made impossible (-inf): their mass goes to the rest."""
    logits = logits.clone()
    logits[:, forbidden] = float("-inf")
    return logits


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A mask over the leading dims of `like`, shaped to broadcast over its trailing ones."""
    return mask.view(*mask.shape, *[1] * (like.dim() - mask.dim()))
