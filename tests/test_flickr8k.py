"""Real photographs: the team's Flickr8k copy, read in the data set's own layout.

These tests need `../shared/flickr8k` beside the checkout (or `CAPTION_FLICKR8K=<dir>`):
Flicker8k_Dataset/ with the official Flickr8k.token.txt and Flickr_8k.*Images.txt. A user's
clone has no such folder, and they skip, saying so.

One module-scoped run trains the decoder for a few dozen steps on 300 real photos through
the pretrained EfficientNet-Lite0 and the feature cache; the tests then caption real photos
with it through the command-line tools and the web app.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from caption.data.vocab import tokenize
from tests.helpers import ROOT
from tests.helpers.cli import run
from tests.helpers.serving import post, serving

FLICKR8K = Path(os.environ.get("CAPTION_FLICKR8K", ROOT.parent / "shared" / "flickr8k"))
TOKENS = FLICKR8K / "Flickr8k.token.txt"
PHOTOS = FLICKR8K / "Flicker8k_Dataset"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not TOKENS.is_file() or not PHOTOS.is_dir(),
        reason=f"no Flickr8k at {FLICKR8K} (the team's copy; set CAPTION_FLICKR8K=<dir>)",
    ),
]
# Images per split for the short run: the first ones of each official split file.
N_TRAIN, N_VAL, N_TEST = 300, 20, 20


def split_names(name: str, n: int) -> list[str]:
    lines = (FLICKR8K / f"Flickr_8k.{name}Images.txt").read_text().split()
    return lines[:n]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`caption-train data=flickr8k` on the real token file (no data.format: it is detected),
    a subset of the official split, the pretrained encoder and a feature cache in tmp."""
    root = tmp_path_factory.mktemp("flickr8k")
    splits = {
        "train": split_names("train", N_TRAIN),
        "val": split_names("dev", N_VAL),
        "test": split_names("test", N_TEST),
    }
    (root / "splits.json").write_text(json.dumps(splits))
    run(
        "caption-train",
        "data=flickr8k",
        f"data.annotations={TOKENS}",
        f"data.images={PHOTOS}",
        f"data.splits_file={root / 'splits.json'}",
        "model/encoder=efficientnet_lite0",
        "data.feature_cache=true",
        f"data.feature_cache_dir={root / 'cache'}",
        "data.num_workers=0",
        "data.batch_size=50",
        "data.min_count=3",
        "model.embed_dim=64",
        "model.hidden_dim=128",
        "optimizer.lr=0.003",
        "scheduler.warmup_steps=5",
        "trainer.max_epochs=2",  # 30 steps an epoch
        "trainer.progress=false",
        "trainer.device=cpu",
        f"hydra.run.dir={root / 'run'}",
    )
    return root


def test_training_on_real_photos_lowers_the_loss(real_run: Path) -> None:
    rows = [json.loads(line) for line in (real_run / "run" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["step"] == 30  # 300 photos x 5 captions / 50
    entries = list((real_run / "cache").iterdir())
    assert len(entries) == 2, entries  # train and val, each cached once
    # From near log V (a uniform guess over ~700 words) to clearly below it.
    assert rows[0]["train_loss"] < math.log(5000)
    assert rows[1]["train_loss"] < rows[0]["train_loss"] - 0.5, rows


def test_generate_and_serve_caption_a_real_photo_in_real_words(real_run: Path) -> None:
    ckpt = real_run / "run" / "checkpoints" / "best.pt"
    photo = PHOTOS / split_names("test", 1)[0]
    out = real_run / "captions.jsonl"
    # Greedy: a few dozen steps leave beam search's likeliest caption a word or two long.
    run(
        "caption-generate",
        f"checkpoint={ckpt}",
        f"images={photo}",
        f"output={out}",
        "strategy=greedy",
    )
    generated = json.loads(out.read_text())
    words = generated["caption"].split()
    train = set(split_names("train", N_TRAIN))
    train_words = {
        word
        for line in TOKENS.read_text().splitlines()
        if line.split("#")[0] in train
        for word in tokenize(line.split("\t")[1])
    }
    assert 3 <= len(words) <= 30, generated
    assert set(words) <= train_words, generated  # real words, never <unk>
    with serving(ckpt) as url:
        status, answer = post(f"{url}/caption", photo.read_bytes(), beam_size="1")
    assert status == 200, answer
    assert answer["caption"] == generated["caption"]
    assert (answer["width"], answer["height"]) == (224, 224)


def test_evaluate_scores_a_partial_captions_file_on_the_photos_it_covers(real_run: Path) -> None:
    ckpt = real_run / "run" / "checkpoints" / "best.pt"
    covered = [PHOTOS / name for name in split_names("test", 5)]
    (real_run / "five").mkdir(exist_ok=True)
    for photo in covered:
        (real_run / "five" / photo.name).symlink_to(photo)
    out = real_run / "five.jsonl"
    run("caption-generate", f"checkpoint={ckpt}", f"images={real_run / 'five'}", f"output={out}")
    data = [
        "data=flickr8k",
        f"data.annotations={TOKENS}",
        f"data.images={PHOTOS}",
        f"data.splits_file={real_run / 'splits.json'}",
        "split=test",
    ]
    refused = run("caption-evaluate", f"results={out}", *data, check=False)
    assert refused.returncode != 0
    assert "has no caption for 15 of 20 images" in refused.stderr
    scored = run("caption-evaluate", f"results={out}", *data, "partial=true")
    metrics = json.loads(scored.stdout.strip().splitlines()[-1])
    assert metrics["n_images"] == 5 and metrics["partial"] is True
    assert 0 <= metrics["bleu1"] <= 1 and metrics["cider"] >= 0
    assert f"scored 5 of 20 test images; 15 have no caption in {out}" in scored.stderr
