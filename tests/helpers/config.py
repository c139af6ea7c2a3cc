"""Hydra-composed configs as the command-line tools compose them, and small model settings."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.helpers import CONF

# A model small enough for a test to train in seconds, with the default architecture
# (no `model.score.*` keys: they differ between score functions).
TINY_MODEL = [
    "model.embed_dim=16",
    "model.hidden_dim=32",
    "model.encoder.channels=[8,16,16]",
]
# Smaller still, for float64 references and exact enumeration: two stride-2 layers, no
# dropout, no penalty (an 8 px image gives a 2x2 grid, 16 px a 4x4 one).
NANO_MODEL = [
    "model.embed_dim=8",
    "model.hidden_dim=8",
    "model.score.hidden_dim=8",
    "model.encoder.channels=[4,4]",
    "model.dropout=0",
    "model.doubly_stochastic=0",
]
# Hard attention whose surrogate's expected gradient is the exact gradient of L_s: every
# caption samples its locations, λ_r = 1, λ_e = 0.
EXACT_HARD = [
    "model/attention=hard",
    "model.attention.expectation_prob=0",
    "model.attention.reward_weight=1.0",
    "model.attention.entropy_weight=0",
]


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/<name>.yaml` the way the command-line tool would."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides or [])
