"""Repetition in generated captions: the failure mode SCST is known for."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


def has_repeated_trigram(tokens: Sequence[Hashable]) -> bool:
    """Whether some trigram occurs twice or more in `tokens`."""
    trigrams = Counter(tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2))
    return any(n > 1 for n in trigrams.values())


def repeated_trigram_rate(captions: Sequence[Sequence[Hashable]]) -> float:
    """The fraction of captions in which some trigram occurs more than once ("a man in a red
    shirt and a red shirt" counts; 0.0 for no captions)."""
    if not captions:
        return 0.0
    return sum(has_repeated_trigram(c) for c in captions) / len(captions)
