"""Caption metrics: corpus BLEU-1..4 against all references of each image."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from nltk.translate.bleu_score import corpus_bleu

# Cumulative BLEU-n uses uniform weights over 1..n-grams, as the COCO toolkit does.
_BLEU_WEIGHTS = [tuple([1.0 / n] * n) for n in range(1, 5)]


def bleu(
    references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Corpus BLEU-1..4, each image decoded once and scored against all its references.

    Args:
        references: per image, its reference captions as tokens (no `<start>`/`<end>`).
        hypotheses: per image, the generated caption as tokens.

    Returns:
        `{"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": ..}` in [0, 1].
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    if not hypotheses:
        return {f"bleu{n}": 0.0 for n in range(1, 5)}
    # No smoothing: a BLEU-4 of 0 with no 4-gram match is what papers report.
    with warnings.catch_warnings():  # nltk warns on every zero n-gram count
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu(
            [list(map(list, refs)) for refs in references],
            [list(h) for h in hypotheses],
            weights=_BLEU_WEIGHTS,
        )
    return {f"bleu{n}": float(s) for n, s in enumerate(scores, start=1)}
