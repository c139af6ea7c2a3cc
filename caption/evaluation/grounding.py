"""Grounding scores: does a word's attention fall on the object the word names?

A *mention* is a run of caption words that names one object of the image (e.g. "small red
circle") and identifies it uniquely. For each mention we ask, over the attention maps of its
words (word t is predicted with α_t, computed from h_{t-1}):

- pointing: does the most attended cell's centre lie inside the object's box at one or more
  of the mention's steps?
- attention in box: the mean over the mention's steps of the attention mass inside the box,
  each cell counted by the fraction of its area that the box covers.

A uniform-attention baseline is computed the same way: a uniformly random argmax cell lands
in the box with probability share = (cells whose centres are in the box) / L at every step,
so it points at least once in n steps with probability 1 − (1 − share)^n; its mass in the
box is the box's share of the image area.

Everything here is a pure function of tokens, objects, boxes and attention maps; running a
model is `caption.evaluation.decode`'s job. Boxes are `[x0, y0, x1, y1]` pixels, x1 and y1
exclusive, in the coordinates of the image the model saw (see `scale_box`). Cell (i, j) of an
H'×W' grid over an H×W image covers rows [i·H/H', (i+1)·H/H') and columns [j·W/W',
(j+1)·W/W'), row-major like the attention's L = H'·W' cells.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

Box = Sequence[float]  # [x0, y0, x1, y1], x1 and y1 exclusive


class Mention(NamedTuple):
    start: int  # index of the mention's first word in the caption
    end: int  # one past its last word
    object: int  # index into the image's objects


def object_vocabulary(objects: Iterable[Mapping[str, Any]]) -> set[str]:
    """The words that name objects (sizes, colours, shapes): the union of their `words`."""
    return {w for obj in objects for w in obj.get("words", [])}


def find_mentions(
    tokens: Sequence[str],
    objects: Sequence[Mapping[str, Any]],
    vocabulary: set[str] | None = None,
) -> list[Mention]:
    """Find the runs of words that name exactly one object of the image.

    A run is a maximal stretch of consecutive words from `vocabulary`. It mentions object k
    when all its words are among object k's `words` and no other object's words hold them
    all: "circle" with two circles in the image is ambiguous and not a mention, while
    "red circle" may be. A run whose words fit no object (a hallucinated "small green
    square") is not a mention either.

    Args:
        tokens: the caption's words, without `<start>`/`<end>`.
        objects: the image's objects, each with `words` (e.g. ["small", "red", "circle"]).
        vocabulary: the words that delimit runs. Pass the dataset's whole object vocabulary,
            so that a wrong attribute ("small" for a large object) breaks the match instead of
            being skipped; None uses this image's objects' words only.

    Returns:
        The mentions, in caption order.
    """
    words = [set(obj.get("words", [])) for obj in objects]
    vocabulary = vocabulary if vocabulary is not None else set().union(*words)
    mentions: list[Mention] = []
    t = 0
    while t < len(tokens):
        if tokens[t] not in vocabulary:
            t += 1
            continue
        start = t
        while t < len(tokens) and tokens[t] in vocabulary:
            t += 1
        run = set(tokens[start:t])
        fits = [k for k, w in enumerate(words) if run <= w]
        if len(fits) == 1:
            mentions.append(Mention(start, t, fits[0]))
    return mentions


def grounded_mentions(groundings: Mapping[int, int]) -> list[Mention]:
    """Mentions from a reference caption's `groundings` (token index -> object index).

    Consecutive tokens grounded to the same object form one mention; the annotation says
    which object, so no uniqueness test is needed.
    """
    mentions: list[Mention] = []
    for t in sorted(groundings):
        k = groundings[t]
        last = mentions[-1] if mentions else None
        if last is not None and last.end == t and last.object == k:
            mentions[-1] = Mention(last.start, t + 1, k)
        else:
            mentions.append(Mention(t, t + 1, k))
    return mentions


def _hw(size: int | Sequence[int]) -> tuple[float, float]:
    if isinstance(size, int | float):
        return float(size), float(size)
    H, W = size
    return float(H), float(W)


def cell_boxes(grid: Sequence[int], size: int | Sequence[int]) -> Tensor:
    """The pixel box of every cell of an H'×W' grid laid over an image.

    Args:
        grid: (H', W').
        size: the image side S, or (H, W).

    Returns:
        (L, 4) float boxes [x0, y0, x1, y1], row-major (cell i*W' + j is row i, column j).
    """
    Hc, Wc = (int(g) for g in grid)
    H, W = _hw(size)
    ys = torch.arange(Hc + 1, dtype=torch.float64) * (H / Hc)  # (H'+1,) row edges
    xs = torch.arange(Wc + 1, dtype=torch.float64) * (W / Wc)  # (W'+1,) column edges
    y0, x0 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")  # (H', W') each
    y1, x1 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x0, y0, x1, y1], dim=-1).view(-1, 4)


def scale_box(box: Box, original: Sequence[int], size: int | Sequence[int]) -> list[float]:
    """Map a box from the original image's pixels to those of the resized image the model saw.

    Args:
        box: [x0, y0, x1, y1] in the original image.
        original: the original (width, height).
        size: the model's input side S, or (H, W).
    """
    W0, H0 = (float(v) for v in original)
    H, W = _hw(size)
    sx, sy = W / W0, H / H0
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]


def box_overlap(cells: Tensor, box: Box) -> Tensor:
    """The fraction of each cell's area that lies inside `box`.

    Args:
        cells: (L, 4) from `cell_boxes`.
        box: [x0, y0, x1, y1] in the same pixels.

    Returns:
        (L,) in [0, 1].
    """
    b = torch.as_tensor([float(v) for v in box], dtype=cells.dtype)
    w = (torch.minimum(cells[:, 2], b[2]) - torch.maximum(cells[:, 0], b[0])).clamp(min=0)
    h = (torch.minimum(cells[:, 3], b[3]) - torch.maximum(cells[:, 1], b[1])).clamp(min=0)
    area = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
    return w * h / area


def centres_in_box(cells: Tensor, box: Box) -> Tensor:
    """(L,) bool: whether each cell's centre lies inside `box` (x1, y1 exclusive)."""
    cx = (cells[:, 0] + cells[:, 2]) / 2
    cy = (cells[:, 1] + cells[:, 3]) / 2
    x0, y0, x1, y1 = (float(v) for v in box)
    return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)


class MentionScore(NamedTuple):
    pointing: float  # 1.0 if the argmax cell's centre is in the box at one or more steps
    mass: float  # mean attention mass in the box over the mention's steps
    pointing_uniform: float  # 1 − (1 − share)^n for uniform attention
    mass_uniform: float  # the box's share of the image area


def score_mention(alphas: Tensor, cells: Tensor, box: Box) -> MentionScore:
    """Score one mention's attention maps against its object's box.

    Args:
        alphas: (n, L) the attention of the mention's n words (or (L,) for one word).
        cells: (L, 4) from `cell_boxes`, for the grid the alphas live on.
        box: the object's box, in the pixels `cells` use.
    """
    alphas = alphas.detach().to("cpu", torch.float64).reshape(-1, cells.shape[0])  # (n, L)
    n = alphas.shape[0]
    overlap = box_overlap(cells, box)  # (L,)
    inside = centres_in_box(cells, box)  # (L,)
    pointing = inside[alphas.argmax(dim=-1)].any()
    mass = (alphas @ overlap).mean()  # Σ_i α_ti · overlap_i, mean over steps
    share = inside.double().mean()
    return MentionScore(
        pointing=float(pointing),
        mass=float(mass),
        pointing_uniform=float(1 - (1 - share) ** n),
        mass_uniform=float(overlap.mean()),  # = box area ∩ image / image area
    )


@dataclass
class GroundingTally:
    """Sums of mention scores over a dataset; `metrics` turns them into means."""

    scores: list[MentionScore] = field(default_factory=list)

    def add(self, alphas: Tensor, cells: Tensor, box: Box) -> None:
        """Score one mention (see `score_mention`) and keep it."""
        self.scores.append(score_mention(alphas, cells, box))

    def metrics(self, suffix: str = "", uniform: bool = True) -> dict[str, float | int | None]:
        """`pointing_acc<suffix>`, `attention_in_box<suffix>` (and the uniform baseline's),
        plus `n_mentions<suffix>`; the means are None when there was no mention."""
        n = len(self.scores)

        def mean(k: int) -> float | None:
            return sum(s[k] for s in self.scores) / n if n else None

        out: dict[str, float | int | None] = {
            f"pointing_acc{suffix}": mean(0),
            f"attention_in_box{suffix}": mean(1),
        }
        if uniform:
            out[f"pointing_acc_uniform{suffix}"] = mean(2)
            out[f"attention_in_box_uniform{suffix}"] = mean(3)
        out[f"n_mentions{suffix}"] = n
        return out


def score_caption(
    tally: GroundingTally,
    alphas: Tensor,
    mentions: Iterable[Mention],
    objects: Sequence[Mapping[str, Any]],
    cells: Tensor,
    original: Sequence[int] | None = None,
    size: int | Sequence[int] | None = None,
) -> None:
    """Score every mention of one caption into `tally`.

    Args:
        tally: where the scores go.
        alphas: (T, L) word t's attention at row t; T covers at least every mention.
        mentions: from `find_mentions` or `grounded_mentions`.
        objects: the image's objects, with `box` in the original image's pixels.
        cells: (L, 4) `cell_boxes(grid, size)`.
        original: the original (width, height) the boxes are in; None: boxes are already in
            the pixels `cells` use.
        size: the side S (or (H, W)) the model saw; needed with `original`.
    """
    for m in mentions:
        box = objects[m.object]["box"]
        if original is not None and size is not None:
            box = scale_box(box, original, size)
        tally.add(alphas[m.start : m.end], cells, box)
