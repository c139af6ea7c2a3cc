"""Every command answers an unknown key or option in one line, before Hydra composes."""

from __future__ import annotations

import pytest

from caption.errors import CaptionError
from caption.overrides import check_overrides
from tests.helpers.cli import run

COMMANDS = {
    "caption-train": "train",
    "caption-generate": "generate",
    "caption-evaluate": "evaluate",
    "caption-visualize": "visualize",
    "caption-serve": "serve",
}


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("caption-train", ["trainer.max_epoch=3"], "did you mean trainer.max_epochs?"),
        ("caption-train", ["max_epochs=3"], "did you mean trainer.max_epochs?"),
        ("caption-train", ["data.batchsize=8"], "did you mean data.batch_size?"),
        ("caption-train", ["data=_base"], "data=_base is not an option of data; valid: coco,"),
        (
            "caption-train",
            ["model/attention=hard", "model.attention.sampels=2"],
            "did you mean model.attention.samples?",
        ),
        ("caption-train", ["-m", "trainer.seed=1,2", "trainer.sed=3"], "did you mean trainer.seed"),
        ("caption-train", ["hydra.run.dirr=x"], "did you mean hydra.run.dir?"),
        ("caption-generate", ["beam=5"], "did you mean beam_size?"),
        ("caption-visualize", ["checkpiont=x.pt"], "did you mean checkpoint?"),
        ("caption-serve", ["prot=8000"], "did you mean port?"),
        ("caption-evaluate", ["zzz=1"], "see its keys with `caption-evaluate --cfg job`"),
        (
            "caption-evaluate",
            ["data.feature_cache_dir=x"],
            "data.feature_cache_dir needs a data config, and caption-evaluate has none by "
            "default; choose one with data=<coco|flickr30k|flickr8k|shapes>",
        ),
        ("caption-train", ["model/encoder=resnet9000"], "is not an option of model/encoder"),
        (
            "caption-train",
            ["trainer.resume=true"],
            "config: trainer.resume is gone; use resume=auto",
        ),
    ],
)
def test_unknown_keys_get_one_line_with_the_likely_key(
    command: str, args: list[str], message: str
) -> None:
    with pytest.raises(CaptionError) as e:
        check_overrides(command, COMMANDS[command], args)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "command, args",
    [
        ("caption-train", ["experiment=xu2015_hard", "model.attention.samples=2"]),
        ("caption-train", ["-m", "model/score=dot,general", "trainer.seed=3"]),
        ("caption-train", ["+extra=1", "++trainer.new_key=2", "hydra.run.dir=x"]),
        ("caption-train", ["model.encoder.channels=[8,16,16]", "--cfg", "job"]),
        ("caption-evaluate", ["data=flickr8k", "data.feature_cache_dir=x", "beam_size=5"]),
        ("caption-generate", ["--help"]),
    ],
)
def test_known_keys_and_additions_pass(command: str, args: list[str]) -> None:
    check_overrides(command, COMMANDS[command], args)


@pytest.mark.cli
@pytest.mark.parametrize(
    "command, arg, key",
    [
        ("caption-generate", "beam=5", "beam_size"),
        ("caption-evaluate", "spliit=val", "split"),
        ("caption-visualize", "output_dirr=x", "output_dir"),
        ("caption-serve", "prot=8000", "port"),
    ],
)
def test_each_command_answers_an_unknown_key_in_one_line(command: str, arg: str, key: str) -> None:
    proc = run(command, arg, check=False)
    name = arg.split("=")[0]
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: config: {name} is not a key of {command}'s config; did you mean {key}?"
    )
