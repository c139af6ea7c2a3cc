"""caption-evaluate: COCO metrics, the COCO results format, and scoring a captions file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nltk.translate.bleu_score import corpus_bleu

from caption.cli.evaluate import evaluate
from caption.errors import CaptionError
from tests.helpers.cli import run
from tests.helpers.config import compose_config

pytestmark = [pytest.mark.slow, pytest.mark.cli]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_checkpoint_metrics_coco_results_and_rescoring(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    out = run(
        "caption-evaluate",
        f"checkpoint={ckpt}",
        "split=test",
        "strategy=greedy",
        f"output={tmp_path / 'm.json'}",
        f"captions={tmp_path / 'c.jsonl'}",
    )
    metrics = last_json(out.stdout)
    assert {"bleu4", "meteor", "rouge_l", "cider"} <= metrics.keys()  # pycocoevalcap, offline
    coco = json.loads((tmp_path / "captions_test_coco.json").read_text())
    assert len(coco) == 8 and {"image_id", "caption"} == set(coco[0])
    shapes = trained / "shapes" / "dataset_shapes.json"
    # The same captions scored without the model give the same BLEU, from either format.
    for results in (tmp_path / "c.jsonl", tmp_path / "captions_test_coco.json"):
        again = last_json(
            run(
                "caption-evaluate",
                f"results={results}",
                f"annotations={shapes}",
                "split=test",
                "coco_metrics=false",
            ).stdout
        )
        assert {k: again[k] for k in ("bleu1", "bleu4")} == {
            k: metrics[k] for k in ("bleu1", "bleu4")
        }
        assert (again["n_images"], again["partial"]) == (8, False)  # the whole split
    assert (metrics["n_images"], metrics["partial"]) == (8, False)


def test_results_file_must_cover_the_split(trained: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"image": "test_00000.png", "caption": "a red circle"}) + "\n")
    shapes = trained / "shapes" / "dataset_shapes.json"
    proc = run(
        "caption-evaluate", f"results={partial}", f"annotations={shapes}", "split=test", check=False
    )
    assert proc.returncode == 2 and "has no caption for 7 of 8 images" in proc.stderr
    assert "caption them all" in proc.stderr
    proc = run("caption-evaluate", f"results={partial}", "split=test", check=False)
    assert proc.returncode == 2 and "name the dataset" in proc.stderr
    proc = run("caption-evaluate", "split=test", check=False)
    assert proc.returncode == 2 and "either checkpoint=" in proc.stderr


def test_allow_unk_is_in_the_checkpoint_metrics(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    cfg = [f"checkpoint={ckpt}", "coco_metrics=false", f"output={tmp_path / 'm.json'}"]
    assert evaluate(compose_config("evaluate", [*cfg, "strategy=greedy"]))["allow_unk"] is False


# --- partial=true: a captions file that covers only part of the split ---------------------

COVERED = (0, 2, 5)  # of the 8 test images of the `trained` shapes set


def shapes_test_images(trained: Path) -> list[dict]:
    """The test images of the shapes JSON, read here without the code under test."""
    doc = json.loads((trained / "shapes" / "dataset_shapes.json").read_text())
    return [im for im in doc["images"] if im["split"] == "test"]


def partial_results(trained: Path, path: Path) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Write captions for the COVERED test images (each its own first reference with the last
    word wrong, so that BLEU-1..4 are neither 0 nor 1); return them and the covered images'
    references."""
    images = shapes_test_images(trained)
    hypotheses = [[*images[i]["sentences"][0]["tokens"][:-1], "banana"] for i in COVERED]
    path.write_text(
        "".join(
            json.dumps({"image": images[i]["filename"], "caption": " ".join(h)}) + "\n"
            for i, h in zip(COVERED, hypotheses, strict=True)
        )
    )
    references = [[s["tokens"] for s in images[i]["sentences"]] for i in COVERED]
    return hypotheses, references


def test_partial_results_score_the_covered_images(trained: Path, tmp_path: Path) -> None:
    results = tmp_path / "some.jsonl"
    hypotheses, references = partial_results(trained, results)
    shapes = trained / "shapes" / "dataset_shapes.json"
    args = [f"results={results}", f"annotations={shapes}", "split=test", "coco_metrics=false"]
    proc = run("caption-evaluate", *args, "partial=true")
    metrics = last_json(proc.stdout)
    assert (metrics["n_images"], metrics["partial"]) == (3, True)
    assert metrics == json.loads((tmp_path / "some_eval_test.json").read_text())
    assert (
        f"results: scored 3 of 8 test images; 5 have no caption in {results} (partial=true)"
        in proc.stderr
    )
    # BLEU of the covered images against their own references only, computed with nltk.
    weights = [tuple([1.0 / n] * n) for n in range(1, 5)]
    expected = corpus_bleu(references, hypotheses, weights=weights)
    assert all(0 < value < 1 for value in expected)
    for n, value in enumerate(expected, start=1):
        assert metrics[f"bleu{n}"] == round(value, 4)
    # The same as scoring the whole of a split that holds just those images.
    doc = json.loads(shapes.read_text())
    keep = {im["filename"] for i, im in enumerate(shapes_test_images(trained)) if i in COVERED}
    doc["images"] = [im for im in doc["images"] if im["split"] != "test" or im["filename"] in keep]
    restricted = tmp_path / "restricted.json"
    restricted.write_text(json.dumps(doc))
    whole = evaluate(
        compose_config(
            "evaluate",
            [
                *args[:1],
                f"annotations={restricted}",
                f"images={shapes.parent}",
                *args[2:],
                f"output={tmp_path / 'r.json'}",
            ],
        )
    )
    assert {k: v for k, v in whole.items() if k != "partial"} == {
        k: v for k, v in metrics.items() if k != "partial"
    }


def test_partial_needs_a_results_file_that_covers_something(trained: Path, tmp_path: Path) -> None:
    shapes = trained / "shapes" / "dataset_shapes.json"
    none = tmp_path / "val.jsonl"  # captions of val images only: none of the test split
    none.write_text(json.dumps({"image": "val_00000.png", "caption": "a red circle"}) + "\n")
    cfg = [f"results={none}", f"annotations={shapes}", "split=test", "partial=true"]
    with pytest.raises(CaptionError) as e:
        evaluate(compose_config("evaluate", cfg))
    assert str(e.value).startswith(
        f"results: {none} captions none of the split's 8 images (test_00000.png, "
    ) and str(e.value).endswith(", ...); check split= and the dataset it is scored against")
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    with pytest.raises(CaptionError) as e:
        evaluate(compose_config("evaluate", [f"checkpoint={ckpt}", "partial=true"]))
    assert str(e.value).startswith("partial: partial=true scores a results= file")
    with pytest.raises(CaptionError) as e:
        evaluate(compose_config("evaluate", [*cfg[:3], "partial=yes"]))
    assert str(e.value).startswith("config: partial must be true or false, got 'yes'")
