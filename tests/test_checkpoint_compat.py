"""Checkpoints written before a class moved still load."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from caption.checkpoint import build_model, load_captioner, save_checkpoint
from caption.data.vocab import SPECIALS
from caption.models.scores import AdditiveScore
from tests.conftest import TINY_MODEL, compose_config


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
