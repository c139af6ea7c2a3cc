"""Grounding scores: exact values on hand-made attention maps, mentions, and the model paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caption.data.dataset import ImageBank
from caption.data.formats import read_karpathy
from caption.data.records import ImageRecord
from caption.data.vocab import Vocabulary
from caption.evaluation.decode import (
    decode_bank,
    grounding_metrics,
    original_size,
    reference_alphas,
)
from caption.evaluation.grounding import (
    GroundingTally,
    Mention,
    box_overlap,
    cell_boxes,
    centres_in_box,
    find_mentions,
    grounded_mentions,
    scale_box,
    score_caption,
    score_mention,
)
from caption.models.build import build_model
from tests.helpers.config import TINY_MODEL, compose_config

GRID, S = (8, 8), 64  # 64 px images, an 8×8 grid of 8 px cells
CELLS = cell_boxes(GRID, S)
BOX = [16, 16, 32, 32]  # exactly cells (2, 2), (2, 3), (3, 2), (3, 3)


def one_hot(*cells: tuple[int, int], weights: list[float] | None = None) -> torch.Tensor:
    """An attention map (L,) with the given mass on the given (row, col) cells."""
    alpha = torch.zeros(64)
    weights = weights or [1.0 / len(cells)] * len(cells)
    for (i, j), w in zip(cells, weights, strict=True):
        alpha[i * 8 + j] = w
    return alpha


def test_cell_boxes_tile_the_image_row_major() -> None:
    cells = cell_boxes((2, 3), (4, 6))  # (H', W') over (H, W)
    assert cells.shape == (6, 4)
    assert cells[0].tolist() == [0, 0, 2, 2]
    assert cells[2].tolist() == [4, 0, 6, 2]  # row 0, column 2
    assert cells[3].tolist() == [0, 2, 2, 4]  # row 1, column 0
    assert CELLS[9].tolist() == [8, 8, 16, 16]  # row 1, column 1 of the 8×8 grid


def test_all_mass_in_the_box_scores_one_and_outside_zero() -> None:
    inside = score_mention(one_hot((2, 2)), CELLS, BOX)
    assert inside.pointing == 1.0 and inside.mass == 1.0
    spread = score_mention(one_hot((2, 2), (2, 3), (3, 2), (3, 3)), CELLS, BOX)
    assert spread.pointing == 1.0 and spread.mass == pytest.approx(1.0)
    outside = score_mention(one_hot((7, 7), (0, 0)), CELLS, BOX)
    assert outside.pointing == 0.0 and outside.mass == 0.0
    # Over a mention's steps: pointing at one step is enough, the mass is the mean.
    steps = torch.stack([one_hot((7, 7)), one_hot((2, 2)), one_hot((0, 5))])
    both = score_mention(steps, CELLS, BOX)
    assert both.pointing == 1.0 and both.mass == pytest.approx(1 / 3)


def test_mass_counts_each_cell_by_its_overlap_and_pointing_uses_the_centre() -> None:
    box = [12, 16, 20, 24]  # half of cell (2, 1) and half of cell (2, 2)
    overlap = box_overlap(CELLS, box)
    assert overlap[2 * 8 + 1] == 0.5 and overlap[2 * 8 + 2] == 0.5 and overlap.sum() == 1.0
    left = score_mention(one_hot((2, 1)), CELLS, box)  # centre (12, 20): on x0, inside
    assert left.mass == 0.5 and left.pointing == 1.0
    right = score_mention(one_hot((2, 2)), CELLS, box)  # centre (20, 20): on x1, exclusive
    assert right.mass == 0.5 and right.pointing == 0.0
    split = score_mention(one_hot((2, 1), (6, 6), weights=[0.25, 0.75]), CELLS, box)
    assert split.mass == pytest.approx(0.125) and split.pointing == 0.0  # argmax is (6, 6)


def test_uniform_baseline() -> None:
    uniform = torch.full((3, 64), 1 / 64)
    score = score_mention(uniform, CELLS, BOX)  # 4 of 64 cells, a 3-word mention
    share = 4 / 64
    assert score.pointing_uniform == pytest.approx(1 - (1 - share) ** 3)
    assert score.mass_uniform == pytest.approx(16 * 16 / 64**2)
    assert score.mass == pytest.approx(score.mass_uniform)  # uniform α has exactly that mass
    # A box that splits cells: the mass share is the area, the pointing share counts centres.
    box = [12, 12, 28, 20]
    odd = score_mention(torch.full((1, 64), 1 / 64), CELLS, box)
    assert odd.mass_uniform == pytest.approx(16 * 8 / 64**2)
    assert centres_in_box(CELLS, box).sum() == 2  # centres (12, 12) and (20, 12)
    assert odd.pointing_uniform == pytest.approx(2 / 64)


def test_scale_box_to_the_model_input() -> None:
    assert scale_box([10, 20, 30, 40], (128, 64), 64) == [5, 20, 15, 40]
    assert scale_box([10, 20, 30, 40], (64, 64), (32, 32)) == [5, 10, 15, 20]


OBJECTS = [
    {"box": [0, 0, 12, 12], "words": ["small", "red", "circle"]},
    {"box": [30, 30, 52, 52], "words": ["large", "blue", "circle"]},
    {"box": [40, 0, 52, 12], "words": ["small", "green", "square"]},
]
VOCAB = {"small", "large", "red", "green", "blue", "white", "circle", "square", "diamond"}


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a small red circle above a large blue circle", [(1, 4, 0), (6, 9, 1)]),
        ("a red circle and a blue circle", [(1, 3, 0), (5, 7, 1)]),
        ("a circle and a circle", []),  # two circles: "circle" is ambiguous
        ("a small circle", [(1, 3, 0)]),  # only the red circle is small: unique
        ("a square to the right of a small red circle", [(1, 2, 2), (7, 10, 0)]),
        ("a small blue circle", []),  # no object is both small and blue
        ("a white diamond", []),  # no such object
    ],
)
def test_find_mentions(caption: str, expected: list[tuple[int, int, int]]) -> None:
    tokens = caption.split()
    assert find_mentions(tokens, OBJECTS, VOCAB) == [Mention(*m) for m in expected]


def test_find_mentions_vocabulary_breaks_runs_at_wrong_attributes() -> None:
    tokens = ["a", "white", "square"]
    # With the dataset's object words, "white square" fits no object: not a mention.
    assert find_mentions(tokens, OBJECTS, VOCAB) == []
    # With this image's words only, "white" is not an object word and "square" is unique.
    assert find_mentions(tokens, OBJECTS) == [Mention(2, 3, 2)]


def test_grounded_mentions_group_consecutive_tokens_of_one_object() -> None:
    assert grounded_mentions({1: 0, 2: 0, 3: 0, 8: 1, 9: 1}) == [
        Mention(1, 4, 0),
        Mention(8, 10, 1),
    ]
    assert grounded_mentions({1: 0, 2: 1}) == [Mention(1, 2, 0), Mention(2, 3, 1)]
    assert grounded_mentions({}) == []


def test_tally_and_score_caption() -> None:
    tally = GroundingTally()
    assert tally.metrics() == {
        "pointing_acc": None,
        "attention_in_box": None,
        "pointing_acc_uniform": None,
        "attention_in_box_uniform": None,
        "n_mentions": 0,
    }
    objects = [{"box": [32, 32, 64, 64], "words": ["red", "circle"]}]  # in 128 px pixels
    alphas = torch.stack([one_hot((0, 0)), one_hot((2, 2)), one_hot((3, 3))])  # 3 words
    # Original 128 px: the box is cells rows/cols 2-3 at 64 px; word 0 looks elsewhere.
    score_caption(tally, alphas, [Mention(1, 3, 0)], objects, CELLS, (128, 128), S)
    score_caption(tally, alphas, [Mention(0, 1, 0)], objects, CELLS, (128, 128), S)
    m = tally.metrics("_x", uniform=False)
    assert m == {"pointing_acc_x": 0.5, "attention_in_box_x": 0.5, "n_mentions_x": 2}


def tiny_setup(tiny_shapes: Path, n: int = 6) -> tuple[object, ImageBank, Vocabulary]:
    records = read_karpathy(tiny_shapes)
    vocab = Vocabulary.build(c for r in records["train"] for c in r.captions)
    torch.manual_seed(0)
    model = build_model(compose_config("train", TINY_MODEL).model, vocab_size=len(vocab))
    return model.eval(), ImageBank(records["test"][:n], 64), vocab


def test_teacher_forced_alphas_line_up_with_generated_words(tiny_shapes: Path) -> None:
    """Word i of a caption is predicted at decoder step i: feeding the greedy caption back
    under teacher forcing must give the alphas that generation reported for each word."""
    model, bank, vocab = tiny_setup(tiny_shapes)
    decoded = decode_bank(model, bank, vocab, strategy="greedy", max_len=8)
    records = [
        ImageRecord(r.imgid, r.path, r.split, [c["tokens"]], r.objects, [{0: 0}])
        for r, c in zip(bank.records, decoded, strict=True)
    ]
    replay = ImageBank(records, 64)
    alphas, grid = reference_alphas(model, replay, vocab, batch_size=4)
    assert grid == decoded[0]["grid"] == (8, 8)
    for per_caption, c in zip(alphas, decoded, strict=True):
        if not c["tokens"]:  # an untrained model may end at once: nothing to compare
            continue
        assert per_caption[0].shape == c["alphas"].shape == (len(c["tokens"]), 64)
        torch.testing.assert_close(per_caption[0], c["alphas"], atol=1e-5, rtol=1e-4)


def test_grounding_metrics_on_a_tiny_model(tiny_shapes: Path) -> None:
    model, bank, vocab = tiny_setup(tiny_shapes)
    assert original_size(bank.records[0]) == (80, 80)
    decoded = decode_bank(model, bank, vocab, strategy="beam", beam_size=2, max_len=12)
    m = grounding_metrics(model, bank, vocab, decoded, batch_size=4)
    keys = {
        "pointing_acc",
        "attention_in_box",
        "pointing_acc_uniform",
        "attention_in_box_uniform",
        "n_mentions",
        "pointing_acc_reference",
        "attention_in_box_reference",
        "n_mentions_reference",
    }
    assert set(m) == keys
    # Each of an image's 6 references names every object once.
    n_objects = sum(len(r.objects) for r in bank.records)
    assert m["n_mentions_reference"] == 6 * n_objects
    for k in ("pointing_acc_reference", "attention_in_box_reference"):
        assert 0.0 <= m[k] <= 1.0
    if m["n_mentions"]:  # an untrained model may name nothing
        assert 0.0 <= m["pointing_acc"] <= 1.0 and 0.0 <= m["attention_in_box_uniform"] <= 1.0
