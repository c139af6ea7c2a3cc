"""The package's CIDEr-D: equal to pycocoevalcap's on shapes and on real Flickr8k captions,
against a float64 reference written from the formula, and with training document frequencies."""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from caption.data.formats import read_flickr8k, read_karpathy
from caption.data.shapes import generate_shapes
from caption.metrics import CiderD, cider_d
from tests.helpers import ROOT

FLICKR8K = Path(os.environ.get("CAPTION_FLICKR8K", ROOT.parent / "shared" / "flickr8k"))


def toolkit(hypotheses: list[list[str]], references: list[list[list[str]]]):
    """pycocoevalcap's CIDEr-D on the same tokens (joined by spaces: it splits on them)."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(h)] for i, h in enumerate(hypotheses)}
    score, scores = Cider().compute_score(gts, res)
    return float(score), np.asarray(scores, dtype=np.float64)


def held_out(records, seed: int = 0) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Hypotheses as an evaluation sees them: caption #0 of each image, scored against the
    others; a quarter swapped with another image's caption #0, a few shuffled or repeated,
    so that misses, clipping and the length penalty all take part."""
    rng = random.Random(seed)
    hyps = [list(r.captions[0]) for r in records]
    refs = [[list(c) for c in r.captions[1:]] for r in records]
    for k in range(len(hyps)):
        roll = rng.random()
        if roll < 0.25:
            hyps[k] = list(records[rng.randrange(len(records))].captions[0])
        elif roll < 0.35:
            rng.shuffle(hyps[k])
        elif roll < 0.45:
            hyps[k] = hyps[k] + hyps[k][:4]  # repeated n-grams: clipping
        elif roll < 0.5:
            hyps[k] = hyps[k][:1]  # one word: no bigram at all
    return hyps, refs


@pytest.fixture(scope="module")
def shapes_records(tmp_path_factory: pytest.TempPathFactory):
    path = generate_shapes(tmp_path_factory.mktemp("cider"), n_train=200, n_val=1, n_test=1)
    return read_karpathy(path)["train"]


def test_equals_pycocoevalcap_on_shapes_captions(shapes_records) -> None:
    hyps, refs = held_out(shapes_records)
    ours, per_image = cider_d(hyps, refs)
    theirs, their_per_image = toolkit(hyps, refs)
    assert abs(ours - theirs) < 1e-6
    np.testing.assert_allclose(per_image, their_per_image, rtol=0, atol=1e-6)
    assert per_image.std() > 0.1  # the planted misses make the scores spread


@pytest.mark.skipif(
    not (FLICKR8K / "Flickr8k.token.txt").is_file(),
    reason=f"no Flickr8k at {FLICKR8K} (the team's copy; set CAPTION_FLICKR8K=<dir>)",
)
def test_equals_pycocoevalcap_on_real_flickr8k_captions() -> None:
    records = read_flickr8k(FLICKR8K / "Flickr8k.token.txt")["test"][:500]
    hyps, refs = held_out(records, seed=1)
    ours, per_image = cider_d(hyps, refs)
    theirs, their_per_image = toolkit(hyps, refs)
    assert abs(ours - theirs) < 1e-6
    np.testing.assert_allclose(per_image, their_per_image, rtol=0, atol=1e-6)


def reference_cider_d(hyp, refs, all_refs, sigma=6.0, clip=True) -> float:
    """CIDEr-D of one caption, in float64, straight from Vedantam et al.'s definition with
    the toolkit's conventions (df per image over `all_refs`, length = bigram count)."""

    def grams(x, n):
        return Counter(tuple(x[i : i + n]) for i in range(len(x) - n + 1))

    N = len(all_refs)
    total = 0.0
    for n in range(1, 5):
        df = Counter(g for rs in all_refs for g in {g for r in rs for g in grams(r, n)})

        def g_vec(x, n=n, df=df):
            return {g: c * (math.log(N) - math.log(max(1, df[g]))) for g, c in grams(x, n).items()}

        h = g_vec(hyp)
        per_ref = []
        for r in refs:
            s = g_vec(r)
            num = sum((min(h[g], s.get(g, 0.0)) if clip else h[g]) * s.get(g, 0.0) for g in h)
            norm = math.sqrt(sum(v * v for v in h.values())) * math.sqrt(
                sum(v * v for v in s.values())
            )
            cos = num / norm if norm else num
            delta = max(len(hyp) - 1, 0) - max(len(r) - 1, 0)
            per_ref.append(cos * math.exp(-(delta**2) / (2 * sigma**2)))
        total += sum(per_ref) / len(refs)
    return 10.0 * total / 4


def test_equals_a_float64_reference_written_from_the_formula() -> None:
    refs = [
        [["a", "red", "circle", "left", "of", "a", "blue", "square"], ["a", "red", "circle"]],
        [["a", "green", "triangle"], ["one", "green", "triangle", "above", "a", "circle"]],
        [["a", "blue", "square"], ["a", "blue", "square", "below", "a", "red", "circle"]],
    ]
    hyps = [
        ["a", "red", "circle", "a", "red", "circle", "a", "red", "circle"],  # clipping
        ["a", "green", "triangle", "above", "a", "blue", "square", "and", "more", "words"],
        ["blue"],  # one word: length 0 bigrams
    ]
    _, ours = cider_d(hyps, refs)
    expected = [reference_cider_d(h, r, refs) for h, r in zip(hyps, refs, strict=True)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_each_part_of_the_formula_matters() -> None:
    """The parts a reimplementation gets wrong each change the score here: σ and clipping
    (ref_len, the ×10 and the bigram length are pinned by the equalities above)."""
    refs = [[["a", "b", "c", "d"], ["a", "b", "e"]], [["x", "y"], ["x", "y", "z", "w"]]]
    hyp = [["a", "b", "a", "b", "a", "b", "c"], ["x", "y"]]
    _, base = cider_d(hyp, refs)
    wide = CiderD(refs, sigma=12.0).score(hyp, [0, 1])
    assert not np.allclose(base, wide)  # σ = 6, not 12
    expected = [reference_cider_d(h, r, refs) for h, r in zip(hyp, refs, strict=True)]
    np.testing.assert_allclose(base, expected, rtol=1e-12)
    unclipped = reference_cider_d(hyp[0], refs[0], refs, clip=False)
    assert base[0] < unclipped - 0.1  # repeating "a b" gains nothing: clipping


def test_training_frequencies_are_kept_and_ids_score_like_words(shapes_records) -> None:
    train_refs = [[list(c) for c in r.captions] for r in shapes_records]
    scorer = CiderD(train_refs)
    assert scorer.ref_len == pytest.approx(math.log(len(train_refs)))
    hyps = [list(r.captions[0]) for r in shapes_records[:40]]
    images = list(range(40))
    words = scorer.score(hyps, images)
    # The same captions as word ids: the n-gram tables key on any hashable token.
    ids = {w: i for i, w in enumerate(sorted({w for rs in train_refs for r in rs for w in r}))}
    scorer_ids = CiderD([[[ids[w] for w in r] for r in rs] for rs in train_refs])
    as_ids = scorer_ids.score([[ids[w] for w in h] for h in hyps], images)
    np.testing.assert_allclose(words, as_ids, rtol=0, atol=1e-12)
    # Several samples of one image, and the kept references equal the given ones.
    np.testing.assert_allclose(
        scorer.score([hyps[0], hyps[1]], [3, 3]),
        scorer.score_against([hyps[0], hyps[1]], [train_refs[3], train_refs[3]]),
    )
    # With the evaluated set's references as the source, `CiderD` is `cider_d`.
    subset = train_refs[:40]
    np.testing.assert_allclose(CiderD(subset).score(hyps, images), cider_d(hyps, subset)[1])
    assert not np.allclose(words, cider_d(hyps, subset)[1])  # the df source matters
