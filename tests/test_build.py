"""Building the model from its config: a refused setting is one line naming its config key,
and the model knows the image size it is trained at."""

from __future__ import annotations

import pytest

from caption.config import check_train_config
from caption.errors import CaptionError
from caption.models.build import build_model
from tests.helpers.config import TINY_MODEL, compose_config

# Each module says what is wrong with its own argument; the builder adds where it is set.
REFUSED = [
    (["model/attention=local", "model.attention.window=0"], "model.attention.window must be"),
    (["model/attention=hard", "model.attention.reward=bleu"], "model.attention.reward must be"),
    (["model.score.activation=gelu"], "model.score.activation must be one of"),
    (["model.heads=3"], "model.heads must be >= 2 and divide the annotation size D = 16"),
    (["model.heads=2", "model/attention=hard"], "model.heads > 1 works with soft and local"),
    (
        ["model.encoder_self_attention.layers=1", "model.encoder_self_attention.heads=3"],
        "model.encoder_self_attention.heads must be a positive divisor",
    ),
    (["+model.encoder.lr=0"], "model.encoder.lr must be a positive"),
    (["model.encoder.pretrained=true"], "model.encoder: small_cnn is trained from scratch"),
    (["+model.attention.windw=2"], "model.attention: SoftAttention.__init__() got an unexpected"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED, ids=lambda x: str(x))
def test_a_refused_setting_names_its_config_key(overrides: list[str], message: str) -> None:
    cfg = compose_config("train", [*TINY_MODEL, *overrides])
    with pytest.raises(CaptionError) as info:
        build_model(cfg.model, vocab_size=12)
    text = str(info.value)
    assert text.startswith(f"config: {message}"), text
    assert "\n" not in text


def test_the_model_takes_its_image_size_from_the_data_config() -> None:
    cfg = compose_config("train", [*TINY_MODEL, "run_dir=.", "data.image_size=48"])
    assert build_model(cfg.model, vocab_size=12).image_size == 48
    check_train_config(cfg)
    cfg = compose_config("train", [*TINY_MODEL, "run_dir=.", "model.encoder.image_size=64"])
    with pytest.raises(CaptionError, match=r"model\.encoder\.image_size=64 differs from data"):
        check_train_config(cfg)
