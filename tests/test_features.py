"""The frozen-encoder feature cache: same vectors as on the fly, keyed, and used by training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from caption.cli.train import train
from caption.data.dataset import ImageBank
from caption.data.features import FeatureBank, cache_key
from caption.data.formats import read_karpathy
from caption.errors import CaptionError
from caption.models.encoder import Encoder
from tests.helpers.cli import run
from tests.helpers.config import TINY_MODEL


@pytest.fixture
def bank(tiny_shapes: Path) -> ImageBank:
    return ImageBank(read_karpathy(tiny_shapes)["val"], image_size=64, preload=False)


def frozen(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return Encoder("small_cnn", fine_tune=False, channels=[8, 16])


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-6), ("float16", 2e-3)])
def test_cached_features_equal_on_the_fly(
    bank: ImageBank, tmp_path: Path, dtype: str, tol: float
) -> None:
    encoder = frozen()
    cached = FeatureBank.build(encoder, bank, tmp_path, dtype=dtype, batch_size=5)
    assert len(cached) == len(bank) and cached.records == bank.records
    with torch.no_grad():
        live = encoder(torch.stack([bank[i] for i in range(len(bank))]).float() / 255)
    got = torch.stack([cached[i] for i in range(len(cached))])
    assert got.dtype == torch.float32 and got.shape == live.shape
    torch.testing.assert_close(got, live, atol=tol, rtol=tol)


def test_cache_is_reused_and_keyed(bank: ImageBank, tmp_path: Path) -> None:
    encoder = frozen()
    first = FeatureBank.build(encoder, bank, tmp_path)
    stamp = (first.folder / "features.npy").stat().st_mtime_ns
    again = FeatureBank.build(encoder, bank, tmp_path)
    assert again.folder == first.folder
    assert (again.folder / "features.npy").stat().st_mtime_ns == stamp  # not recomputed
    key = cache_key(encoder, bank, "float16")
    assert cache_key(frozen(seed=1), bank, "float16") != key  # other weights
    assert cache_key(encoder, bank, "float32") != key
    smaller = ImageBank(bank.records, image_size=32, preload=False)
    assert cache_key(encoder, smaller, "float16") != key  # other preprocessing
    assert cache_key(encoder, ImageBank(bank.records[:3], 64, preload=False), "float16") != key


def test_cache_refuses_a_trainable_encoder(bank: ImageBank, tmp_path: Path) -> None:
    with pytest.raises(CaptionError, match="frozen encoder"):
        FeatureBank.build(Encoder("small_cnn", channels=[8, 16]), bank, tmp_path)


@pytest.mark.slow
def test_training_from_the_cache(train_cfg: DictConfig, tmp_path: Path) -> None:
    train_cfg.data.feature_cache = True
    train_cfg.data.feature_cache_dir = str(tmp_path / "cache")
    train_cfg.model.encoder.fine_tune = False
    summary = train(train_cfg)
    assert summary["steps"] == 24 and summary["best_val_bleu4"] >= 0
    assert len(list((tmp_path / "cache").glob("*/features.npy"))) == 2  # train and val


def test_features_only_builds_the_cache_and_stops(train_cfg: DictConfig, tmp_path: Path) -> None:
    train_cfg.data.feature_cache = True
    train_cfg.data.feature_cache_dir = str(tmp_path / "cache")
    train_cfg.model.encoder.fine_tune = False
    train_cfg.trainer.features_only = True
    assert train(train_cfg)["features_only"] is True
    entries = sorted((tmp_path / "cache").glob("*/features.npy"))
    assert len(entries) == 2  # train and val
    assert not (Path(train_cfg.run_dir) / "checkpoints").exists()  # nothing trained
    # The run that follows reads those entries and builds none.
    stamps = [p.stat().st_mtime_ns for p in entries]
    train_cfg.trainer.features_only = False
    assert train(train_cfg)["steps"] == 24
    assert [
        p.stat().st_mtime_ns for p in sorted((tmp_path / "cache").glob("*/features.npy"))
    ] == stamps


def test_features_only_needs_the_cache(train_cfg: DictConfig) -> None:
    train_cfg.trainer.features_only = True
    with pytest.raises(CaptionError, match=r"add data\.feature_cache=true"):
        train(train_cfg)


@pytest.mark.slow
@pytest.mark.cli
def test_caption_train_features_only(tiny_shapes: Path, tmp_path: Path) -> None:
    proc = run(
        "caption-train",
        f"data.annotations={tiny_shapes}",
        f"data.images={tiny_shapes.parent}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "data.feature_cache=true",
        f"data.feature_cache_dir={tmp_path / 'cache'}",
        "model.encoder.fine_tune=false",
        "trainer.features_only=true",
        "trainer.device=cpu",
        *TINY_MODEL,
    )
    assert "features only: the cache in" in proc.stderr
    assert len(list((tmp_path / "cache").glob("*/features.npy"))) == 2
    assert not (tmp_path / "run" / "checkpoints").exists()
