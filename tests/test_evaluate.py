"""caption-evaluate: COCO metrics, the COCO results format, and scoring a captions file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run

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


def test_results_file_must_cover_the_split(trained: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"image": "test_00000.png", "caption": "a red circle"}) + "\n")
    shapes = trained / "shapes" / "dataset_shapes.json"
    proc = run(
        "caption-evaluate", f"results={partial}", f"annotations={shapes}", "split=test", check=False
    )
    assert proc.returncode == 2 and "has no caption for 7 of 8 images" in proc.stderr
    proc = run("caption-evaluate", f"results={partial}", "split=test", check=False)
    assert proc.returncode == 2 and "name the dataset" in proc.stderr
    proc = run("caption-evaluate", "split=test", check=False)
    assert proc.returncode == 2 and "either checkpoint=" in proc.stderr
