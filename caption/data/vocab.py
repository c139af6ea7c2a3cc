"""Tokenisation and the word vocabulary."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

# Words, numbers and in-word apostrophes; everything else is punctuation to drop.
# Needs no downloaded data (unlike nltk.word_tokenize, which needs punkt).
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case a raw caption and split it into word tokens without punctuation."""
    return _TOKEN.findall(text.lower())


class Vocabulary:
    """A bijection between words and ids; ids 0..3 are `<pad>`, `<start>`, `<end>`, `<unk>`.

    Args:
        itos: the words in id order, starting with the four special tokens.
    """

    def __init__(self, itos: Sequence[str]) -> None:
        if tuple(itos[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {list(itos[:4])}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("a vocabulary must not contain duplicate words")

    @classmethod
    def build(
        cls, captions: Iterable[Sequence[str]], min_count: int = 1, max_size: int | None = None
    ) -> Vocabulary:
        """Build from tokenised captions: build it from the train split only.

        Args:
            captions: tokenised captions.
            min_count: words seen fewer times become `<unk>`.
            max_size: keep at most this many words (specials included), most frequent first.
        """
        counts = Counter(w for tokens in captions for w in tokens)
        # Sort by frequency, then alphabetically, so that equal inputs give equal ids.
        words = sorted(
            (w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
            key=lambda w: (-counts[w], w),
        )
        if max_size is not None:
            words = words[: max(0, max_size - len(SPECIALS))]
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """`<start>` + word ids + `<end>`; unknown words map to `<unk>`."""
        return [START_ID, *(self.stoi.get(w, UNK_ID) for w in tokens), END_ID]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first `<end>`, without `<start>` and `<pad>`."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i not in (START_ID, PAD_ID):
                words.append(self.itos[i])
        return words
