"""Shared fixtures: a tiny generated shapes set and Hydra-composed configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from caption.data.shapes import generate_shapes

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# A model small enough for a test to train in seconds, with the default architecture
# (no `model.score.*` keys: they differ between score functions).
TINY_MODEL = [
    "model.embed_dim=16",
    "model.hidden_dim=32",
    "model.encoder.channels=[8,16,16]",
]


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/<name>.yaml` the way the command-line tool would."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides or [])


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64/16/16-image shapes set; returns its Karpathy JSON."""
    return generate_shapes(
        tmp_path_factory.mktemp("shapes"), n_train=64, n_val=16, n_test=16, seed=1
    )


@pytest.fixture
def train_cfg(tiny_shapes: Path, tmp_path: Path) -> DictConfig:
    """The default training config on the tiny set, one quick epoch, run dir in tmp_path."""
    return compose_config(
        "train",
        [
            f"data.annotations={tiny_shapes}",
            f"data.images={tiny_shapes.parent}",
            f"run_dir={tmp_path / 'run'}",
            "data.batch_size=16",
            "trainer.max_epochs=1",
            "trainer.progress=false",
            "trainer.device=cpu",
            *TINY_MODEL,
        ],
    )
