"""Evaluation: decode a split, score the captions (with `caption.metrics`), and ground the
attention in boxes.

- `decode`: caption image files or a dataset's banks in batches, the JSON Lines records,
  and the grounding scores of a decoded split.
- `results`: a results file's captions, matched to the records of a split.
- `grounding`: object mentions in captions and how much of a word's attention lies in its box.
"""
