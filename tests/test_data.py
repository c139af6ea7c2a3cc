"""The Karpathy reader, tokenisation, the vocabulary and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from caption.data.dataset import CaptionDataset, ImageBank, collate_captions
from caption.data.formats import read_karpathy
from caption.data.vocab import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary, tokenize
from caption.errors import CaptionError

KARPATHY = {
    "dataset": "coco",
    "images": [
        {
            "filepath": "train2014",
            "filename": "a.jpg",
            "split": "train",
            "imgid": 0,
            "cocoid": 9,
            "sentids": [0, 1],
            "sentences": [
                {"tokens": ["a", "dog", "runs"], "raw": "A dog runs.", "sentid": 0, "imgid": 0},
                {
                    "tokens": ["the", "dog", "sleeps"],
                    "raw": "The dog sleeps",
                    "sentid": 1,
                    "imgid": 0,
                },
            ],
        },
        {
            "filepath": "val2014",
            "filename": "b.jpg",
            "split": "restval",
            "imgid": 1,
            "sentids": [2],
            "sentences": [{"raw": "A Cat, sitting!", "sentid": 2, "imgid": 1}],
        },
        {
            "filepath": "val2014",
            "filename": "c.jpg",
            "split": "val",
            "imgid": 2,
            "sentids": [3],
            "sentences": [
                {
                    "tokens": ["a", "zebra"],
                    "raw": "a zebra",
                    "sentid": 3,
                    "imgid": 2,
                    "groundings": {"1": 0},
                }
            ],
            "objects": [{"box": [0, 0, 4, 4], "words": ["zebra"]}],
        },
        {
            "filename": "d.jpg",
            "split": "test",
            "imgid": 3,
            "sentids": [4],
            "sentences": [{"tokens": ["a", "dog"], "raw": "a dog", "sentid": 4, "imgid": 3}],
        },
    ],
}


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_reader_splits_restval_and_paths(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    splits = read_karpathy(write_json(tmp_path / "k.json", KARPATHY), tmp_path / "imgs")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2, 1, 1]  # restval -> train
    a, b = splits["train"]
    assert a.path == tmp_path / "imgs" / "train2014" / "a.jpg"
    assert a.captions == [["a", "dog", "runs"], ["the", "dog", "sleeps"]]
    assert b.captions == [["a", "cat", "sitting"]]  # tokenised from raw when tokens are absent
    assert splits["test"][0].path == tmp_path / "imgs" / "d.jpg"  # no filepath (Flickr)
    c = splits["val"][0]
    assert c.objects[0]["words"] == ["zebra"] and c.groundings == [{1: 0}]


def test_reader_defaults_images_to_json_folder(tmp_path: Path) -> None:
    splits = read_karpathy(write_json(tmp_path / "k.json", KARPATHY))
    assert splits["test"][0].path == tmp_path / "d.jpg"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"pictures": []}', "not a Karpathy split file"),
        (
            '{"images": [{"split": "train", "sentences": []}]}',
            "image #0: field 'filename' is missing",
        ),
        (
            '{"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"tokens": []}]}]}',
            r"image #0 \(a.jpg\): field 'sentences\[0\].tokens/raw' is missing",
        ),
        (
            '{"images": [{"filename": "a.jpg", "split": "train", "sentences": {"raw": "x"}}]}',
            r"image #0 \(a.jpg\): field 'sentences' is malformed",
        ),
        ('{"images": [{"filename": "x.jpg", "split": "dev", "sentences": []}]}', "unknown split"),
    ],
)
def test_reader_rejects_malformed_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CaptionError, match=message) as e:
        read_karpathy(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_reader_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(CaptionError, match="does not exist"):
        read_karpathy(tmp_path / "nope.json")
    with pytest.raises(CaptionError, match="not a folder"):
        read_karpathy(write_json(tmp_path / "k.json", KARPATHY), tmp_path / "missing")


def test_tokenize_needs_no_downloads() -> None:
    assert tokenize("A man's DOG, running -- fast!") == ["a", "man's", "dog", "running", "fast"]


def test_vocabulary_train_only_min_count_and_round_trip() -> None:
    train = [["a", "dog", "runs"], ["a", "dog"], ["a", "cat"]]
    vocab = Vocabulary.build(train, min_count=2)
    assert vocab.itos == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog"]
    ids = vocab.encode(["a", "cat", "dog"])
    assert ids == [START_ID, 4, UNK_ID, 5, END_ID]
    assert vocab.decode([*ids, PAD_ID, 4]) == ["a", "<unk>", "dog"]  # stops at <end>
    assert Vocabulary(list(vocab.itos)) == vocab  # what a checkpoint stores is enough
    assert len(Vocabulary.build(train, max_size=5)) == 5
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])


def test_batching_pads_variable_length_captions(tmp_path: Path) -> None:
    doc = {
        "images": [
            {
                "filename": "x.png",
                "split": "train",
                "sentences": [{"tokens": ["a", "red", "circle"]}, {"tokens": ["circle"]}],
            }
        ]
    }
    Image.new("RGB", (10, 20), (255, 0, 0)).save(tmp_path / "x.png")
    records = read_karpathy(write_json(tmp_path / "k.json", doc))["train"]
    vocab = Vocabulary.build(r for rec in records for r in rec.captions)
    data = CaptionDataset(ImageBank(records, image_size=8), vocab)
    batch = collate_captions([data[0], data[1]])
    assert batch.images.shape == (2, 3, 8, 8) and batch.images.dtype == torch.uint8
    assert batch.lengths.tolist() == [5, 3]
    assert batch.captions.shape == (2, 5) and batch.captions[1, 3:].tolist() == [PAD_ID, PAD_ID]


def test_image_bank_skips_bad_files_and_keeps_good_ones(tmp_path: Path, caplog) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    doc = {
        "images": [
            {"filename": n, "split": "train", "sentences": [{"tokens": ["x"]}]}
            for n in ("good.png", "bad.png", "missing.png")
        ]
    }
    records = read_karpathy(write_json(tmp_path / "k.json", doc))["train"]
    bank = ImageBank(records, image_size=8)
    assert [r.path.name for r in bank.records] == ["good.png"]
    assert "bad.png" in caplog.text and "missing.png" in caplog.text
