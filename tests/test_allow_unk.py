"""Decoding never writes `<unk>` unless asked (`allow_unk`), whatever the strategy and tool."""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import pytest
import torch
from fastapi import UploadFile

from caption.checkpoint import load_checkpoint, save_checkpoint
from caption.cli.evaluate import evaluate
from caption.cli.generate import generate
from caption.cli.serve import create_app
from caption.cli.visualize import visualize
from caption.config import check_train_config
from caption.data.dataset import ImageBank
from caption.data.formats import read_split
from caption.data.vocab import END_ID, UNK_ID
from caption.errors import CaptionError
from caption.evaluation.decode import score_bank
from caption.models.build import build_model, load_captioner
from caption.models.captioner import Captioner
from tests.helpers.cli import DECODING_TOOLS, run
from tests.helpers.config import TINY_MODEL, compose_config

V = 20
MAX_LEN = 6
STRATEGIES = ["greedy", "beam", "sample"]

pytestmark = pytest.mark.usefixtures("one_thread")


def with_unk_bias(model: Captioner, bias: float) -> Captioner:
    """A copy of `model` whose output layer gives `<unk>` this bias: +1e4 makes it the
    likeliest word by far at every step, -inf makes it impossible."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.decoder.L_o.bias[UNK_ID] = bias
    return model


def decode(model: Captioner, images: torch.Tensor, strategy: str, **options: bool):
    torch.manual_seed(0)  # the same draws for every sampled decoding
    return model.generate(images, strategy=strategy, beam_size=3, max_len=MAX_LEN, **options)


@pytest.fixture(scope="module")
def tiny() -> tuple[Captioner, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(compose_config("train", TINY_MODEL).model, vocab_size=V).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    return model, images


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unk_is_forbidden_by_default(strategy: str, tiny: tuple[Captioner, torch.Tensor]) -> None:
    model, images = tiny
    favoured = decode(with_unk_bias(model, 1e4), images, strategy)
    assert not (favoured.tokens == UNK_ID).any()
    # Forbidding `<unk>` is decoding as if it were impossible: same words, same log p.
    impossible = decode(with_unk_bias(model, float("-inf")), images, strategy)
    assert torch.equal(favoured.tokens, impossible.tokens)
    torch.testing.assert_close(favoured.log_probs, impossible.log_probs)
    assert torch.isfinite(favoured.log_probs).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_allow_unk_lets_it_be_generated(strategy: str, tiny: tuple[Captioner, torch.Tensor]):
    model, images = tiny
    gen = decode(with_unk_bias(model, 1e4), images, strategy, allow_unk=True)
    # `<unk>` outweighs `<end>` too: every caption runs to max_len, all of it `<unk>` (beam
    # search still ends its captions there, since a finished one beats any unfinished one).
    assert gen.tokens.shape == (len(images), MAX_LEN)
    assert (gen.tokens[:, :-1] == UNK_ID).all()
    assert ((gen.tokens[:, -1] == UNK_ID) | (gen.tokens[:, -1] == END_ID)).all()


@pytest.mark.parametrize("tool, check, args", DECODING_TOOLS)
def test_allow_unk_must_be_a_bool(tool: str, check, args: list[str], tmp_path: Path) -> None:
    # Checked before the checkpoint is read: none is needed.
    cfg = compose_config(tool, [f"checkpoint={tmp_path / 'none.pt'}", *args, "allow_unk=maybe"])
    with pytest.raises(CaptionError) as e:
        check(cfg)
    assert str(e.value) == (
        "config: allow_unk must be true or false, got 'maybe'; override it with allow_unk=<value>"
    )


def test_trainer_val_allow_unk_must_be_a_bool() -> None:
    cfg = compose_config("train", ["run_dir=unused", "trainer.val.allow_unk=1"])
    with pytest.raises(CaptionError) as e:
        check_train_config(cfg)
    assert str(e.value).startswith("config: trainer.val.allow_unk must be true or false, got 1")


def unk_checkpoint(trained: Path, path: Path, bias: float) -> Path:
    """The tiny trained checkpoint with `<unk>`'s output bias set to `bias`, saved as `path`."""
    ckpt = load_checkpoint(trained / "run" / "checkpoints" / "best.pt")
    ckpt["model"]["decoder.L_o.bias"][UNK_ID] = bias
    save_checkpoint(path, **{k: v for k, v in ckpt.items() if k not in ("format", "version")})
    return path


def caption_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
@pytest.mark.cli
def test_generate_writes_unk_only_with_allow_unk(trained: Path, tmp_path: Path) -> None:
    favoured = unk_checkpoint(trained, tmp_path / "unk.pt", 1e4)
    images = f"images={trained / 'shapes' / 'images'}/test_*.png"
    default = caption_lines(run("caption-generate", f"checkpoint={favoured}", images).stdout)
    allowed = run("caption-generate", f"checkpoint={favoured}", images, "allow_unk=true")
    allowed = caption_lines(allowed.stdout)
    assert len(default) == 8 and [x["image"] for x in allowed] == [x["image"] for x in default]
    # The trained checkpoint cannot end (conftest's _never_end): max_len words, all <unk>.
    assert all(x["caption"] == " ".join(["<unk>"] * 30) for x in allowed)
    assert not any("<unk>" in x["caption"].split() for x in default)
    # By default the captions are those of a model that cannot say <unk> at all.
    impossible = unk_checkpoint(trained, tmp_path / "no_unk.pt", float("-inf"))
    reference = tmp_path / "reference.jsonl"
    generate(
        compose_config("generate", [f"checkpoint={impossible}", images, f"output={reference}"])
    )
    assert default == caption_lines(reference.read_text())


@pytest.mark.slow
def test_evaluate_and_validation_decode_unk_only_with_allow_unk(
    trained: Path, tmp_path: Path
) -> None:
    favoured = unk_checkpoint(trained, tmp_path / "unk.pt", 1e4)
    out = tmp_path / "out"
    for allow in (False, True):
        evaluate(
            compose_config(
                "evaluate",
                [
                    f"checkpoint={favoured}",
                    "coco_metrics=false",
                    f"output={out / 'm.json'}",
                    f"captions={out / 'c.jsonl'}",
                    f"allow_unk={str(allow).lower()}",
                ],
            )
        )
        said = {
            w for x in caption_lines((out / "c.jsonl").read_text()) for w in x["caption"].split()
        }
        assert ("<unk>" in said) == allow and (said == {"<unk>"}) == allow
        assert json.loads((out / "m.json").read_text())["allow_unk"] is allow
    # Validation decodes with trainer.val, as caption-train passes it to score_bank.
    model, vocab, train_cfg = load_captioner(favoured)
    bank = ImageBank(read_split(train_cfg.data, "val"), model.image_size, preload=True)
    for allow in (False, True):
        val = compose_config("train", ["run_dir=unused", f"trainer.val.allow_unk={allow}"])
        _, captions = score_bank(model, bank, vocab, device="cpu", **val.trainer.val)
        said = {w for c in captions for w in c["tokens"]}
        assert ("<unk>" in said) == allow and (said == {"<unk>"}) == allow


def report_captions(path: Path) -> list[str]:
    page = path.read_text()
    data = re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1)
    return [item["caption"] for item in json.loads(data)["items"]]


@pytest.mark.slow
def test_report_and_serve_say_unk_only_with_allow_unk(trained: Path, tmp_path: Path) -> None:
    favoured = unk_checkpoint(trained, tmp_path / "unk.pt", 1e4)
    image = trained / "shapes" / "images" / "test_00000.png"
    only_unk = " ".join(["<unk>"] * 30)  # the trained checkpoint cannot end: max_len words
    for allow in (False, True):
        out = tmp_path / f"report_{allow}"
        args = [f"checkpoint={favoured}", f"images={image}", "format=html", f"output_dir={out}"]
        visualize(compose_config("visualize", [*args, f"allow_unk={allow}"]))
        (caption,) = report_captions(out / "attention.html")
        assert (caption == only_unk) == allow and ("<unk>" in caption.split()) == allow
        assert ("&lt;unk&gt; allowed" in (out / "attention.html").read_text()) == allow
        app = create_app(compose_config("serve", [f"checkpoint={favoured}", f"allow_unk={allow}"]))
        endpoint = next(r.endpoint for r in app.routes if getattr(r, "path", "") == "/caption")
        body = endpoint(image=UploadFile(io.BytesIO(image.read_bytes())), beam_size=3)
        assert (body["caption"] == only_unk) == allow and ("<unk>" in body["words"]) == allow
