"""Every weighting φ with every score f_att, the experiment configs, and a Hydra sweep."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caption.cli.compare import find_runs, markdown_table
from caption.data.vocab import PAD_ID
from caption.models.attention import CaptionSteps
from caption.models.build import build_model
from tests.helpers import CONF, ROOT
from tests.helpers.config import TINY_MODEL, compose_config
from tests.helpers.models import random_batch

WEIGHTINGS = ["soft", "hard", "local", "local_monotonic"]
SCORES = ["additive", "dot", "general", "scaled_dot"]


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_every_combination_trains_and_decodes(weighting: str, score: str) -> None:
    torch.manual_seed(0)
    cfg = compose_config(
        "train", [*TINY_MODEL, f"model/attention={weighting}", f"model/score={score}"]
    )
    model = build_model(cfg.model, vocab_size=20)
    images, captions = random_batch(B=3)
    out = model(images, captions)
    assert (out.alphas >= 0).all() and torch.isfinite(out.logits).all()
    real = (captions[:, 1:] != PAD_ID).float()  # steps after <end> are not computed: α = 0
    torch.testing.assert_close(out.alphas.sum(-1), real)
    losses = model.loss(images, captions)
    assert torch.isfinite(losses.loss)
    losses.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    gen = model.eval().generate(images, strategy="beam", beam_size=2, max_len=5)
    real = gen.tokens != 0
    torch.testing.assert_close(gen.alphas.sum(-1)[real], torch.ones(int(real.sum())))


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_every_attention_declares_what_it_is(weighting: str, heads: int) -> None:
    """`stochastic`, `window` and `samples` say what the rest of the model may rely on, and
    `surrogate` is the attention's own training term: only hard attention has one."""
    if weighting == "hard" and heads > 1:
        return  # refused: tests/test_model.py::test_multi_head_refuses_hard_attention
    overrides = [*TINY_MODEL, f"model/attention={weighting}", f"model.heads={heads}"]
    attention = build_model(compose_config("train", overrides).model, vocab_size=20)
    attention = attention.decoder.attention
    assert attention.stochastic == (weighting == "hard")
    assert attention.window == (2 if weighting.startswith("local") else None)
    assert attention.samples == 1
    B, n = 2, 5
    rows = torch.tensor([0, 1, 0, 1, 0])
    terms = [torch.zeros(n)] * 2 if weighting == "hard" else [None, None]
    sampled = torch.ones(n, dtype=torch.bool) if weighting == "hard" else None
    steps = CaptionSteps(B, rows, torch.ones(n), *terms, sampled)
    surrogate = attention.surrogate(steps)
    assert (surrogate is not None) == (weighting == "hard")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_builds(experiment: str) -> None:
    overrides = [f"experiment={experiment}", "model.encoder.pretrained=false"]
    cfg = compose_config("train", overrides)
    assert cfg.data.image_size in (80, 224)  # shapes, or an ImageNet encoder's native side
    if cfg.model.encoder.name == "vgg19":  # the paper's VGG is too big to build here
        assert cfg.data.image_size == 224
        return
    model = build_model(cfg.model, vocab_size=20)
    images, captions = random_batch(B=2)
    model.loss(images, captions).loss.backward()


@pytest.mark.slow
@pytest.mark.cli
def test_multirun_sweep_and_comparison_table(tiny_shapes: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "caption-train"),
            "-m",
            "model/attention=soft,local",
            "model/score=dot,general",
            f"data.annotations={tiny_shapes}",
            f"data.images={tiny_shapes.parent}",
            f"hydra.sweep.dir={sweep}",
            "trainer.max_steps=2",
            "trainer.progress=false",
            "trainer.val_max_images=4",
            "trainer.device=cpu",
            *TINY_MODEL,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = find_runs([sweep])
    assert [r["run"] for r in rows] == [
        "model/attention=soft model/score=dot",
        "model/attention=soft model/score=general",
        "model/attention=local model/score=dot",
        "model/attention=local model/score=general",
    ]
    table = markdown_table(rows)
    assert table.count("\n") == 5 and "val BLEU-4" in table and "parameters" in table
    out = subprocess.run(
        [str(Path(sys.executable).parent / "caption-compare"), str(sweep)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == table
