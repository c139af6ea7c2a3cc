"""Checkpoints written before a class moved or a field was added still load."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image

from caption.checkpoint import load_checkpoint, save_checkpoint
from caption.data.vocab import SPECIALS, UNK_ID
from caption.models.build import build_model, load_captioner
from caption.models.scores import AdditiveScore
from tests.helpers.config import TINY_MODEL, compose_config


def test_checkpoint_naming_the_old_score_module_loads(tmp_path: Path) -> None:
    cfg = compose_config("train", [*TINY_MODEL, "run_dir=."])
    itos = [*SPECIALS, "a", "red", "circle"]
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(itos))
    config = OmegaConf.to_container(cfg, resolve=True)
    # Score functions lived in caption/models/attention.py until they got their own module.
    config["model"]["score"]["_target_"] = "caption.models.attention.AdditiveScore"
    path = tmp_path / "old.pt"
    save_checkpoint(path, model=model.state_dict(), config=config, vocab=itos)
    loaded, vocab, _ = load_captioner(path)
    assert isinstance(loaded.decoder.attention.score, AdditiveScore)
    assert len(vocab) == len(itos)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_checkpoint_from_before_allow_unk_loads_and_decodes_without_unk(tmp_path: Path) -> None:
    cfg = compose_config("train", [*TINY_MODEL, "run_dir=."])
    itos = [*SPECIALS, "a", "red", "circle"]
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(itos))
    with torch.no_grad():  # a model that would say nothing but <unk> if it were allowed to
        model.decoder.L_o.bias[UNK_ID] = 1e4
    config = OmegaConf.to_container(cfg, resolve=True)
    del config["trainer"]["val"]["allow_unk"]  # the key is newer than this checkpoint
    path = tmp_path / "old.pt"
    save_checkpoint(path, model=model.state_dict(), config=config, vocab=itos)
    loaded, _, train_cfg = load_captioner(path)
    assert "allow_unk" not in train_cfg.trainer.val
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    for strategy in ("greedy", "beam"):
        tokens = loaded.generate(images, strategy=strategy, max_len=5).tokens
        assert not (tokens == UNK_ID).any()


def test_checkpoint_carries_its_image_size(tmp_path: Path) -> None:
    cfg = compose_config("train", [*TINY_MODEL, "run_dir=.", "data.image_size=48"])
    itos = [*SPECIALS, "a", "red", "circle"]
    model = build_model(cfg.model, vocab_size=len(itos))
    assert model.image_size == 48
    config = OmegaConf.to_container(cfg, resolve=True)
    assert config["model"]["encoder"]["image_size"] == 48  # saved with the model's config
    path = tmp_path / "new.pt"
    save_checkpoint(path, model=model.state_dict(), config=config, vocab=itos)
    loaded, _, _ = load_captioner(path)
    assert loaded.image_size == 48
    photo = Image.new("RGB", (90, 30), (10, 200, 30))
    assert loaded.prepare(photo).shape == (3, 48, 48)  # resized whole, not cropped


def test_checkpoint_from_before_the_model_knew_its_image_size_loads(tmp_path: Path) -> None:
    cfg = compose_config("train", [*TINY_MODEL, "run_dir=.", "data.image_size=40"])
    itos = [*SPECIALS, "a", "red", "circle"]
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=len(itos))
    config = OmegaConf.to_container(cfg, resolve=True)
    del config["model"]["encoder"]["image_size"]  # format version 2: only data.image_size said it
    path = tmp_path / "old.pt"
    save_checkpoint(path, model=model.state_dict(), config=config, vocab=itos, version=2)
    assert load_checkpoint(path)["version"] == 2
    loaded, _, train_cfg = load_captioner(path)
    assert loaded.image_size == 40 and train_cfg.model.encoder.image_size == 40
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
