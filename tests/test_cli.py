"""The command-line tools end to end, in subprocesses, on a tiny generated shapes set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import ROOT
from tests.helpers.cli import run

pytestmark = [pytest.mark.slow, pytest.mark.cli]


def test_train_run_dir(trained: Path) -> None:
    run_dir = trained / "run"
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # 6 steps < 1 epoch
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_generate_folder_file_and_glob(trained: Path, tmp_path: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    images = trained / "shapes" / "images"
    out = run("caption-generate", f"checkpoint={ckpt}", f"images={images}", "strategy=greedy")
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(lines) == 64 and {"image", "caption", "log_prob"} <= lines[0].keys()
    assert all(line["log_prob"] <= 0 for line in lines)
    one = run(
        "caption-generate",
        f"checkpoint={ckpt}",
        f"images={images / 'test_00000.png'}",
        "beam_size=2",
        f"output={tmp_path / 'c.jsonl'}",
    )
    assert one.stdout == "" and len((tmp_path / "c.jsonl").read_text().splitlines()) == 1
    glob = run("caption-generate", f"checkpoint={ckpt}", f"images={images}/val_*.png")
    assert len(glob.stdout.splitlines()) == 8


def test_generate_reports_bad_images_and_captions_the_rest(trained: Path, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "good.png")
    (folder / "notes.jpg").write_text("this is not an image")
    good = (trained / "shapes" / "images" / "test_00001.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    proc = run(
        "caption-generate",
        f"checkpoint={trained / 'run/checkpoints/best.pt'}",
        f"images={folder}",
        check=False,
    )
    assert proc.returncode == 1
    assert [json.loads(x)["image"] for x in proc.stdout.splitlines()] == [str(folder / "good.png")]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 2
    assert any("notes.jpg: not an image file" in e for e in errors)
    assert any("truncated.png: corrupt or truncated image" in e for e in errors)


def test_evaluate_prints_table_and_json_last(trained: Path) -> None:
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    proc = run("caption-evaluate", f"checkpoint={ckpt}", "split=test")
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"bleu1", "bleu2", "bleu3", "bleu4"} <= last.keys() and last["n_images"] == 8
    assert "bleu4" in proc.stdout.splitlines()[0] or "bleu1" in proc.stdout
    saved = json.loads((trained / "run" / "eval_test.json").read_text())
    assert saved == last


@pytest.mark.parametrize(
    "tool, args, message",
    [
        ("caption-generate", ["images=/no/such/dir"], "images: /no/such/dir does not exist"),
        ("caption-evaluate", ["split=dev"], "split must be one of train, val, test"),
        ("caption-generate", ["strategy=nucleus", "images=x"], "strategy must be one of"),
        (
            "caption-train",
            ["data.annotations=/no/such.json"],
            "data.annotations: /no/such.json does not exist",
        ),
    ],
)
def test_bad_input_gets_one_clear_line(
    trained: Path, tool: str, args: list[str], message: str
) -> None:
    ckpt = (
        [f"checkpoint={trained / 'run/checkpoints/best.pt'}"]
        if tool != "caption-train"
        else [f"hydra.run.dir={trained / 'bad_run'}"]
    )
    proc = run(tool, *ckpt, *args, check=False)
    assert proc.returncode == 2
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_foreign_checkpoint_and_unknown_option(trained: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "resnet.pt"
    foreign.write_bytes(b"PK\x03\x04 not really a zip")
    proc = run(
        "caption-generate",
        f"checkpoint={foreign}",
        f"images={trained / 'shapes/images'}",
        check=False,
    )
    assert proc.returncode == 2 and "is not a caption checkpoint" in proc.stderr
    proc = run("caption-train", "trainer.max_epoch=3", check=False)  # typo
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: config: trainer.max_epoch is not a key of caption-train's config; "
        "did you mean trainer.max_epochs?"
    )
    proc = run("caption-train", "model/encoder=resnet9000", check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(
        "error: config: model/encoder=resnet9000 is not an option of model/encoder; valid: "
    )


def test_quickstart_notebook_runs(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute the notebook's code cells against the tiny run (headless matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    notebook = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    code = "\n\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    monkeypatch.setenv("CAPTION_CHECKPOINT", str(trained / "run" / "checkpoints" / "best.pt"))
    monkeypatch.setenv("CAPTION_IMAGES", str(trained / "shapes" / "images"))
    scope: dict = {}
    exec(compile(code, "quickstart.ipynb", "exec"), scope)
    assert len(scope["captions"]) == 4 and scope["out"].alphas.shape[0] == 4
