"""BLEU against all references, each image once."""

from __future__ import annotations

import pytest

from caption.metrics import bleu


def test_perfect_match_scores_one() -> None:
    refs = [
        [["a", "red", "circle", "on", "the", "left"]],
        [["a", "small", "blue", "square", "here"]],
    ]
    hyps = [r[0] for r in refs]
    assert bleu(refs, hyps) == pytest.approx({f"bleu{n}": 1.0 for n in range(1, 5)})


def test_scores_against_every_reference() -> None:
    refs = [
        [["a", "blue", "square", "on", "the", "left"], ["a", "red", "circle", "on", "the", "right"]]
    ]
    assert bleu(refs, [refs[0][1]])["bleu4"] == pytest.approx(1.0)  # matching any one reference
    partial = bleu(refs, [["a", "red", "circle", "on", "the", "top"]])
    assert 0 < partial["bleu4"] < partial["bleu1"] < 1


def test_no_smoothing_and_length_checks() -> None:
    shuffled = bleu([[["a", "b", "c", "d"]]], [["d", "c", "b", "a"]])
    assert shuffled["bleu1"] == pytest.approx(1.0)
    assert shuffled["bleu4"] == pytest.approx(0.0, abs=1e-100)  # no 4-gram match, no smoothing
    with pytest.raises(ValueError):
        bleu([[["a"]]], [])


@pytest.mark.slow
def test_coco_metrics_end_to_end() -> None:
    """pycocoevalcap's METEOR, ROUGE-L and CIDEr-D run offline with Java on a tiny set."""
    from caption.metrics import coco_metrics

    refs = [
        [
            "a small red circle to the left of a large blue square",
            "there is a red circle and a blue square",
        ],
        ["a large green triangle", "one large green triangle"],
        ["a white diamond above a yellow square", "a yellow square below a white diamond"],
    ]
    perfect = coco_metrics(refs, [r[0] for r in refs])
    worse = coco_metrics(refs, ["a blue square", "a small green circle", "a red circle"])
    assert set(perfect) == {"meteor", "rouge_l", "cider"}
    assert perfect["rouge_l"] == pytest.approx(1.0)
    for key in perfect:
        assert 0 <= worse[key] < perfect[key]
    with pytest.raises(ValueError):
        coco_metrics(refs, ["x"])
