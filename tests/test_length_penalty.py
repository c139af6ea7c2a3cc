"""`length_penalty`: every decoding tool hands it to beam search, and refuses a negative one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caption.cli.evaluate import evaluate
from caption.cli.generate import generate
from caption.cli.visualize import visualize
from caption.config import check_train_config
from caption.errors import CaptionError
from caption.models.captioner import Captioner
from tests.helpers.cli import DECODING_TOOLS
from tests.helpers.config import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("tool, check, args", DECODING_TOOLS)
def test_a_negative_length_penalty_is_refused(tool: str, check, args: list[str], tmp_path: Path):
    cfg = compose_config(tool, [f"checkpoint={tmp_path / 'none.pt'}", *args, "length_penalty=-1"])
    with pytest.raises(CaptionError) as e:
        check(cfg)
    assert str(e.value).startswith("config: length_penalty must be a number >= 0")


def test_trainer_val_length_penalty_is_checked() -> None:
    cfg = compose_config("train", ["run_dir=unused", "trainer.val.length_penalty=-0.5"])
    with pytest.raises(CaptionError, match=r"trainer\.val\.length_penalty must be a number"):
        check_train_config(cfg)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The length_penalty of every `Captioner.generate` call."""
    calls: list[float] = []
    real = Captioner.generate

    def spy(self, images, *args, **kwargs):
        calls.append(kwargs.get("length_penalty", 0.0))
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(Captioner, "generate", spy)
    return calls


def test_every_tool_decodes_with_the_length_penalty(
    trained: Path, tmp_path: Path, seen: list[float]
) -> None:
    ckpt = trained / "run" / "checkpoints" / "best.pt"
    images = f"'{trained / 'shapes' / 'images' / 'test_0000[0-1].png'}'"  # quoted: [ is syntax
    common = [f"checkpoint={ckpt}", "length_penalty=0.7", "device=cpu"]
    generate(compose_config("generate", [*common, f"images={images}", f"output={tmp_path / 'c'}"]))
    visualize(compose_config("visualize", [*common, f"images={images}", f"output_dir={tmp_path}"]))
    out = tmp_path / "metrics.json"
    evaluate(compose_config("evaluate", [*common, "coco_metrics=false", f"output={out}"]))
    assert seen and set(seen) == {0.7}
    assert json.loads(out.read_text())["length_penalty"] == 0.7
