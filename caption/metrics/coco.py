"""Caption metrics: corpus BLEU-1..4 (nltk) and the COCO caption toolkit's METEOR, ROUGE-L and
CIDEr-D (pycocoevalcap), each image decoded once and scored against all its references."""

from __future__ import annotations

import contextlib
import io
import shutil
import warnings
from collections.abc import Sequence

from caption.errors import CaptionError

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
    # Imported here: nltk takes 0.8 s to import, and training loads this package for SCST.
    from nltk.translate.bleu_score import corpus_bleu

    # No smoothing: a BLEU-4 of 0 with no 4-gram match is what papers report.
    with warnings.catch_warnings():  # nltk warns on every zero n-gram count
        warnings.simplefilter("ignore", UserWarning)
        scores = corpus_bleu(
            [list(map(list, refs)) for refs in references],
            [list(h) for h in hypotheses],
            weights=_BLEU_WEIGHTS,
        )
    return {f"bleu{n}": float(s) for n, s in enumerate(scores, start=1)}


def coco_metrics(
    references: Sequence[Sequence[str]], hypotheses: Sequence[str], spice: bool = False
) -> dict[str, float]:
    """METEOR 1.5, ROUGE-L and CIDEr-D as papers report them (pycocoevalcap, PTB tokenizer).

    The tokenizer and METEOR run on Java; SPICE also needs Stanford CoreNLP models that it
    downloads on first use, so it is off by default.

    Args:
        references: per image, its reference captions as raw strings.
        hypotheses: per image, the generated caption as a string.
        spice: also compute SPICE (needs a download on first use).

    Returns:
        `{"meteor": .., "rouge_l": .., "cider": ..}` (and `"spice"`).
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    if shutil.which("java") is None:
        raise CaptionError(
            "METEOR and the PTB tokenizer need Java, and `java` is not on PATH; "
            "install a Java runtime or pass coco_metrics=false"
        )
    from pycocoevalcap.cider.cider import Cider  # imported here: it is slow and optional
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = {i: [{"caption": c} for c in refs] for i, refs in enumerate(references)}
    res = {i: [{"caption": h}] for i, h in enumerate(hypotheses)}
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    scorers = {"meteor": Meteor, "rouge_l": Rouge, "cider": Cider}
    if spice:
        from pycocoevalcap.spice.spice import Spice

        scorers["spice"] = Spice
    scores = {}
    for key, scorer in scorers.items():
        with contextlib.redirect_stdout(io.StringIO()):  # keep stdout machine-readable
            scores[key] = float(scorer().compute_score(gts, res)[0])
    return scores
