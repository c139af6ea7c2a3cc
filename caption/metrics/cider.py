"""CIDEr-D (Vedantam et al., 2015), as the COCO caption toolkit computes it, fast enough to be
a training reward.

For a caption c of image i with references S_i = {s_i1 .. s_im}, and n-grams of n = 1..4:

    g^n(x)   = tf-idf vector of x's n-grams: tf(ω, x) · (ref_len − log max(1, df(ω)))
    CIDEr-D  = 10 · mean_n  1/m Σ_j  [Σ_ω min(g^n_ω(c), g^n_ω(s_ij)) · g^n_ω(s_ij)]
                               / (‖g^n(c)‖ ‖g^n(s_ij)‖) · exp(−(ℓ(c) − ℓ(s_ij))² / 2σ²),  σ = 6

df(ω) counts the images whose reference set holds ω (once per image), ref_len is the log of
the number of those images, min(·) is the clipping that stops a caption from gaining by
repeating an n-gram, and the Gaussian penalises length differences. Two details follow
pycocoevalcap (its class for it is named `Cider`) to the letter, so that the scores equal its
own: a norm of 0 leaves the numerator undivided, and the length ℓ is the number of bigrams
(the toolkit counts `n == 1` on 0-based n): the word count − 1, which gives the same length
differences as word counts for every caption that can score above 0.

Where the document frequencies come from is the one choice:
- `cider_d(hypotheses, references)`: from the evaluated set's own references, as the toolkit
  does: a corpus score that equals pycocoevalcap's (tested to 1e-6, per image and in total).
- `CiderD(train_references)`: from the training references, computed once and kept, with
  ref_len = log(number of training images): the SCST reward, whose scale must not change from
  batch to batch. `score` reads the kept reference vectors of the images it is given.

Tokens are any hashable: words, or word ids.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

Tokens = Sequence[Hashable]


def ngrams(tokens: Tokens, n: int = 4) -> Counter[tuple[Hashable, ...]]:
    """The counts of every 1..n-gram of `tokens`."""
    tokens = tuple(tokens)
    return Counter(tokens[i : i + k] for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


class Vector(NamedTuple):
    """A caption's tf-idf vector over its n-grams, with what the similarity needs of it."""

    weights: dict[tuple[Hashable, ...], float]  # g_ω, all orders together (len(ω) says which)
    norms: tuple[float, ...]  # ‖g^n‖ per order n
    length: int  # ℓ: the bigram count, as the toolkit measures length


class CiderD:
    """CIDEr-D with document frequencies fixed at construction.

    Args:
        references: per image, its reference captions as tokens; they give the document
            frequencies (an n-gram counts once per image) and ref_len = log(len(references)),
            and their vectors are kept for `score`.
        n: the longest n-gram.
        sigma: σ of the Gaussian length penalty.
    """

    def __init__(self, references: Sequence[Sequence[Tokens]], n: int = 4, sigma: float = 6.0):
        if not references:
            raise ValueError("CIDEr-D needs the references of at least one image")
        self.n, self.sigma = n, sigma
        counted = [[ngrams(r, n) for r in refs] for refs in references]
        df: Counter[tuple[Hashable, ...]] = Counter()
        for refs in counted:
            df.update({g for ref in refs for g in ref})
        self.ref_len = math.log(float(len(references)))
        # idf per n-gram seen in a reference; any other n-gram has df 0, so idf = ref_len.
        self.idf = {g: self.ref_len - math.log(max(1.0, d)) for g, d in df.items()}
        self.references = [[self.vector(c) for c in refs] for refs in counted]

    def vector(self, counts: Counter[tuple[Hashable, ...]]) -> Vector:
        """The tf-idf vector of a caption's n-gram counts."""
        idf, ref_len = self.idf, self.ref_len
        weights = {g: tf * idf.get(g, ref_len) for g, tf in counts.items()}
        squares = [0.0] * self.n
        length = 0
        for g, w in weights.items():
            squares[len(g) - 1] += w * w
            if len(g) == 2:
                length += counts[g]
        return Vector(weights, tuple(math.sqrt(s) for s in squares), length)

    def similarity(self, hyp: Vector, ref: Vector) -> float:
        """mean_n of the clipped, length-penalised cosine of `hyp` and `ref`."""
        dots = [0.0] * self.n
        ref_weights = ref.weights
        for g, w in hyp.weights.items():
            r = ref_weights.get(g)
            if r is not None:
                dots[len(g) - 1] += min(w, r) * r
        penalty = math.exp(-((hyp.length - ref.length) ** 2) / (2 * self.sigma**2))
        total = 0.0
        for k in range(self.n):
            scale = hyp.norms[k] * ref.norms[k]
            total += (dots[k] / scale if scale != 0 else dots[k]) * penalty
        return total / self.n

    def _score(self, hypothesis: Tokens, refs: list[Vector]) -> float:
        hyp = self.vector(ngrams(hypothesis, self.n))
        return 10.0 * sum(self.similarity(hyp, r) for r in refs) / len(refs)

    def score(self, hypotheses: Sequence[Tokens], images: Sequence[int]) -> np.ndarray:
        """CIDEr-D of hypothesis k against the references of image `images[k]` (an index into
        the constructor's references; several hypotheses may share an image).

        Returns:
            (len(hypotheses),) float64 scores.
        """
        if len(hypotheses) != len(images):
            raise ValueError(f"{len(hypotheses)} hypotheses for {len(images)} images")
        refs = self.references
        return np.array([self._score(h, refs[i]) for h, i in zip(hypotheses, images, strict=True)])

    def score_against(
        self, hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]]
    ) -> np.ndarray:
        """CIDEr-D of each hypothesis against the given reference set, with this scorer's
        document frequencies."""
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
        return np.array(
            [
                self._score(h, [self.vector(ngrams(r, self.n)) for r in refs])
                for h, refs in zip(hypotheses, references, strict=True)
            ]
        )


def cider_d(
    hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]]
) -> tuple[float, np.ndarray]:
    """pycocoevalcap's CIDEr-D: document frequencies from these references (the evaluated
    set's), one hypothesis per image.

    Returns:
        The corpus score (the mean over images) and the per-image scores.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    scores = CiderD(references).score(hypotheses, range(len(hypotheses)))
    return float(scores.mean()), scores
